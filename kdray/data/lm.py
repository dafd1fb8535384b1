"""Language-model data: documents tokenised and packed into blocks of ``seq_len`` tokens, validation and test carved
by document with a fixed seed; and ``dataset: {name: text, ...}``, your own text.

A sample is a block: ``x`` (T,) token ids and ``y`` (T,) the next token at each position (-100 where a position is not
trained on: a prompt's tokens when the data has ``prompt_column`` + ``completion_column``). Blocks are consecutive
windows of one token stream per split (documents joined with the tokenizer's end-of-text token), overlapping by one
token so that every token is a target once; no position is padding. Every teacher-output cache keys a token by
(block, position), as a classifier's by sample.

``text`` reads plain-text files (one document per file), JSON lines, Parquet, or a folder written by ``save_to_disk``,
with ``text_column`` (default ``text``) or ``prompt_column`` + ``completion_column`` (the loss only on completions),
tokenised with ``tokenizer`` (a folder or hub id; default the teacher's own, for ``hf-lm/`` teachers).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdray.data.base import DataBundle, DatasetInfo, Split, cached_arrays, data_dir, register_dataset
from kdray.errors import DatasetUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from kdray.data.base import DatasetSpec

CAUSAL_LM = "causal_lm"
IGNORE = -100
TEST_SEED = 0  # the test documents never move: fixed, never split_seed


def split_documents(n: int, val_fraction: float, split_seed: int, test_fraction: float | None = 0.1
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Document indices (train, val, test): test fixed by :data:`TEST_SEED` (``test_fraction`` of all; None: no test
    carved), validation carved from the rest by ``split_seed``. Each part keeps at least one document."""
    if n < (3 if test_fraction else 2):
        raise ValueError(f"{n} document(s) cannot be split into train, validation{' and test' if test_fraction else ''}"
                         " parts: a language-model data set needs more documents")
    order = np.random.default_rng(TEST_SEED).permutation(n)
    n_test = max(1, int(round(n * test_fraction))) if test_fraction else 0
    test, rest = np.sort(order[:n_test]), order[n_test:]
    rest = rest[np.random.default_rng(split_seed).permutation(len(rest))]
    n_val = min(len(rest) - 1, max(1, int(round(len(rest) * val_fraction))))
    return np.sort(rest[n_val:]), np.sort(rest[:n_val]), test


def pack(docs: list[np.ndarray], masks: list[np.ndarray] | None, seq_len: int, eos: int | None
         ) -> tuple[np.ndarray, np.ndarray]:
    """Blocks (N, T) of inputs and targets from the documents' token ids; ``masks[i]`` says which tokens of document
    i are trained on as targets (None: all). Documents are joined by ``eos`` (itself a target), when given."""
    parts, keep = [], []
    for i, d in enumerate(docs):
        parts.append(np.asarray(d, dtype=np.int64))
        keep.append(np.ones(len(d), bool) if masks is None else np.asarray(masks[i], bool))
        if eos is not None:
            parts.append(np.array([eos], np.int64))
            keep.append(np.ones(1, bool))
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    trained = np.concatenate(keep) if keep else np.zeros(0, bool)
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(stream)} tokens do not fill one block of seq_len {seq_len} + 1")
    starts = np.arange(n)[:, None] * seq_len + np.arange(seq_len)[None, :]
    x, y = stream[starts], stream[starts + 1]
    y = np.where(trained[starts + 1], y, IGNORE)
    return x, y


def lm_info(seq_len: int, vocab: int, tokenizer: str | None, eos: int | None = None,
            prompt_len: int | None = None) -> DatasetInfo:
    return DatasetInfo((int(seq_len),), int(vocab), (int(seq_len),), input_dtype="int64", task=CAUSAL_LM,
                       tokenizer=tokenizer, eos_token_id=eos, prompt_len=prompt_len)


def lm_bundle(name: str, info: DatasetInfo, arrays: dict[str, np.ndarray], cfg: "DatasetSpec",
              details: dict[str, Any] | None = None) -> DataBundle:
    """A bundle from packed arrays ``{x,y}_{train,val,test}`` (and ``true_logp_{val,test}`` where the true next-token
    distribution is known); its fingerprint hashes the training and validation blocks and the options."""
    splits = {}
    for part in ("train", "val", "test"):
        x = torch.from_numpy(arrays[f"x_{part}"].astype(np.int64))
        y = torch.from_numpy(arrays[f"y_{part}"].astype(np.int64))
        aux = {"true_logp": torch.from_numpy(arrays[f"true_logp_{part}"])} if f"true_logp_{part}" in arrays else {}
        splits[part] = Split(y, x, aux=aux, prompt_len=info.prompt_len)
    h = hashlib.sha256()
    for part in ("train", "val"):
        h.update(arrays[f"x_{part}"].tobytes())
        h.update(arrays[f"y_{part}"].tobytes())
    h.update(repr((name, info, cfg.val_fraction, cfg.split_seed, sorted(cfg.options.items()))).encode())
    tokens = {p: int((s.y != IGNORE).sum()) for p, s in splits.items()}
    return DataBundle(name, info, splits["train"], splits["val"], splits["test"], fingerprint=h.hexdigest()[:16],
                      details={**{p: len(s) for p, s in splits.items()},
                               **{f"{p}_tokens": n for p, n in tokens.items()}, **(details or {})})


def packed_splits(docs: list[np.ndarray], masks: list[np.ndarray] | None, seq_len: int, eos: int | None,
                  cfg: "DatasetSpec", test_fraction: float | None = 0.1,
                  test_docs: tuple[list[np.ndarray], list[np.ndarray] | None] | None = None) -> dict[str, np.ndarray]:
    """Split documents (train / val / test, by document) and pack each part; ``test_docs`` given: the test part."""
    tr, va, te = split_documents(len(docs), cfg.val_fraction, cfg.split_seed, None if test_docs else test_fraction)
    pick = lambda ids: ([docs[i] for i in ids], None if masks is None else [masks[i] for i in ids])  # noqa: E731
    parts = {"train": pick(tr), "val": pick(va), "test": test_docs if test_docs else pick(te)}
    out = {}
    for part, (d, m) in parts.items():
        try:
            out[f"x_{part}"], out[f"y_{part}"] = pack(d, m, seq_len, eos)
        except ValueError as e:
            raise ValueError(f"the {part} split is too small: {e} (fewer or shorter documents than seq_len needs)"
                             ) from None
    return out


# -- tokenizers ------------------------------------------------------------------------------------------------
def load_tokenizer(name: str, field: str = "dataset.tokenizer") -> Any:
    """A Hugging Face tokenizer from a folder or hub id, or a ValueError naming ``field``."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DatasetUnavailable("text data sets need transformers: pip install transformers") from None
    path = Path(str(name)).expanduser()
    try:
        from kdray.models.hf import quiet_transformers

        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path) if path.is_dir() else str(name))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load tokenizer {name!r} ({field}): {str(e).strip().splitlines()[0]}") from None


def tokenizer_vocab(tok: Any) -> int:
    """The number of ids the tokenizer can produce (added tokens included)."""
    return int(len(tok))


def tokenizer_key(tok: Any) -> str:
    """What decides the ids: the whole fast tokenizer (vocabulary, normaliser, pre-tokeniser, added tokens)."""
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tok.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def eos_of(tok: Any) -> int | None:
    return tok.eos_token_id if tok.eos_token_id is not None else None


# -- text: your own --------------------------------------------------------------------------------------------
TEXT_KEYS = ("path", "text_column", "prompt_column", "completion_column", "tokenizer", "seq_len", "test_path",
             "test_fraction", "max_documents")
TEXT_SUFFIXES = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
                 ".pq": "parquet"}


def text_options(cfg: "DatasetSpec") -> dict[str, Any]:
    o = dict(cfg.options)
    if not o.get("path"):
        raise ValueError("data set 'text' needs `dataset.path`: text files, JSON lines, Parquet or a save_to_disk "
                         "folder")
    if not o.get("tokenizer"):
        raise ValueError("data set 'text' needs a tokenizer: set `dataset.tokenizer` (a folder or hub id); the "
                         "teacher's own is used when the teacher is hf-lm/...")
    seq_len = o.get("seq_len", 128)
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    prompt, completion = o.get("prompt_column"), o.get("completion_column")
    if (prompt is None) != (completion is None):
        raise ValueError("give both prompt_column and completion_column (the loss is on the completion), or neither")
    return {"path": o["path"], "text_column": o.get("text_column", "text"), "prompt_column": prompt,
            "completion_column": completion, "tokenizer": o["tokenizer"], "seq_len": seq_len,
            "test_path": o.get("test_path"), "test_fraction": float(o.get("test_fraction", 0.1)),
            "max_documents": o.get("max_documents")}


def _files(path: Any) -> tuple[str, list[Path]]:
    """(kind, files): ``disk`` for a save_to_disk folder, else ``text`` / ``json`` / ``parquet`` files."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    found: list[Path] = []
    for p in paths:
        f = Path(str(p)).expanduser()
        if f.is_dir():
            if any((f / n).is_file() for n in ("dataset_dict.json", "state.json")):
                return "disk", [f]
            found.extend(sorted(g for g in f.rglob("*") if g.suffix.lower() in TEXT_SUFFIXES and g.is_file()))
        elif f.is_file():
            found.append(f)
        else:
            raise DatasetUnavailable(f"text data set: no file or folder at {f} (dataset.path)")
    kinds = {TEXT_SUFFIXES.get(f.suffix.lower()) for f in found}
    if not found:
        raise ValueError(f"dataset.path {path!r} holds no .txt, .md, .jsonl, .json or .parquet file")
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"dataset.path: files must all be text (.txt, .md), JSON lines or Parquet, got "
                         f"{sorted({f.suffix for f in found})}")
    return kinds.pop(), found


def read_records(path: Any, columns: list[str]) -> list[dict[str, str]]:
    """Rows with ``columns`` from the files at ``path`` (plain text: one document per file, column ``text``)."""
    kind, files = _files(path)
    if kind == "text":
        if columns != ["text"]:
            raise ValueError(f"plain-text files hold one document each (column 'text'), not columns {columns}")
        return [{"text": f.read_text(encoding="utf-8", errors="replace")} for f in files]
    import datasets

    try:
        d = datasets.load_from_disk(str(files[0])) if kind == "disk" else datasets.load_dataset(
            kind, data_files=[str(f) for f in files], split="train")
    except (OSError, ValueError) as e:
        raise DatasetUnavailable(f"cannot read the text data set at {path}: {e}") from None
    if isinstance(d, datasets.DatasetDict):
        d = d["train"] if "train" in d else next(iter(d.values()))
    missing = [c for c in columns if c not in d.column_names]
    if missing:
        raise ValueError(f"column(s) {missing} not in the data set at {path}; its columns: {', '.join(d.column_names)}")
    return [dict(zip(columns, vals)) for vals in zip(*(d[c] for c in columns))]


def _file_state(path: Any) -> str:
    _, files = _files(path)
    h = hashlib.sha256()
    for f in files:
        for g in ([f] if f.is_file() else sorted(f.rglob("*"))):
            if g.is_file():
                st = g.stat()
                h.update(f"{g}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _tokenize(rows: list[dict[str, str]], tok: Any, opts: dict[str, Any]) -> tuple[list[np.ndarray], list]:
    """Each document's ids and which of them are targets: a tokenizer with its own beginning-of-text token (Llama,
    Gemma) starts every document with it (not a target: nothing predicts the start of a document); with prompt and
    completion columns only the completion's tokens are targets."""
    bos = tok.bos_token_id if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id else None
    head = [bos] if bos is not None else []
    docs, masks = [], []
    if opts["prompt_column"]:
        for r in rows:
            p = head + tok(str(r[opts["prompt_column"]]), add_special_tokens=False)["input_ids"]
            c = tok(str(r[opts["completion_column"]]), add_special_tokens=False)["input_ids"]
            docs.append(np.asarray(p + c, np.int64))
            masks.append(np.r_[np.zeros(len(p), bool), np.ones(len(c), bool)])
        return docs, masks
    col = opts["text_column"]
    for ids in tok([str(r[col]) for r in rows], add_special_tokens=False)["input_ids"]:
        docs.append(np.asarray(head + ids, np.int64))
        masks.append(np.r_[np.zeros(len(head), bool), np.ones(len(ids), bool)])
    return docs, masks


def _columns(opts: dict[str, Any]) -> list[str]:
    return [opts["prompt_column"], opts["completion_column"]] if opts["prompt_column"] else [opts["text_column"]]


def _column_names(path: Any) -> list[str] | None:
    """The columns of the data at ``path`` without reading its rows (None: plain text, one column ``text``)."""
    kind, files = _files(path)
    if kind == "text":
        return None
    if kind == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(files[0]).names)
    if kind == "json":
        with open(files[0], encoding="utf-8") as f:
            first = f.read(1 << 20).lstrip()
        try:
            row = json.loads(first.splitlines()[0]) if not first.startswith("[") else json.loads(first)[0]
        except (ValueError, IndexError, KeyError):
            return None  # not JSON lines of objects: reading it says why
        return list(row) if isinstance(row, dict) else None
    import datasets

    d = datasets.load_from_disk(str(files[0]))
    d = d[next(iter(d))] if isinstance(d, datasets.DatasetDict) else d
    return list(d.column_names)


def check_columns(opts: dict[str, Any]) -> None:
    """Every named column exists (``kdray check`` fails on a typo, naming the field, before anything is read)."""
    from kdray.errors import ConfigError

    have = _column_names(opts["path"])
    fields = ("prompt_column", "completion_column") if opts["prompt_column"] else ("text_column",)
    for field in fields:
        col = opts[field]
        if have is None and col != "text":
            raise ConfigError([(f"dataset.{field}", f"plain-text files hold one document each, in column 'text', "
                                                   f"not {col!r}")])
        if have is not None and col not in have:
            raise ConfigError([(f"dataset.{field}", f"column {col!r} is not in the data set at {opts['path']}; its "
                                                   f"columns: {', '.join(have)}")])


def describe_text(cfg: "DatasetSpec") -> DatasetInfo:
    opts = text_options(cfg)
    check_columns(opts)
    tok = load_tokenizer(opts["tokenizer"])
    return lm_info(opts["seq_len"], tokenizer_vocab(tok), str(opts["tokenizer"]), eos_of(tok))


@register_dataset("text", describe_text, offline=True, option_keys=TEXT_KEYS,
                  description="your own text for language models: text files, JSON lines, Parquet or a save_to_disk "
                              "folder, tokenised and packed into blocks of seq_len (prompt/completion: loss on the "
                              "completion)")
def load_text(cfg: "DatasetSpec") -> DataBundle:
    opts = text_options(cfg)
    tok = load_tokenizer(opts["tokenizer"])
    info = lm_info(opts["seq_len"], tokenizer_vocab(tok), str(opts["tokenizer"]), eos_of(tok))
    key = hashlib.sha256(json.dumps({**opts, "state": _file_state(opts["path"]),
                                     "test_state": _file_state(opts["test_path"]) if opts["test_path"] else None,
                                     "tok": tokenizer_key(tok), "val": cfg.val_fraction, "seed": cfg.split_seed},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]

    def make() -> dict[str, np.ndarray]:
        rows = read_records(opts["path"], _columns(opts))
        if opts["max_documents"]:
            rows = rows[:int(opts["max_documents"])]
        docs, masks = _tokenize(rows, tok, opts)
        test = _tokenize(read_records(opts["test_path"], _columns(opts)), tok, opts) if opts["test_path"] else None
        return packed_splits(docs, masks, opts["seq_len"], eos_of(tok), cfg, opts["test_fraction"], test)

    arrays = cached_arrays(data_dir(cfg) / "text" / f"text-{key}.npz", make)
    return lm_bundle("text", info, arrays, cfg, {"tokenizer": str(opts["tokenizer"])})


__all__ = ["CAUSAL_LM", "IGNORE", "lm_bundle", "lm_info", "load_tokenizer", "pack", "packed_splits", "split_documents",
           "tokenizer_key", "tokenizer_vocab"]
