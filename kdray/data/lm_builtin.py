"""Two language-model data sets that need no download.

* ``synthetic_lm``: sequences from a random hidden Markov model (``states`` hidden states, ``vocab`` tokens, sparse
  Dirichlet transitions and emissions), so the true next-token distribution of every position is known exactly (the
  forward algorithm): validation and test carry it, and a student's KL to the truth is measured, not estimated.
* ``python_docs``: real English that ships with Python itself: the documentation topics of ``pydoc_data.topics``
  (~0.47 million characters) and the docstrings of the standard library's modules outside the test folders (~1.7
  million, read with ``ast``, nothing imported), one document per topic and per module, with a byte-level BPE
  tokenizer trained on the non-test documents with ``tokenizers`` and cached (a Hugging Face tokenizer folder).
  The corpus is the running Python's: its fingerprint (part of every cache key) changes with the Python version.
"""
from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdray.data.base import DataBundle, DatasetInfo, cached_arrays, data_dir, register_dataset
from kdray.data.lm import TEST_SEED, lm_bundle, lm_info, packed_splits, split_documents

if TYPE_CHECKING:  # pragma: no cover
    from kdray.data.base import DatasetSpec

# -- synthetic_lm: a hidden Markov language --------------------------------------------------------------------
SYNTHETIC_KEYS = ("vocab", "states", "seq_len", "train_sequences", "test_sequences", "seed", "concentration")
_SYNTHETIC = {"vocab": 64, "states": 16, "seq_len": 32, "train_sequences": 2000, "test_sequences": 400, "seed": 0,
              "concentration": 0.1}


def _synthetic_options(cfg: "DatasetSpec") -> dict[str, Any]:
    o = {**_SYNTHETIC, **cfg.options}
    for k in ("vocab", "states", "seq_len", "train_sequences", "test_sequences"):
        if not isinstance(o[k], int) or isinstance(o[k], bool) or o[k] < 2:
            raise ValueError(f"synthetic_lm option {k} must be an integer >= 2, got {o[k]!r}")
    if not float(o["concentration"]) > 0:
        raise ValueError(f"synthetic_lm option concentration must be > 0, got {o['concentration']!r}")
    return o


class HiddenMarkovLanguage:
    """Initial distribution ``pi`` (S,), transitions ``a`` (S, S), emissions ``b`` (S, V), all from one seed."""

    def __init__(self, vocab: int, states: int, seed: int, concentration: float) -> None:
        rng = np.random.default_rng([seed, 1])
        self.pi = rng.dirichlet(np.ones(states))
        self.a = rng.dirichlet(np.full(states, concentration), size=states)
        self.b = rng.dirichlet(np.full(vocab, concentration), size=states)

    def sample(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """(n, length) token sequences."""
        def draw(p: np.ndarray) -> np.ndarray:  # one categorical draw per row
            return (p.cumsum(1) > rng.random((p.shape[0], 1))).argmax(1)

        s = draw(np.broadcast_to(self.pi, (n, len(self.pi))))
        out = np.empty((n, length), np.int64)
        for t in range(length):
            out[:, t] = draw(self.b[s])
            s = draw(self.a[s])
        return out

    def next_token_logp(self, seqs: np.ndarray) -> np.ndarray:
        """(n, L) sequences -> (n, L - 1, V) float32: log p(x_{t+1} | x_1..x_t), exactly (the forward algorithm)."""
        n, length = seqs.shape
        out = np.empty((n, length - 1, self.b.shape[1]), np.float32)
        belief = self.pi[None, :] * self.b[:, seqs[:, 0]].T  # p(s_1, x_1), then normalised
        belief /= belief.sum(1, keepdims=True)
        for t in range(length - 1):
            state = belief @ self.a  # p(s_{t+1} | x_1..x_t)
            p = state @ self.b
            out[:, t] = np.log(np.maximum(p, 1e-300))
            belief = state * self.b[:, seqs[:, t + 1]].T
            belief /= belief.sum(1, keepdims=True)
        return out


def synthetic_tokenizer(cfg: "DatasetSpec", vocab: int) -> Path:
    """A word-level tokenizer whose ids are the language's tokens, written as ``t0 t1 ...`` (so a student of this
    language is saved, loaded and generates as any Hugging Face LM); cached under the data directory."""
    folder = data_dir(cfg) / "synthetic_lm" / f"tokenizer-v{vocab}"
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the tokens with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t0", pad_token="t0")
    save_tokenizer(fast, folder)
    return folder


def save_tokenizer(fast: Any, folder: Path) -> None:
    """Write a tokenizer folder whole or not at all (a concurrent writer's copy is the same)."""
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        fast.save_pretrained(tmp)
        try:
            Path(tmp).rename(folder)
        except OSError:  # another process wrote it first
            pass


def describe_synthetic(cfg: "DatasetSpec") -> DatasetInfo:
    o = _synthetic_options(cfg)
    return lm_info(o["seq_len"], o["vocab"], str(synthetic_tokenizer(cfg, o["vocab"])))


@register_dataset("synthetic_lm", describe_synthetic, offline=True, option_keys=SYNTHETIC_KEYS,
                  description="sequences of a random hidden Markov language (64 tokens, 16 states by default): the "
                              "true next-token distribution is known, so a student's KL to the truth is measured")
def load_synthetic(cfg: "DatasetSpec") -> DataBundle:
    o = _synthetic_options(cfg)
    lang = HiddenMarkovLanguage(o["vocab"], o["states"], int(o["seed"]), float(o["concentration"]))
    t = o["seq_len"]
    train = lang.sample(o["train_sequences"], t + 1, np.random.default_rng([int(o["seed"]), 2]))
    test = lang.sample(o["test_sequences"], t + 1, np.random.default_rng([int(o["seed"]), 3]))
    tr, va, _ = split_documents(len(train), cfg.val_fraction, cfg.split_seed, None)
    arrays: dict[str, np.ndarray] = {}
    for part, seqs in (("train", train[tr]), ("val", train[va]), ("test", test)):
        arrays[f"x_{part}"], arrays[f"y_{part}"] = seqs[:, :-1], seqs[:, 1:]
    for part in ("val", "test"):
        seqs = np.concatenate([arrays[f"x_{part}"], arrays[f"y_{part}"][:, -1:]], axis=1)
        arrays[f"true_logp_{part}"] = lang.next_token_logp(seqs)
    entropy = float(-(np.exp(arrays["true_logp_val"]) * arrays["true_logp_val"]).sum(-1).mean())
    return lm_bundle("synthetic_lm", describe_synthetic(cfg), arrays, cfg, {"true_entropy_val": entropy})


# -- python_docs: the standard library's documentation ---------------------------------------------------------
DOCS_KEYS = ("vocab_size", "seq_len", "max_documents", "test_fraction")
_SKIP = ("test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3")


def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    docs = [ast.get_docstring(n) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return "\n\n".join(d for d in docs if d)


def python_docs_corpus() -> list[str]:
    """The documents, in a fixed order: each pydoc topic, then each standard-library module's docstrings."""
    from pydoc_data.topics import topics

    docs = [f"{name}\n\n{topics[name]}" for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if any(p in _SKIP or p.startswith("test") for p in parts):
            continue
        text = _module_docstrings(path)
        if text:
            docs.append(f"{'.'.join(parts)[:-3]}\n\n{text}")
    return docs


def _docs_options(cfg: "DatasetSpec") -> dict[str, Any]:
    o = {"vocab_size": 2048, "seq_len": 128, "max_documents": None, "test_fraction": 0.1, **cfg.options}
    for k in ("vocab_size", "seq_len"):
        if not isinstance(o[k], int) or isinstance(o[k], bool) or o[k] < (260 if k == "vocab_size" else 2):
            raise ValueError(f"python_docs option {k} must be an integer >= {260 if k == 'vocab_size' else 2}, "
                             f"got {o[k]!r}")
    return o


_CORPUS: dict[str, Any] = {}


def _corpus() -> tuple[list[str], str]:
    """The documents and their content hash (read once per process)."""
    if "docs" not in _CORPUS:
        docs = python_docs_corpus()
        h = hashlib.sha256(sys.version.encode())
        for d in docs:
            h.update(d.encode())
        _CORPUS["docs"], _CORPUS["hash"] = docs, h.hexdigest()[:16]
    return _CORPUS["docs"], _CORPUS["hash"]


EOT = "<|endoftext|>"


def python_docs_tokenizer(cfg: "DatasetSpec") -> Path:
    """The tokenizer folder: byte-level BPE of ``vocab_size`` ids trained on every non-test document (so it does not
    change with ``split_seed``), cached under the data directory; written whole or not at all."""
    o = _docs_options(cfg)
    docs, digest = _corpus()
    key = hashlib.sha256(json.dumps([digest, o["vocab_size"], o["test_fraction"]]).encode()).hexdigest()[:12]
    folder = data_dir(cfg) / "python_docs" / f"tokenizer-{key}"
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _, _, test = split_documents(len(docs), 0.1, 0, o["test_fraction"])
    held = set(test.tolist())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=o["vocab_size"], special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d for i, d in enumerate(docs) if i not in held), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, unk_token=EOT, pad_token=EOT)
    save_tokenizer(fast, folder)
    return folder


def describe_python_docs(cfg: "DatasetSpec") -> DatasetInfo:
    from kdray.data.lm import load_tokenizer

    o = _docs_options(cfg)
    folder = python_docs_tokenizer(cfg)
    tok = load_tokenizer(str(folder))
    return lm_info(o["seq_len"], len(tok), str(folder), tok.eos_token_id)


@register_dataset("python_docs", describe_python_docs, offline=True, option_keys=DOCS_KEYS,
                  description="English from Python's own documentation (pydoc topics + standard-library docstrings, "
                              "~2.2 M characters), byte-level BPE trained locally, blocks of seq_len tokens")
def load_python_docs(cfg: "DatasetSpec") -> DataBundle:
    from kdray.data.lm import load_tokenizer

    o = _docs_options(cfg)
    info = describe_python_docs(cfg)
    docs, digest = _corpus()
    key = hashlib.sha256(json.dumps([digest, info.tokenizer, o, cfg.val_fraction, cfg.split_seed], default=str)
                         .encode()).hexdigest()[:16]

    def make() -> dict[str, np.ndarray]:
        tok = load_tokenizer(str(info.tokenizer))
        ids = [np.asarray(i, np.int64) for i in tok(docs, add_special_tokens=False)["input_ids"]]
        if o["max_documents"]:  # a fixed subset (the test documents stay those of the whole corpus)
            _, _, test = split_documents(len(ids), 0.1, 0, o["test_fraction"])
            keep = set(np.random.default_rng(TEST_SEED).permutation(
                [i for i in range(len(ids)) if i not in set(test.tolist())])[:int(o["max_documents"])].tolist())
            test_docs = ([ids[i] for i in test], None)
            ids = [ids[i] for i in sorted(keep)]
            return packed_splits(ids, None, o["seq_len"], info.eos_token_id, cfg, None, test_docs)
        return packed_splits(ids, None, o["seq_len"], info.eos_token_id, cfg, o["test_fraction"])

    arrays = cached_arrays(data_dir(cfg) / "python_docs" / f"blocks-{key}.npz", make)
    return lm_bundle("python_docs", info, arrays, cfg, {"corpus": digest})


__all__ = ["HiddenMarkovLanguage", "python_docs_corpus", "python_docs_tokenizer", "save_tokenizer"]
