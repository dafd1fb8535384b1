"""Losses at GPU precision: under bf16 / fp16 autocast every knowledge term stays float32 (issue 16, item 1).

CPU autocast follows the same casting rules as CUDA autocast (matmuls and convolutions drop to the low
precision), so this runs on any machine. Wide features (64 samples x 64·16·16) are where half precision
hurts: distances and Gram matrices of 16k-dimensional rows.
"""
from __future__ import annotations

import copy

import pytest
import torch

from kdray.knowledge import KNOWLEDGE, DistillObjective, ModelLayout, TapOutputs

B, C, H, W, CLASSES = 64, 64, 16, 16, 10


def outputs(seed: int) -> tuple[TapOutputs, TapOutputs, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Post-ReLU maps of magnitude ~3: a row's squared norm (~70k) is past fp16's largest value (65504).
    t_feat = 3 * torch.relu(torch.randn(B, C, H, W, generator=g))
    s_feat = torch.relu(t_feat + 1.5 * torch.randn(B, C, H, W, generator=g))  # related, not equal
    t_logits = 3 * torch.randn(B, CLASSES, generator=g)
    s_logits = t_logits + torch.randn(B, CLASSES, generator=g)
    y = torch.randint(0, CLASSES, (B,), generator=g)
    # Transformer taps: attention probabilities (B, heads, T, T) and value projections (B, T, H).
    t_att = (2 * torch.randn(B, 4, 32, 32, generator=g)).softmax(-1)
    s_att = (t_att.log() + torch.randn(B, 4, 32, 32, generator=g)).softmax(-1)
    t_val = 3 * torch.randn(B, 32, 64, generator=g)
    s_val = t_val + torch.randn(B, 32, 64, generator=g)
    return (TapOutputs(s_logits, {"f": s_feat, "a": s_att, "v": s_val}),
            TapOutputs(t_logits, {"f": t_feat, "a": t_att, "v": t_val}), y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", sorted(KNOWLEDGE.names()))
def test_every_knowledge_term_is_float32_under_autocast(kind, dtype):
    layout = ModelLayout(("f",), "f", ("a",), ("v",))
    torch.manual_seed(0)
    obj = DistillObjective.from_specs([{"type": kind}], layout, layout)
    s, t, y = outputs(1)
    obj.bind_data(B)  # per-sample state (CRD's memory bank): the batch is the whole training split
    obj.bind(t.features, s.features)
    obj.set_epoch(100)  # past any warm-up
    idx = torch.arange(B)
    # CRD's bank moves with each call and its negatives are random: both calls start from one state and draws.
    twin = copy.deepcopy(obj) if obj.uses_index else obj
    torch.manual_seed(2)
    ref = obj(s, t, y, index=idx)
    # As in training: the student's taps come out of autocast in low precision.
    s_low = TapOutputs(s.logits.to(dtype), {k: v.to(dtype) for k, v in s.features.items()})
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=dtype):
        low = twin(s_low, t, y, index=idx)
    for name, value in ref.items():
        assert low[name].dtype == torch.float32, name
        assert torch.isfinite(low[name]), (name, low[name])
        assert low[name].item() == pytest.approx(value.item(), rel=0.02), (name, value.item(), low[name].item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", sorted(KNOWLEDGE.names()))
def test_every_knowledge_forward_called_directly_is_float32_under_autocast(kind, dtype):
    """A plugin author or a notebook calls a loss module itself, not through the objective that turns autocast
    off: the module must compute in float32 on its own (``sp`` returned NaN under fp16 autocast this way)."""
    layout = ModelLayout(("f",), "f", ("a",), ("v",))
    torch.manual_seed(0)
    k = DistillObjective.from_specs([{"type": kind}], layout, layout).knowledge[kind]
    s, t, y = outputs(1)
    k.bind_data(B)
    k.bind(t.features, s.features)
    k.set_epoch(100)
    extra = {"index": torch.arange(B)} if k.uses_index else {}
    twin = copy.deepcopy(k) if k.uses_index else k
    torch.manual_seed(2)
    ref = k.compute(s, t, y, **extra)
    s_low = TapOutputs(s.logits.to(dtype), {n: v.to(dtype) for n, v in s.features.items()})
    t_low = TapOutputs(t.logits.to(dtype), {n: v.to(dtype) for n, v in t.features.items()})
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=dtype):
        low = twin.compute(s_low, t_low, y, **extra)
    assert low.dtype == torch.float32
    assert torch.isfinite(low), low
    # Both sides' taps are rounded to the low precision here, so the inputs differ by that rounding.
    assert low.item() == pytest.approx(ref.item(), rel=0.02), (ref.item(), low.item())
