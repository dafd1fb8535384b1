"""Batches for one rank: ``(sample_index, x, y)`` triples, sharded across DDP ranks.

The sample index (the position in the split, never the position in the batch) is what the
teacher-output cache is keyed by. In-memory splits are sliced directly (no per-sample collate, which
dominates the cost of small models); file-backed splits go through a ``DataLoader``.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DistributedSampler

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


def strong_view(x: Tensor, num_ops: int = 2, magnitude: int = 10) -> Tensor:
    """A strongly augmented copy of a (B, C, H, W) batch of [0, 1] images: torchvision's RandAugment
    (``num_ops`` random operations at ``magnitude``, FixMatch's strong augmentation, which MLKD trains with)
    applied to each image on its own, drawn from torch's global generator (the loop seeds it per rank and
    epoch, so a resumed run draws the same views)."""
    from torchvision.transforms import v2

    if x.dim() != 4:
        raise ValueError(f"a strong view needs image batches (B, C, H, W); got shape {tuple(x.shape)}")
    aug = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
    images = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    if images.shape[1] not in (1, 3):  # RandAugment's colour operations take grey or RGB images
        raise ValueError(f"a strong view needs 1 or 3 channels, got {images.shape[1]}")
    return torch.stack([aug(img) for img in images]).to(x.dtype).div_(255.0)


def to_float(x: Tensor) -> Tensor:
    """uint8 images to [0, 1] floats; float inputs unchanged."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


class _MergedBatches(torch.utils.data.Sampler[list[int]]):
    """Batches of ``sampler``'s indices cut by ``batch_bounds`` (the in-memory path's batches), for a
    ``DataLoader``'s ``batch_sampler``: its own batching would leave a trailing batch of one sample."""

    def __init__(self, sampler: torch.utils.data.Sampler[int], batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        return iter([order[s:e] for s, e in batch_bounds(len(order), self.batch_size)])

    def __len__(self) -> int:
        return len(batch_bounds(len(self.sampler), self.batch_size))  # type: ignore[arg-type]


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
        self.sampler: DistributedSampler | ShardSampler = (
            train_sampler(len(split), rank, world, seed) if train else ShardSampler(len(split), rank, world)
        )
        self.epoch = 0
        self.loader = None
        if not split.in_memory:
            pin = self.device.type == "cuda"
            self.loader = torch.utils.data.DataLoader(
                _WithIndex(split.dataset), batch_sampler=_MergedBatches(self.sampler, self.batch_size),
                num_workers=num_workers, pin_memory=pin, persistent_workers=num_workers > 0,
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(batch_bounds(len(self.sampler), self.batch_size))  # type: ignore[arg-type]

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
        order = torch.as_tensor(list(self.sampler), dtype=torch.int64, device=xs.device)
        for s, e in batch_bounds(len(order), self.batch_size):
            idx = order[s:e]
            x = to_float(xs[idx].to(self.device, non_blocking=True))
            if gen is not None:
                x = self.augment(x, gen)
            yield idx, x, ys[idx].to(self.device, non_blocking=True)
