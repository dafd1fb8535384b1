"""Teacher outputs on fixed (not augmented) training inputs: one pass over the training split, kept by sample index
and shared with every trial through Ray's object store."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdray.cache.keys import cache_key
from kdray.data import Batches, DataBundle
from kdray.knowledge import TapOutputs
from kdray.models import Teacher
from kdray.models.checkpoint import combine


@dataclass
class TeacherCache:
    """Teacher logits and feature maps for every sample of one split, indexed by sample index. A language model's
    cache holds ``tokens`` instead of logits (:mod:`kdray.cache.tokens`: per block and position its top-k)."""

    key: str
    logits: np.ndarray | None
    features: dict[str, np.ndarray] = field(default_factory=dict)
    dtype: str = "float32"
    note: str = ""
    tokens: dict[str, np.ndarray] | None = None  # logp (N, T, k) float16; index (N, T, k), rest (N, T) unless exact
    vocab: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    members: np.ndarray | None = None  # an ensemble: each member's logits (N, M, C), so a trial combines by its rule
    feature_member: int = 0  # whose feature maps ``features`` holds

    @property
    def top_k(self) -> int:
        """Tokens stored per position (the vocabulary when exact)."""
        return int(self.tokens["logp"].shape[-1]) if self.tokens else 0

    @property
    def nbytes(self) -> int:
        arrays = [self.logits] if self.logits is not None else list((self.tokens or {}).values())
        arrays += [self.members] if self.members is not None else []
        return int(sum(a.nbytes for a in arrays) + sum(a.nbytes for a in self.features.values()))

    def __len__(self) -> int:
        return int((self.logits if self.logits is not None else self.tokens["logp"]).shape[0])


def plan_cache(n: int, shapes: dict[str, tuple[int, ...]], num_classes: int, max_bytes: int, dtype: str = "auto"):
    """Decide what to cache within the budget: (feature dtype, layers kept, note).

    Logits are always float32 (they are small, and KD at T=1 is sensitive to them). Features are
    float32 when they fit, float16 when only half fits; beyond that only the logits are cached and
    trials that need features run the teacher live.
    """
    logits_bytes = n * num_classes * 4
    feat_elems = sum(n * math.prod(s) for s in shapes.values())
    if dtype in ("auto", "float32") and logits_bytes + feat_elems * 4 <= max_bytes:
        return "float32", list(shapes), "all outputs in float32"
    if dtype in ("auto", "float16") and logits_bytes + feat_elems * 2 <= max_bytes:
        return "float16", list(shapes), "features in float16 to fit the memory budget"
    if logits_bytes <= max_bytes:
        return "float32", [], f"features ({feat_elems * 2 / 2**20:.0f} MiB in fp16) exceed the budget: logits only"
    return None, [], "even the logits exceed the memory budget: no cache"


@torch.no_grad()
def build_cache(
    records: list[dict[str, Any]], data: DataBundle, layers: list[str], max_bytes: int, dtype: str = "auto",
    device: torch.device | str = "cpu", batch_size: int = 512, feature_member: int = 0, members: bool = True,
) -> TeacherCache | None:
    """Run the teacher once over the training split and keep its outputs (``None`` if nothing fits): an ensemble's
    every member's logits too (unless ``members`` is False: no trial combines them by a rule other than the mean),
    so each trial combines them by its own rule; the feature maps of ``feature_member``."""
    device = torch.device(device)
    teacher = Teacher.from_records(records, feature_member=feature_member).to(device)
    ensemble = len(teacher.members) > 1 and members
    teacher.tap(layers)
    split = data.train
    n = len(split)
    # Shapes from one batch of two samples.
    probe = next(iter(Batches(split, 2, train=False, device=device)))[1]
    out = teacher(probe)
    shapes = {k: tuple(v.shape[1:]) for k, v in out.features.items()}
    # an ensemble's members' logits come out of the budget first (without them a trial's rule cannot be honoured)
    member_bytes = n * len(teacher.members) * int(out.logits.shape[1]) * 4 if ensemble else 0
    if member_bytes and member_bytes > max_bytes // 2:
        ensemble, member_bytes = False, 0  # too large: the mean only; trials with another rule run live
    feat_dtype, keep, note = plan_cache(n, shapes, out.logits.shape[1], max_bytes - member_bytes, dtype)
    if feat_dtype is None:
        return None
    if len(teacher.members) > 1:
        note += ("; each member's logits" if ensemble else "; the members' mean only (" + (
            "their logits exceed half the budget" if members else "every trial averages them") + ")")
    teacher.tap(keep)
    logits = np.empty((n, out.logits.shape[1]), dtype=np.float32)
    each = np.empty((n, len(teacher.members), out.logits.shape[1]), dtype=np.float32) if ensemble else None
    feats = {k: np.empty((n, *shapes[k]), dtype=np.dtype(feat_dtype)) for k in keep}
    for idx, x, _ in Batches(split, batch_size, train=False, device=device):
        i = idx.cpu().numpy()
        if ensemble:  # one pass: every member's logits, and their mean from them (as the live teacher makes it)
            member_logits, features = teacher.member_outputs(x)
            o = TapOutputs(combine(member_logits), features)
            each[i] = torch.stack(member_logits, dim=1).cpu().numpy()
        else:
            o = teacher(x)
        logits[i] = o.logits.float().cpu().numpy()
        for k in keep:
            feats[k][i] = o.features[k].to(torch.float16 if feat_dtype == "float16" else torch.float32).cpu().numpy()
    teacher.tap([])
    return TeacherCache(cache_key(records, data), logits, feats, feat_dtype, note, members=each,
                        feature_member=feature_member)
