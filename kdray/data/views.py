"""The augmented view of sample i in epoch e: a pure function of (seed, e, i).

Every random draw of kdray's augmentations (crop offsets, flips, RandAugment's operations, the random
transforms of a file-backed set) comes from a counter-based generator keyed by (seed, epoch, sample
index, stream), not from a generator that advances batch by batch. So the view of a sample depends on
neither the batch it lands in, nor the number of workers, nor the order of the epoch: every trial of a
sweep that shares the seed trains on exactly the same views. That is what lets teacher outputs be
computed once per (epoch, sample) and shared (:mod:`kdray.cache`), and it makes trials differ only
in what they search (common random numbers: a lower-noise comparison).

The generator is a 32-bit integer hash (Wellons' ``lowbias32``) applied to the key's words in turn, in
int64 tensor arithmetic that never overflows, so it gives the same numbers on CPU and GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MASK32 = 0xFFFFFFFF
# Streams: independent draws of one sample in one epoch.
CROP_ROW, CROP_COL, FLIP, STRONG, FILE = 1, 2, 3, 4, 5


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for 32-bit x, in 16-bit halves so int64 never overflows."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def _hash32(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons, "Hash Prospector"): a bijective 32-bit mix with low bias."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@dataclass(frozen=True)
class ViewKey:
    """The key of one epoch's views: (seed, epoch). ``bits(idx, stream)`` are the draws of those samples."""

    seed: int
    epoch: int

    def bits(self, idx: Tensor, stream: int) -> Tensor:
        """32 random bits (as int64) per sample index, for one stream."""
        words = (self.seed & MASK32, (self.seed >> 32) & MASK32, self.epoch & MASK32, stream & MASK32)
        h = torch.zeros((), dtype=torch.int64, device=idx.device)
        for w in words:
            h = _hash32(h ^ w)
        return _hash32(h ^ (idx.to(torch.int64) & MASK32))

    def uniform(self, idx: Tensor, stream: int) -> Tensor:
        """One float32 in [0, 1) per sample (24 bits: exactly representable)."""
        return (self.bits(idx, stream) >> 8).to(torch.float32) / float(1 << 24)

    def integers(self, idx: Tensor, stream: int, high: int) -> Tensor:
        """One integer in [0, high) per sample."""
        return (self.uniform(idx, stream) * high).floor().to(torch.int64).clamp_(max=high - 1)

    def sample_seed(self, i: int, stream: int) -> int:
        """A seed for torch's generator for one sample (for transforms that draw from torch's generator)."""
        return int(self.bits(torch.tensor([int(i)]), stream)[0])


def crop_flip(x: Tensor, idx: Tensor, key: ViewKey, pad: int = 4, flip: bool = True) -> Tensor:
    """Random crop with zero padding and random horizontal flip of a (B, C, H, W) batch, drawn per sample
    from ``key`` (sample ``idx[b]`` gets the same crop and flip whichever batch it is in)."""
    b, _, h, w = x.shape
    dev = x.device
    idx = idx.to(dev)
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        i = key.integers(idx, CROP_ROW, 2 * pad + 1)
        j = key.integers(idx, CROP_COL, 2 * pad + 1)
        rows = (i[:, None] + torch.arange(h, device=dev)[None]).view(b, 1, h, 1)
        cols = (j[:, None] + torch.arange(w, device=dev)[None]).view(b, 1, 1, w)
        chans = torch.arange(x.shape[1], device=dev).view(1, -1, 1, 1)
        x = xp[torch.arange(b, device=dev).view(b, 1, 1, 1), chans, rows, cols]
    if flip:
        mask = key.uniform(idx, FLIP) < 0.5
        x = torch.where(mask.view(b, 1, 1, 1), x.flip(3), x)
    return x


def strong_view(x: Tensor, idx: Tensor, key: ViewKey, num_ops: int = 2, magnitude: int = 10) -> Tensor:
    """A strongly augmented copy of a (B, C, H, W) batch of [0, 1] images: torchvision's RandAugment
    (``num_ops`` random operations at ``magnitude``, FixMatch's strong augmentation, which MLKD trains with)
    applied to each image on its own, its operations drawn from a generator seeded by (key, sample index).
    Torch's global generator is left as it was."""
    from torchvision.transforms import v2

    if x.dim() != 4:
        raise ValueError(f"a strong view needs image batches (B, C, H, W); got shape {tuple(x.shape)}")
    aug = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
    images = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    if images.shape[1] not in (1, 3):  # RandAugment's colour operations take grey or RGB images
        raise ValueError(f"a strong view needs 1 or 3 channels, got {images.shape[1]}")
    seeds = (key.bits(idx.to(x.device), STRONG)).tolist()
    out = []
    with torch.random.fork_rng(devices=[]):  # RandAugment draws its operations from the CPU generator
        for img, s in zip(images, seeds):
            torch.default_generator.manual_seed(s)
            out.append(aug(img))
    return torch.stack(out).to(x.dtype).div_(255.0)
