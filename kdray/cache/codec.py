"""How a sample's teacher outputs are stored: top-k log-probabilities (exact when k covers every class), their class
indices and the remaining mass, and the cached feature maps, in float16 (:class:`Codec`); and which codec a sweep
can afford (:func:`plan_codec`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdray.knowledge import TapOutputs

BLOCK = 1024  # samples per stored block (consecutive sample indices)
MIN_LOGP = -1e4  # log-probabilities below this are stored as this (float16 keeps them finite)
CLAIM_TTL_S = 60.0  # rows taken on by a process that published nothing for this long are free again


@dataclass(frozen=True)
class Codec:
    """How one sample's teacher outputs are stored: top-k log-probabilities (+ indices and the remaining mass
    when k < C) and the cached feature maps, all in ``dtype``."""

    num_classes: int
    top_k: int
    features: tuple[tuple[str, tuple[int, ...]], ...] = ()
    dtype: str = "float16"

    @property
    def exact(self) -> bool:
        return self.top_k >= self.num_classes

    @property
    def layers(self) -> list[str]:
        return [name for name, _ in self.features]

    @property
    def index_dtype(self) -> np.dtype:
        return np.dtype(np.int16 if self.num_classes < 2**15 else np.int32)

    def fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Every stored array's per-sample shape and dtype."""
        dt = np.dtype(self.dtype)
        out: dict[str, tuple[tuple[int, ...], np.dtype]] = {"logp": ((min(self.top_k, self.num_classes),), dt)}
        if not self.exact:
            out["index"] = ((self.top_k,), self.index_dtype)
            out["tail"] = ((), np.dtype(np.float32))
        for name, shape in self.features:
            out["f:" + name] = (tuple(shape), dt)
        return out

    def bytes_per_sample(self, with_features: bool = True) -> int:
        return sum(math.prod(s) * d.itemsize for k, (s, d) in self.fields().items()
                   if with_features or not k.startswith("f:"))

    def empty(self, n: int) -> dict[str, np.ndarray]:
        return {k: np.zeros((n, *s), dtype=d) for k, (s, d) in self.fields().items()}

    @torch.no_grad()
    def encode(self, out: TapOutputs) -> tuple[dict[str, np.ndarray], float]:
        """Stored rows of a batch of teacher outputs (numpy, on the CPU), and the summed KL(p ‖ p̂) at T = 1 of
        the decoded distribution p̂ from the teacher's p (0 when exact): what truncation to top-k costs."""
        dt = getattr(torch, self.dtype)
        logp = torch.log_softmax(out.logits.float(), dim=1).clamp_min(MIN_LOGP)
        rows: dict[str, Tensor] = {}
        kl = 0.0
        if self.exact:
            rows["logp"] = logp.to(dt)
        else:
            vals, index = logp.topk(self.top_k, dim=1)
            rows["logp"] = vals.to(dt)
            rows["index"] = index.to(torch.int16 if self.index_dtype == np.int16 else torch.int32)
            rows["tail"] = (1.0 - vals.exp().sum(1)).clamp_min(0.0)
            kl = float((logp.exp() * (logp - self.dense_logits(rows))).sum())
        for name, _ in self.features:
            f = out.features[name].float()
            if dt == torch.float16:  # beyond float16's range a value would become inf
                f = f.clamp(-65504.0, 65504.0)
            rows["f:" + name] = f.to(dt)
        return {k: v.cpu().numpy() for k, v in rows.items()}, kl

    def decode(self, rows: dict[str, Tensor]) -> TapOutputs:
        """Teacher outputs as the losses take them: (B, C) float32 log-probabilities (every logit-based type is
        invariant to a per-sample shift of the logits) and float32 feature maps.

        With k < C the top-k classes keep their log-probabilities and the other C − k share the remaining mass
        equally; the losses (kd, dkd, dist, ...) then run unchanged on this sparse target made dense per batch
        (B × C floats, transient), which is the exact teacher distribution when k = C."""
        feats = {name: rows["f:" + name].float() for name, _ in self.features}
        return TapOutputs(self.dense_logits(rows), feats)

    def dense_logits(self, rows: dict[str, Tensor]) -> Tensor:
        """(B, C) float32 log-probabilities from stored rows (see :meth:`decode`)."""
        vals = rows["logp"].float()
        if self.exact:
            return vals
        rest = self.num_classes - self.top_k
        tail = torch.log(rows["tail"].float().clamp_min(1e-12) / rest).clamp_min(MIN_LOGP)
        logits = tail[:, None].expand(vals.shape[0], self.num_classes).clone()
        return logits.scatter_(1, rows["index"].long(), vals)


def default_top_k(num_classes: int) -> int:
    """Every class up to 128 classes (exact); 64 beyond (ImageNet: 1000 → 64, 256 bytes per sample)."""
    return num_classes if num_classes <= 128 else 64


def plan_codec(records: list[dict[str, Any]], data: Any, layers: list[str], cache_cfg: Any, max_epochs: int,
               ) -> tuple[Codec, str]:
    """The codec for this sweep, and a note on what is cached: logits always; feature maps only when every
    epoch of them fits ``cache.max_bytes``."""
    from kdray.data.loaders import train_views
    from kdray.data.views import ViewKey
    from kdray.models import Teacher

    n = len(data.train)
    teacher = Teacher.from_records(records)
    teacher.tap(layers)
    with torch.no_grad():
        probe = teacher(train_views(data.train, torch.arange(2), ViewKey(0, 1), data.augment, torch.device("cpu")))
    teacher.tap([])
    c = int(probe.logits.shape[1])
    k = min(cache_cfg.top_k or default_top_k(c), c)
    dtype = "float32" if cache_cfg.dtype == "float32" else "float16"
    full = Codec(c, k, tuple((name, tuple(probe.features[name].shape[1:])) for name in layers), dtype)
    logits_only = Codec(c, k, (), dtype)
    what = f"{'all ' + str(c) if k >= c else f'top-{k} of {c}'} classes in {dtype}"
    per_epoch = n * full.bytes_per_sample()
    if layers and per_epoch * max_epochs <= cache_cfg.max_bytes:
        codec = full
        what += f", + {len(layers)} feature map{'s' if len(layers) > 1 else ''}"
    else:
        codec = logits_only
        if layers:
            what += (f"; feature maps not cached ({per_epoch / 2**20:.1f} MiB per epoch x {max_epochs} epochs "
                     f"exceed cache.max_bytes): feature knowledge runs the teacher live")
    b = codec.bytes_per_sample()
    return codec, f"{what}; {b} bytes per sample, {n * b / 2**20:.2f} MiB per epoch"
