"""What the knowledge property tests share: hypothesis settings, the extreme inputs, building a type, the check.

Inputs are drawn as a handful of parameters (seed, batch size, margin, temperature, scale, which side is
constant or duplicated, bf16) and built from a seeded ``torch.Generator``, so an example costs milliseconds.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import Tensor

from kdray.knowledge import DistillObjective, ModelLayout

# Derandomized and without a database: every run draws the same examples (no flaky failures, no .hypothesis/).
# KDRAY_PROPERTY_EXAMPLES raises the count for a deeper local run.
SETTINGS = settings(max_examples=int(os.environ.get("KDRAY_PROPERTY_EXAMPLES", "20")), deadline=None,
                    derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def assert_close(got: Tensor, want: Tensor | float, rel: float = 1e-4, atol: float = 0.0) -> None:
    """``got`` (kdray, float32) is a finite scalar within ``max(rel |want|, atol)`` of the float64 ``want``."""
    assert got.dtype == torch.float32, got.dtype
    g, w = float(got.detach()), float(want.detach() if isinstance(want, Tensor) else want)
    assert math.isfinite(g), f"kdray gives {g} (float64 reference {w!r})"
    assert math.isfinite(w), f"the reference gives {w}"
    err = abs(g - w)
    assert err <= max(rel * abs(w), atol), (
        f"kdray {g!r} vs float64 {w!r}: error {err:.3g}, relative {err / max(abs(w), 1e-300):.3g}, atol {atol:.3g}")


LAYOUT = ModelLayout(("f1", "f2"), "e", ("a",), ("v",))


def build(name: str, teacher: dict[str, Tensor], student: dict[str, Tensor], epoch: int = 100,
          num_train: int | None = None, **params):
    """A knowledge type with its default layers (``LAYOUT`` on both sides) bound to the taps' shapes; its
    connectors are drawn from a fixed seed without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        k = DistillObjective.from_specs([{"type": name, **params}], LAYOUT, LAYOUT).knowledge[name]
        if num_train is not None:
            k.bind_data(num_train)
        k.bind(teacher, student)
    k.set_epoch(epoch)
    return k


SIDES = st.sampled_from([None, "student", "teacher", "both"])
SCALES = st.sampled_from([1e-4, 1.0, 1e4])
MARGINS = st.one_of(st.just(50.0), st.floats(0.0, 50.0))
SEEDS = st.integers(0, 2**31 - 1)


def on(side: str | None, who: str) -> bool:
    return side in (who, "both")


# -- logits ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Logits:
    seed: int
    batch: int
    classes: int
    margin: float
    temperature: float
    confident: str  # whose true class leads by the margin: student, teacher or both
    duplicate: str | None  # whose rows 0 and 1 are the same sample
    bf16: bool


logit_cases = st.builds(Logits, SEEDS, st.sampled_from([2, 3, 8]), st.sampled_from([2, 5, 100]), MARGINS,
                        st.sampled_from([1.0, 4.0, 20.0]), st.sampled_from(["student", "teacher", "both"]), SIDES,
                        st.booleans())


def make_logits(c: Logits, seed_offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Student logits N(0, 1), teacher N(0, 9), the confident side's true class ``margin`` above its largest
    other logit; duplicated rows share their label. bf16 cases return bf16 tensors."""
    g = torch.Generator().manual_seed(c.seed + seed_offset)
    z_s, z_t = torch.randn(c.batch, c.classes, generator=g), 3 * torch.randn(c.batch, c.classes, generator=g)
    y = torch.randint(0, c.classes, (c.batch,), generator=g)
    if c.duplicate:
        y[1] = y[0]
    rows = torch.arange(c.batch)
    for z, who in ((z_s, "student"), (z_t, "teacher")):
        if on(c.confident, who):
            z[rows, y] = z.max(1).values + c.margin
        if on(c.duplicate, who):
            z[1] = z[0]
    if c.bf16:
        z_s, z_t = z_s.bfloat16(), z_t.bfloat16()
    return z_s, z_t, y


# -- feature maps and embeddings ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Features:
    seed: int
    batch: int
    scale_s: float
    scale_t: float
    constant: str | None  # whose maps are constant over the positions of each channel
    duplicate: str | None
    bf16: bool
    relu: bool  # post-ReLU taps, as most CNN stages give them


feature_cases = st.builds(Features, SEEDS, st.sampled_from([2, 3, 5]), SCALES, SCALES, SIDES, SIDES, st.booleans(),
                          st.booleans())


def make_features(c: Features, student: dict[str, tuple[int, ...]], teacher: dict[str, tuple[int, ...]]):
    """Taps of the given per-sample shapes for both sides, N(0.5, 1) (ReLU'd when ``relu``), then made constant
    per channel, duplicated, scaled and rounded to bf16 as the case says."""
    g = torch.Generator().manual_seed(c.seed)

    def side(shapes, who, scale):
        out = {}
        for name, shape in shapes.items():
            f = torch.randn(c.batch, *shape, generator=g) + 0.5
            f = f.relu() if c.relu else f
            if on(c.constant, who) and f.dim() > 2:
                f = f.flatten(2).mean(2).view(*f.shape[:2], *[1] * (f.dim() - 2)).expand_as(f).clone()
            if on(c.duplicate, who):
                f[1] = f[0]
            f = f * scale
            out[name] = f.bfloat16() if c.bf16 else f
        return out

    return side(student, "student", c.scale_s), side(teacher, "teacher", c.scale_t)


# -- attention maps and value projections ------------------------------------------------------------------
@dataclass(frozen=True)
class Attention:
    seed: int
    batch: int
    heads_s: int
    margin: float  # added to the score of one (real) key of each row
    value_scale: float
    constant: str | None  # whose value vectors are the same at every token
    duplicate: str | None
    bf16: bool


attention_cases = st.builds(Attention, SEEDS, st.sampled_from([2, 3]), st.sampled_from([2, 4]), MARGINS, SCALES,
                            SIDES, SIDES, st.booleans())
TOKENS, HEADS_T, WIDTH = 6, 4, 8


def make_attention(c: Attention):
    """(B, heads, T, T) attention probabilities as a padded self-attention gives them (padded keys exactly 0,
    every row a distribution over the sample's real tokens, scores N(0, 1) with one key ``margin`` ahead),
    (B, T, 8) value taps, and the real lengths (sample 0 unpadded)."""
    g = torch.Generator().manual_seed(c.seed)
    lengths = [TOKENS] + torch.randint(2, TOKENS + 1, (c.batch - 1,), generator=g).tolist()
    if c.duplicate:
        lengths[1] = lengths[0]

    def side(heads, who):
        scores = torch.randn(c.batch, heads, TOKENS, TOKENS, generator=g, dtype=torch.float64)
        lead = torch.randint(0, TOKENS, (c.batch, heads, TOKENS, 1), generator=g)
        for i, n in enumerate(lengths):
            lead[i] %= n
            scores[i, :, :, n:] = -math.inf
        scores.scatter_add_(-1, lead, torch.full(lead.shape, c.margin, dtype=torch.float64))
        a = scores.softmax(-1).float()
        v = torch.randn(c.batch, TOKENS, WIDTH, generator=g) * c.value_scale
        if on(c.constant, who):
            v = v[:, :1].expand_as(v).clone()
        if on(c.duplicate, who):
            a[1], v[1] = a[0], v[0]
        return (a.bfloat16(), v.bfloat16()) if c.bf16 else (a, v)

    (a_s, v_s), (a_t, v_t) = side(c.heads_s, "student"), side(HEADS_T, "teacher")
    return a_s, a_t, v_s, v_t, lengths
