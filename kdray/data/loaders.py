"""Batches for one rank: ``(sample_index, x, y)`` triples, sharded across DDP ranks.

The sample index (the position in the split, never the position in the batch) is what the
teacher-output cache is keyed by. In-memory splits are sliced directly (no per-sample collate, which
dominates the cost of small models); file-backed splits go through a ``DataLoader``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from kdray.data.base import Split


def crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> Tensor:
    """Random crop with zero padding and random horizontal flip, for a whole (B, C, H, W) batch."""
    b, _, h, w = x.shape
    dev = x.device
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        i = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
        j = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
        rows = (i[:, None] + torch.arange(h, device=dev)[None]).view(b, 1, h, 1)
        cols = (j[:, None] + torch.arange(w, device=dev)[None]).view(b, 1, 1, w)
        chans = torch.arange(x.shape[1], device=dev).view(1, -1, 1, 1)
        x = xp[torch.arange(b, device=dev).view(b, 1, 1, 1), chans, rows, cols]
    if flip:
        mask = torch.rand(b, generator=generator, device=dev) < 0.5
        x = torch.where(mask.view(b, 1, 1, 1), x.flip(3), x)
    return x


class ShardSampler(torch.utils.data.Sampler[int]):
    """This rank's share of a split, reshuffled each epoch with the same seed on every rank.

    Training (``pad=True``): the permutation is padded by wrapping so that every rank gets the same
    number of samples (DDP needs equal step counts). Evaluation (``pad=False``, no shuffle): rank r
    takes samples r, r+W, r+2W, ... so that summing over ranks counts every sample exactly once.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = False, seed: int = 0, pad: bool = False):
        self.n, self.rank, self.world, self.shuffle, self.seed, self.pad = n, rank, world, shuffle, seed, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.pad and self.world > 1:
            total = math.ceil(self.n / self.world) * self.world
            if total > self.n:
                order = torch.cat([order, order[: total - self.n]])
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        if self.pad and self.world > 1:
            return math.ceil(self.n / self.world)
        return len(range(self.rank, self.n, self.world))


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of each batch; a trailing batch of one sample is merged into the previous one
    (BatchNorm cannot train on a single sample)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


def to_float(x: Tensor) -> Tensor:
    """uint8 images to [0, 1] floats; float inputs unchanged."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


class _WithIndex(torch.utils.data.Dataset):
    def __init__(self, ds: torch.utils.data.Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.ds[i]
        return i, x, y


class Batches:
    """Iterable over one epoch of ``(idx, x, y)`` batches of a split for one rank, on ``device``."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        train: bool,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
        augment=None,
        num_workers: int = 0,
    ) -> None:
        self.split, self.batch_size, self.train = split, int(batch_size), train
        self.device = torch.device(device)
        self.augment = augment if train else None
        self.seed, self.rank = seed, rank
        self.sampler = ShardSampler(len(split), rank, world, shuffle=train, seed=seed, pad=train)
        self.epoch = 0
        self.loader = None
        if not split.in_memory:
            pin = self.device.type == "cuda"
            self.loader = torch.utils.data.DataLoader(
                _WithIndex(split.dataset), batch_size=self.batch_size, sampler=self.sampler,
                num_workers=num_workers, pin_memory=pin, persistent_workers=num_workers > 0,
                drop_last=False,
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(batch_bounds(len(self.sampler.indices()), self.batch_size))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        gen = None
        if self.augment is not None:
            gen = torch.Generator(device=self.device).manual_seed((self.seed * 7919 + self.epoch) * 131 + self.rank)
        if self.loader is not None:
            for idx, x, y in self.loader:
                yield (idx.to(self.device, non_blocking=True), x.to(self.device, non_blocking=True),
                       y.to(self.device, non_blocking=True))
            return
        xs, ys = self.split.x, self.split.y
        # Index where the data lives (the caller moves small splits to the GPU once), then copy the batch.
        order = self.sampler.indices().to(xs.device)
        for s, e in batch_bounds(len(order), self.batch_size):
            idx = order[s:e]
            x = to_float(xs[idx].to(self.device, non_blocking=True))
            if gen is not None:
                x = self.augment(x, gen)
            yield idx, x, ys[idx].to(self.device, non_blocking=True)
