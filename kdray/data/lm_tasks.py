"""``lm_tasks``: generated tasks with exact answers (addition, sorting, copying), for comparing distillation choices
on what a language model generates, not only on its next-token NLL.

Every row is one example, ``prompt`` then ``answer`` then the end token, in a character vocabulary of 17 tokens
(digits, ``+ = A S C``, ``.`` the end, ``_`` padding):

* ``add``: ``A`` a ``+`` b ``=`` -> a + b, operands of ``digits`` digits, the sum zero-padded to digits + 1;
* ``sort``: ``S`` ``items`` digits ``=`` -> the digits in ascending order;
* ``copy``: ``C`` ``items`` digits ``=`` -> the same digits.

Every prompt has the same length (shorter bodies are left-padded with ``_``), so a batch's prompts are its first
``prompt_len`` tokens: what on-policy distillation generates from and what ``val_exact_match`` greedily completes.
The targets are the answer and its end token; the padding after a short answer is not trained on (-100). The test
examples come from their own seed; no training or validation row shares a prompt with a test row or with another
training or validation row.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from kdray.data.base import DataBundle, DatasetInfo, cached_arrays, data_dir, register_dataset
from kdray.data.lm import IGNORE, lm_bundle, lm_info, split_documents

if TYPE_CHECKING:  # pragma: no cover
    from kdray.data.base import DatasetSpec

TASKS = ("add", "sort", "copy")
VOCAB = ("_", ".", *"0123456789", "+", "=", "A", "S", "C")  # id = position
PAD, END = 0, 1
ID = {t: i for i, t in enumerate(VOCAB)}
TASK_KEYS = ("tasks", "digits", "items", "train_examples", "test_examples", "seed")
ROWS_VERSION = 2  # in the cached rows' key: 2 keeps one row per prompt (1 let a prompt be in train and validation)
_DEFAULTS = {"tasks": list(TASKS), "digits": 2, "items": 5, "train_examples": 3000, "test_examples": 300, "seed": 0}


def task_options(cfg: "DatasetSpec") -> dict[str, Any]:
    o = {**_DEFAULTS, **cfg.options}
    tasks = o["tasks"] if isinstance(o["tasks"], list) else [o["tasks"]]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"lm_tasks option tasks: unknown {bad[0]!r}; known: {', '.join(TASKS)}" if bad else
                         "lm_tasks option tasks: name at least one of " + ", ".join(TASKS))
    for k, low in (("digits", 1), ("items", 1), ("train_examples", 10), ("test_examples", 1)):
        if not isinstance(o[k], int) or isinstance(o[k], bool) or o[k] < low:
            raise ValueError(f"lm_tasks option {k} must be an integer >= {low}, got {o[k]!r}")
    return {**o, "tasks": list(dict.fromkeys(tasks))}


def layout(o: dict[str, Any]) -> tuple[int, int]:
    """(prompt length, answer length with its end token) of every row of these options."""
    body = max(2 * o["digits"] + 1 if "add" in o["tasks"] else 0,
               o["items"] if {"sort", "copy"} & set(o["tasks"]) else 0)
    answer = max(o["digits"] + 1 if "add" in o["tasks"] else 0, o["items"] if {"sort", "copy"} & set(o["tasks"]) else 0)
    return body + 2, answer + 1


def example(task: str, rng: np.random.Generator, o: dict[str, Any]) -> tuple[str, str]:
    """One (prompt body, answer) of ``task``, as characters."""
    if task == "add":
        a, b = (int(rng.integers(0, 10 ** o["digits"])) for _ in range(2))
        return f"{a:0{o['digits']}d}+{b:0{o['digits']}d}", f"{a + b:0{o['digits'] + 1}d}"
    digits = "".join(str(d) for d in rng.integers(0, 10, o["items"]))
    return digits, "".join(sorted(digits)) if task == "sort" else digits


def encode(task: str, body: str, answer: str, prompt_len: int, row_len: int) -> np.ndarray:
    """A row of ids: ``_``-padding, the task letter, the body, ``=``, the answer, ``.``, then ``_`` to ``row_len``."""
    letter = {"add": "A", "sort": "S", "copy": "C"}[task]
    prompt = [PAD] * (prompt_len - len(body) - 2) + [ID[letter]] + [ID[c] for c in body] + [ID["="]]
    row = prompt + [ID[c] for c in answer] + [END]
    return np.asarray(row + [PAD] * (row_len - len(row)), np.int64)


def make_rows(n: int, o: dict[str, Any], stream: int) -> np.ndarray:
    """(n, row_len) rows from the seeded stream ``stream`` (0: train and validation, 1: test)."""
    rng = np.random.default_rng([int(o["seed"]), stream])
    p, a = layout(o)
    rows = []
    for _ in range(n):
        task = o["tasks"][int(rng.integers(0, len(o["tasks"])))]
        body, answer = example(task, rng, o)
        rows.append(encode(task, body, answer, p, p + a))
    return np.stack(rows)


def to_blocks(rows: np.ndarray, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows -> inputs ``x = row[:-1]`` and targets ``y = row[1:]``: the answer and its end token; -100 on the
    prompt and on the padding after the end."""
    x, y = rows[:, :-1], rows[:, 1:].copy()
    position = np.arange(y.shape[1])[None, :]
    after_end = np.cumsum(rows[:, :-1] == END, axis=1) > 0  # x already holds the end: nothing left to predict
    after_end &= position >= prompt_len
    y[(position < prompt_len - 1) | after_end] = IGNORE
    return x, y


def describe_tasks(cfg: "DatasetSpec") -> DatasetInfo:
    o = task_options(cfg)
    p, a = layout(o)
    return lm_info(p + a - 1, len(VOCAB), str(task_tokenizer(cfg)), END, prompt_len=p)


def task_tokenizer(cfg: "DatasetSpec") -> Any:
    """A character tokenizer of :data:`VOCAB` (a Hugging Face tokenizer folder, cached), so a student of these tasks
    is saved, loaded and generates as any Hugging Face LM."""
    from kdray.data.lm_builtin import save_tokenizer

    folder = data_dir(cfg) / "lm_tasks" / f"tokenizer-{len(VOCAB)}"
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(dict(ID), unk_token="_"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="_", eos_token=".", pad_token="_")
    save_tokenizer(fast, folder)
    return folder


@register_dataset("lm_tasks", describe_tasks, offline=True, option_keys=TASK_KEYS,
                  description="generated prompt/answer rows with exact answers (add, sort, copy) in a 17-token "
                              "character vocabulary: val_exact_match measures greedy generation; on_policy needs it")
def load_tasks(cfg: "DatasetSpec") -> DataBundle:
    o = task_options(cfg)
    info = describe_tasks(cfg)
    p = int(info.prompt_len or 0)
    key = hashlib.sha256(json.dumps([ROWS_VERSION, o, cfg.val_fraction, cfg.split_seed], sort_keys=True).encode()
                         ).hexdigest()[:16]

    def make() -> dict[str, np.ndarray]:
        test = make_rows(o["test_examples"], o, 1)
        rows = make_rows(o["train_examples"], o, 0)
        held = {r[:p].tobytes() for r in test}
        seen: set[bytes] = set()  # one row per prompt: a prompt in both training and validation would be memorised
        keep = []
        for r in rows:
            key = r[:p].tobytes()
            keep.append(key not in held and key not in seen)
            seen.add(key)
        rows = rows[np.array(keep)]
        tr, va, _ = split_documents(len(rows), cfg.val_fraction, cfg.split_seed, None)
        out = {}
        for part, r in (("train", rows[tr]), ("val", rows[va]), ("test", test)):
            out[f"x_{part}"], out[f"y_{part}"] = to_blocks(r, p)
        return out

    arrays = cached_arrays(data_dir(cfg) / "lm_tasks" / f"rows-{key}.npz", make)
    return lm_bundle("lm_tasks", info, arrays, cfg, {"prompt_len": p, "tasks": ",".join(o["tasks"])})


def decode(ids: Any) -> str:
    """Ids -> characters (for messages and tests)."""
    return "".join(VOCAB[int(i)] for i in ids if 0 <= int(i) < len(VOCAB))


__all__ = ["END", "PAD", "TASKS", "VOCAB", "decode", "layout", "make_rows", "to_blocks"]
