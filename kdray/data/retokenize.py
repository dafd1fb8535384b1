"""Teachers of another tokenizer: how a model's own tokenizer relates to the data's, and the data's rows re-read in
the teacher's tokens with their answers aligned (what ``uld`` compares, :mod:`kdray.knowledge.uld`).

A row's *answer* is its target span as Boizard et al.'s reference takes it (llm-recipes
``models/distillation_model.py`` ``__get_start_and_size_answers``): from the first target that is not -100, as many
positions as there are targets. For each model the row is split there into text (the prompt: the inputs up to the
first target's position; the answer: the targets) and re-tokenised by the teacher: ordinary tokens as text (each run
decoded as the continuation of what precedes it, so a SentencePiece word keeps its leading space), special tokens by
role (the data's end token becomes the teacher's, its padding the teacher's padding, one the teacher lacks is
dropped), the teacher's beginning-of-text token first where it has one, as the reference's rows are ``bos + prompt``
and ``answer + eos`` in each model's tokenizer. The teacher's row is its prompt tokens then its answer tokens; its
answer starts at the logits of the last prompt token.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IGNORE = -100
SAME, PREFIX, OTHER = "same", "prefix", "other"


def own_tokenizer_folder(model_name: str | None) -> Path | None:
    """The folder of an ``hf-lm/<folder>`` model that ships its own tokenizer, else None."""
    name = str(model_name or "")
    if not name.startswith("hf-lm/"):
        return None
    folder = Path(name[len("hf-lm/"):]).expanduser()
    return folder if (folder / "tokenizer_config.json").is_file() else None


def vocabulary_relation(own: Any, data: Any) -> str:
    """``same`` (one vocabulary), ``prefix`` (``own`` holds the data's tokens at the same ids, then more: a padded
    or extended vocabulary) or ``other``."""
    mine, theirs = own.get_vocab(), data.get_vocab()
    if mine == theirs:
        return SAME
    if all(mine.get(token) == i for token, i in theirs.items()):
        return PREFIX
    return OTHER


def cross_tokenizer(model_name: str | None, data_tokenizer: str | None) -> Path | None:
    """The teacher's tokenizer folder when its vocabulary is neither the data's nor an extension of it (a teacher
    that ``uld`` alone can distil), else None."""
    folder = own_tokenizer_folder(model_name)
    if folder is None or not data_tokenizer:
        return None
    if folder.resolve() == Path(str(data_tokenizer)).expanduser().resolve():
        return None
    from kdray.data.lm import load_tokenizer

    return folder if vocabulary_relation(load_tokenizer(str(folder)), load_tokenizer(str(data_tokenizer))) == OTHER \
        else None


def answer_spans(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, T) targets -> (start, size): each row's first target position (0 when it has none) and its number of
    targets."""
    y = np.asarray(y)
    valid = y != IGNORE
    size = valid.sum(axis=1)
    start = np.where(size > 0, valid.argmax(axis=1), 0)
    return start.astype(np.int64), size.astype(np.int64)


@dataclass
class CrossRows:
    """The training rows in the teacher's tokens: ``ids`` (N, T') right-padded with ``pad``, the position of the
    logits that predict each row's first answer token ``start`` (N,) and the answer's length ``size`` (N,)."""

    ids: np.ndarray
    start: np.ndarray
    size: np.ndarray


ROLES = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def special_map(data_tok: Any, teacher: dict[str, Any]) -> dict[int, int | None]:
    """The data's special ids -> the teacher's for the same role (beginning, end, padding, unknown); None: the
    teacher has no such token and it is dropped. A special token is never handed to the teacher as its text."""
    out: dict[int, int | None] = {}
    for role in ROLES:
        i = getattr(data_tok, role, None)
        if i is not None and int(i) not in out:
            out[int(i)] = teacher.get(role)
    return out


def _reread(ids: list[int], boundary: int, data_tok: Any, teacher_tok: Any, specials: dict[int, int | None]
            ) -> tuple[list[int], list[int]]:
    """One row's ids (prompt then answer, split at ``boundary``) -> the teacher's prompt and answer ids. Runs of
    ordinary tokens become text as a continuation of everything before them (so the space a SentencePiece tokenizer
    folds into the next token stays with it) and are tokenised by the teacher; special tokens map by role."""
    text = lambda k: data_tok.decode(ids[:k], skip_special_tokens=True,  # noqa: E731
                                     clean_up_tokenization_spaces=False)
    parts: tuple[list[int], list[int]] = ([], [])
    cuts = sorted({0, boundary, len(ids), *[k for k, t in enumerate(ids) if t in specials],
                   *[k + 1 for k, t in enumerate(ids) if t in specials]})
    for a, b in zip(cuts, cuts[1:]):
        side = parts[0] if a < boundary else parts[1]
        if b - a == 1 and ids[a] in specials:
            if specials[ids[a]] is not None:
                side.append(int(specials[ids[a]]))
            continue
        piece = text(b)[len(text(a)):]
        if piece:
            side.extend(teacher_tok(piece, add_special_tokens=False)["input_ids"])
    return parts


def retokenize(x: np.ndarray, y: np.ndarray, data_tok: Any, teacher_tok: Any, teacher: dict[str, Any] | None = None,
               max_len: int | None = None) -> CrossRows:
    """(N, T) inputs and targets in the data's tokens -> :class:`CrossRows` in the teacher's. ``teacher``: its
    special ids by role (``tokenizer_spec``; padding with its ``pad``); the teacher's beginning-of-text token starts
    every row where it has one, as the reference's rows (``bos + prompt``). ``max_len``: the teacher's positions (a
    longer row is a ValueError naming it). A row whose targets are not one span (several answers in a block) is a
    ValueError: uld aligns one answer per row."""
    x, y = np.asarray(x), np.asarray(y)
    teacher = teacher or {}
    start, size = answer_spans(y)
    valid = y != IGNORE
    span = np.arange(y.shape[1])[None, :]
    inside = (span >= start[:, None]) & (span < (start + size)[:, None])
    if (valid != inside).any():
        row = int(np.nonzero((valid != inside).any(1))[0][0])
        raise ValueError(f"row {row} has more than one answer (its targets are not one span): uld aligns one answer "
                         "per row, as prompt/answer data sets (lm_tasks) hold them")
    specials = special_map(data_tok, teacher)
    bos = teacher.get("bos_token_id")
    rows, t_start, t_size = [], [], []
    for i in range(len(x)):
        ids = [int(t) for t in x[i, : start[i] + 1]] + [int(t) for t in y[i, start[i]: start[i] + size[i]]]
        p, ans = _reread(ids, int(start[i]) + 1, data_tok, teacher_tok, specials)
        if bos is not None and (not p or p[0] != bos):
            p = [int(bos)] + p
        if not p:
            raise ValueError(f"row {i}'s prompt is empty in the teacher's tokens: its answer has no logits to start at")
        rows.append(p + ans[:-1])  # the last answer token is predicted, never read (as the data's own rows)
        t_start.append(len(p) - 1)
        t_size.append(len(ans))
    width = max(len(r) for r in rows)
    if max_len is not None and width > max_len:
        raise ValueError(f"a row is {width} tokens long in the teacher's tokenizer, more than its {max_len} positions")
    ids = np.full((len(rows), width), int(teacher.get("pad", 0)), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return CrossRows(ids, np.asarray(t_start, np.int64), np.asarray(t_size, np.int64))


def tokenizer_of_record(record: dict[str, Any]) -> Any | None:
    """The tokenizer a teacher record carries (``record["tokenizer"]``: its ``tokenizer.json`` and padding id), as a
    fast tokenizer; None when it has none (it reads the data's tokens)."""
    spec = record.get("tokenizer")
    if not spec:
        return None
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(spec["json"]))


def tokenizer_spec(folder: str | Path) -> dict[str, Any]:
    """What a teacher record carries of its own tokenizer, so a worker without the folder re-reads the rows."""
    from kdray.data.lm import load_tokenizer

    tok = load_tokenizer(str(folder), "teacher.name")
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"the tokenizer of {folder} has no fast (tokenizers) form to carry to the workers")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return {"json": backend.to_str(), "pad": int(pad), "vocab": len(tok), "folder": str(folder),
            **{role: (None if getattr(tok, role) is None else int(getattr(tok, role))) for role in ROLES}}


__all__ = ["CrossRows", "OTHER", "PREFIX", "ROLES", "SAME", "answer_spans", "cross_tokenizer", "own_tokenizer_folder",
           "retokenize", "special_map", "tokenizer_of_record", "tokenizer_spec", "vocabulary_relation"]
