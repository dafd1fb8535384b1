"""Tensor helpers the losses share: pooling to a common size, maps of neurons, embeddings and their distances,
and pairing the tapped features of layer pairs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdray.knowledge.base import as_float


def resize_to(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """Adaptive average pooling of the spatial dims of ``x`` (B, C, *spatial) to ``size``."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(size)]
    return pool(x, size)


def common_size(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool two (B, C, *spatial) tensors to one spatial size (RepDistiller pools the larger map to
    the smaller). Same rank: each dim to the smaller of the two; different rank: both flattened, the longer
    pooled to the shorter length."""
    if a.dim() == b.dim():
        size = tuple(min(x, y) for x, y in zip(a.shape[2:], b.shape[2:]))
        return resize_to(a, size), resize_to(b, size)
    a, b = a.flatten(2), b.flatten(2)
    n = min(a.shape[2], b.shape[2])
    return resize_to(a, (n,)), resize_to(b, (n,))


def neuron_maps(f: Tensor) -> Tensor:
    """(B, C, *spatial) as is; a vector (B, D) is read as one neuron over D positions (as ``attention_map``)."""
    return f.unsqueeze(1) if f.dim() == 2 else f


def layer_pairs(f_s: list[Tensor] | Tensor, f_t: list[Tensor] | Tensor) -> tuple[list[Tensor], list[Tensor]]:
    if isinstance(f_s, Tensor):
        f_s = [f_s]
    if isinstance(f_t, Tensor):
        f_t = [f_t]
    if len(f_s) != len(f_t):
        raise ValueError(f"{len(f_s)} student features against {len(f_t)} teacher features")
    return [as_float(f) for f in f_s], [as_float(f) for f in f_t]


def embedding(f: Tensor) -> Tensor:
    """A (B, D) embedding from a tap: spatial maps are global-average-pooled first."""
    f = as_float(f)
    return f.flatten(2).mean(2) if f.dim() > 2 else f


def pairwise_distances(e: Tensor) -> Tensor:
    """Euclidean distance matrix of the rows of ``e`` (exactly 0 on the diagonal, gradient 0 there).

    ``torch.cdist`` on differences, not the Gram-matrix shortcut, whose cancellation loses the small
    distances of wide features."""
    return torch.cdist(e, e, compute_mode="donot_use_mm_for_euclid_dist")
