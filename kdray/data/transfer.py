"""Unlabelled training samples: a *transfer set* (Buciluǎ, Caruana & Niculescu-Mizil, "Model Compression", KDD 2006;
Hinton, Vinyals & Dean 2015), labelled only by the teacher.

Two ways in, both on the training split only (validation and test stay labelled: selection and ``final`` measure the
student against the truth):

* ``dataset.labelled_fraction``: the labels of a seeded share of the training split are kept, the others hidden
  (``-100``): what most users have, a few labels among many samples;
* ``dataset.transfer``: another data set's training and validation inputs join the training split unlabelled (the same
  input shape and dtype; their labels, if any, are ignored; any sample equal to one of this data set's validation or
  test samples is dropped, so selection and ``final`` never see a sample that trained).

An unlabelled sample trains only through the knowledge terms: the cross-entropy is the mean over the batch's labelled
samples (:class:`~kdray.knowledge.DistillObjective` with ``partial_labels``), so a labels-only run (``none``) learns
from the labelled share alone, and a distilling one from all of it. With several DDP ranks or accumulated batches the
mean is over the labelled samples of all of them (the training loop's ``label_scale``, as a language model's loss is
normalised by the tokens of every rank): 2 ranks learn what one process learns on the whole batch. The teacher-output
cache covers every training sample, labelled or not.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np
import torch

HIDDEN = -100  # a hidden label: what cross_entropy's ignore_index skips


def has_unlabelled(cfg: Any) -> bool:
    return float(getattr(cfg, "labelled_fraction", 1.0)) < 1.0 or getattr(cfg, "transfer", None) is not None


def hide_labels(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """``y`` with all but a seeded ``fraction`` of its labels hidden (at least one kept)."""
    n = len(y)
    keep = max(1, int(round(n * fraction)))
    kept = torch.from_numpy(np.sort(np.random.default_rng([int(seed), 0x7AB]).permutation(n)[:keep]))
    out = torch.full_like(y, HIDDEN)
    out[kept] = y[kept]
    return out


def with_transfer(bundle: Any, cfg: Any, load: Any) -> Any:
    """The bundle (a :class:`~kdray.data.base.DataBundle`) with ``cfg``'s labels hidden and its transfer set appended
    to the training split (``load``: the data layer's loader, for the transfer set's own spec)."""
    if not has_unlabelled(cfg):
        return bundle
    if bundle.info.causal_lm:
        raise ValueError("dataset.labelled_fraction / dataset.transfer: a language model's data has no labels to "
                         "hide; its text is the transfer set already")
    train = bundle.train
    if not train.in_memory:
        raise ValueError(f"dataset.labelled_fraction / dataset.transfer need a data set held in memory; "
                         f"{bundle.name!r} reads its samples from files")
    x, y = train.x, train.y
    fraction = float(getattr(cfg, "labelled_fraction", 1.0))
    if fraction < 1.0:
        y = hide_labels(y, fraction, cfg.split_seed)
    h = hashlib.sha256(bundle.fingerprint.encode())
    h.update(repr(fraction).encode())
    added = 0
    spec = getattr(cfg, "transfer", None)
    if spec is not None:
        extra = load(spec)
        if extra.info.causal_lm or not extra.train.in_memory:
            raise ValueError(f"dataset.transfer: {extra.name!r} must be a classifier's data set held in memory")
        xs = torch.cat([extra.train.x, extra.val.x])
        if tuple(xs.shape[1:]) != tuple(x.shape[1:]) or xs.dtype != x.dtype:
            raise ValueError(f"dataset.transfer: {extra.name!r} has samples of shape {tuple(xs.shape[1:])} "
                             f"({str(xs.dtype).removeprefix('torch.')}), the data set "
                             f"{tuple(x.shape[1:])} ({str(x.dtype).removeprefix('torch.')})")
        # a transfer sample equal to a validation or test sample would put it in training: dropped
        held = {r.numpy().tobytes() for part in (bundle.val, bundle.test) if part.in_memory for r in part.x}
        xs = xs[torch.tensor([r.numpy().tobytes() not in held for r in xs], dtype=torch.bool)]
        x = torch.cat([x, xs])
        y = torch.cat([y, torch.full((len(xs),), HIDDEN, dtype=y.dtype)])
        added = len(xs)
        h.update(extra.fingerprint.encode())
    labelled = int((y != HIDDEN).sum())
    bundle.train = dataclasses.replace(train, y=y.contiguous(), x=x.contiguous())
    bundle.fingerprint = h.hexdigest()[:16]
    bundle.details = {**bundle.details, "train": len(y), "labelled": labelled, "transfer": added}
    return bundle


__all__ = ["HIDDEN", "has_unlabelled", "hide_labels", "with_transfer"]
