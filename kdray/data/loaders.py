"""Batches for one rank: ``(sample_index, x, y)`` triples, sharded across DDP ranks.

The sample index (the position in the split, never the position in the batch) is what the
teacher-output cache is keyed by. In-memory splits are sliced directly (no per-sample collate, which
dominates the cost of small models); file-backed splits go through a ``DataLoader``.
"""
from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from kdray.data.base import Split
from kdray.data.views import FILE, ViewKey


class ShardSampler(torch.utils.data.Sampler[int]):
    """Evaluation shard of rank r: samples r, r+W, r+2W, ..., in order.

    Summing per-rank counts over ranks then counts every sample exactly once. Not ``DistributedSampler``:
    it pads the last shard with repeated samples, which would count them twice in validation metrics.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.rank, self.world = n, rank, world

    def set_epoch(self, epoch: int) -> None:
        """Evaluation order does not change between epochs."""

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def train_sampler(n: int, rank: int = 0, world: int = 1, seed: int = 0) -> DistributedSampler:
    """Training shard of one rank: a permutation reshuffled by ``set_epoch``, the same on every rank, and
    padded by wrapping so that every rank takes the same number of steps (DDP needs equal step counts)."""
    # DistributedSampler seeds its permutation with seed + epoch; spreading the seeds keeps the runs of
    # seeds s and s + 1 from sharing their shuffles one epoch apart.
    return DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed * 1_000_003,
                              drop_last=False)


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


class _MergedBatches(torch.utils.data.Sampler[list[int]]):
    """Batches of ``sampler``'s indices cut by ``batch_bounds`` (the in-memory path's batches), for a
    ``DataLoader``'s ``batch_sampler``: its own batching would leave a trailing batch of one sample."""

    def __init__(self, sampler: torch.utils.data.Sampler[int], batch_size: int, seed: int | None = None) -> None:
        self.sampler, self.batch_size, self.seed = sampler, batch_size, seed
        self.epoch = 0

    def __iter__(self) -> Iterator[list]:
        order = list(self.sampler)
        if self.seed is not None:  # training: every item carries its view key (seed, epoch, i)
            order = [(self.seed, self.epoch, i) for i in order]
        return iter([order[s:e] for s, e in batch_bounds(len(order), self.batch_size)])

    def __len__(self) -> int:
        return len(batch_bounds(len(self.sampler), self.batch_size))  # type: ignore[arg-type]


class _WithIndex(torch.utils.data.Dataset):
    """``(i, x, y)``; an item ``(seed, epoch, i)`` draws the dataset's random transforms from a generator seeded
    by that key, so a file-backed set's training view of sample i in epoch e is the same in every trial."""

    def __init__(self, ds: torch.utils.data.Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, item):
        if isinstance(item, tuple):
            seed, epoch, i = item
            state = random.getstate()  # some transforms draw from Python's generator
            with torch.random.fork_rng(devices=[]):
                s = ViewKey(seed, epoch).sample_seed(i, FILE)
                torch.default_generator.manual_seed(s)
                random.seed(s)
                x, y = self.ds[i]
            random.setstate(state)
        else:
            i = item
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
        self.sampler: DistributedSampler | ShardSampler = (
            train_sampler(len(split), rank, world, seed) if train else ShardSampler(len(split), rank, world)
        )
        self.epoch = 0
        self.loader = None
        if not split.in_memory:
            pin = self.device.type == "cuda"
            self.batch_sampler = _MergedBatches(self.sampler, self.batch_size, seed if train else None)
            self.loader = torch.utils.data.DataLoader(
                _WithIndex(split.dataset), batch_sampler=self.batch_sampler,
                num_workers=num_workers, pin_memory=pin, persistent_workers=num_workers > 0,
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)
        if self.loader is not None:
            self.batch_sampler.epoch = epoch

    def __len__(self) -> int:
        return len(batch_bounds(len(self.sampler), self.batch_size))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        key = ViewKey(self.seed, self.epoch)
        if self.loader is not None:
            for idx, x, y in self.loader:
                yield (idx.to(self.device, non_blocking=True), x.to(self.device, non_blocking=True),
                       y.to(self.device, non_blocking=True))
            return
        xs, ys = self.split.x, self.split.y
        # Index where the data lives (the caller moves small splits to the GPU once), then copy the batch.
        order = torch.as_tensor(list(self.sampler), dtype=torch.int64, device=xs.device)
        for s, e in batch_bounds(len(order), self.batch_size):
            idx = order[s:e]
            yield idx, train_views(self.split, idx, key, self.augment, self.device), ys[idx].to(self.device,
                                                                                               non_blocking=True)


def train_views(split: Split, idx: Tensor, key: ViewKey, augment, device: torch.device) -> Tensor:
    """The inputs of samples ``idx`` of a training split as training sees them in ``key``'s epoch (augmented
    when ``augment`` is given, or by a file-backed set's own keyed transforms), as floats on ``device``: what
    the loop and the teacher-output producer share."""
    if not split.in_memory:  # read and transformed one by one, as the training loader's workers do
        ds = _WithIndex(split.dataset)
        return to_float(torch.stack([ds[(key.seed, key.epoch, int(i))][1] for i in idx.tolist()])).to(device)
    x = to_float(split.x[idx.to(split.x.device)].to(device, non_blocking=True))
    return augment(x, idx.to(device), key) if augment is not None else x
