"""TinyBERT's attention loss (`attn`) and MiniLM's self-attention loss (`minilm`) against float64 derivations
written here from the papers' formulas (numpy, real tokens given as lengths, not read off the maps)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdray.knowledge import KNOWLEDGE, DistillObjective, ModelLayout, TapOutputs
from kdray.knowledge.transformers import AttentionDistill, MiniLM, uniform_layer_map

torch.manual_seed(0)


def attention_maps(b: int, heads: int, t: int, lengths: list[int], scale: float = 2.0) -> torch.Tensor:
    """Random softmax maps as a padded self-attention gives them: padded keys 0, every row (padded queries
    too) a distribution over the sample's real tokens."""
    scores = torch.randn(b, heads, t, t, dtype=torch.float64) * scale
    for i, n in enumerate(lengths):
        scores[i, :, :, n:] = -math.inf
    return scores.softmax(-1).float()


def softmax_rows(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p_row || q_row) for every row (p > 0 everywhere here: maps restricted to real tokens)."""
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


# -- attn (TinyBERT) ------------------------------------------------------------------------------------
def attn_numpy(a_s: np.ndarray, a_t: np.ndarray, lengths: list[int]) -> float:
    """(1/h) Σ_heads MSE over each sample's real n x n block, one mean over the batch's real entries."""
    if a_s.shape[1] != a_t.shape[1]:
        a_s, a_t = a_s.mean(1, keepdims=True), a_t.mean(1, keepdims=True)
    sq = sum(((a_s[i, :, :n, :n] - a_t[i, :, :n, :n]) ** 2).sum() for i, n in enumerate(lengths))
    return sq / (a_s.shape[1] * sum(n * n for n in lengths))


def test_attn_and_minilm_are_registered_with_paper_and_formula():
    assert KNOWLEDGE.get("attn") is AttentionDistill and KNOWLEDGE.get("minilm") is MiniLM
    assert "1909.10351" in AttentionDistill.__doc__ and "math::" in AttentionDistill.__doc__
    assert "2002.10957" in MiniLM.__doc__ and "math::" in MiniLM.__doc__


def test_attn_hand_computed_case_and_zero_for_identical_maps():
    a_s = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    a_t = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])
    attn = AttentionDistill(["t"], ["s"])
    assert attn(a_s, a_t).item() == pytest.approx((0.25 + 0.25) / 4)  # squared errors .25 .25 0 0, mean
    a = attention_maps(3, 4, 6, [6, 4, 2])
    assert attn(a, a.clone()).item() == 0.0


@pytest.mark.parametrize("h_s,h_t", [(4, 4), (2, 4)])
def test_attn_matches_float64_formula_with_padding_and_head_mismatch(h_s, h_t):
    lengths = [7, 5, 3, 7]
    a_s, a_t = attention_maps(4, h_s, 7, lengths), attention_maps(4, h_t, 7, lengths)
    got = AttentionDistill(["t"], ["s"])(a_s, a_t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(attn_numpy(a_s.double().numpy(), a_t.double().numpy(), lengths), rel=1e-5)


def test_attn_ignores_padded_query_rows_and_is_a_sum_over_layer_pairs():
    lengths = [6, 3]
    a_s, a_t = attention_maps(2, 2, 6, lengths), attention_maps(2, 2, 6, lengths)
    attn = AttentionDistill(["t"], ["s"])
    base = attn(a_s, a_t).item()
    junk = a_s.clone()
    junk[1, :, 3:, :3] = torch.rand(2, 3, 3)  # the padded query rows of sample 1: not part of the loss
    assert attn(junk, a_t).item() == pytest.approx(base, rel=1e-6)
    # sample 1 alone, padded or cut to its 3 real tokens: the same loss
    assert attn(a_s[1:], a_t[1:]).item() == pytest.approx(attn(a_s[1:, :, :3, :3], a_t[1:, :, :3, :3]).item(), rel=1e-6)
    assert attn([a_s, a_s], [a_t, a_t]).item() == pytest.approx(2 * base, rel=1e-6)


def test_attn_layer_mapping_is_tinyberts_uniform_g():
    assert uniform_layer_map(4, 12) == [2, 5, 8, 11]  # g(m) = 3m, 1-based: teacher layers 3, 6, 9, 12
    assert uniform_layer_map(3, 4) == [0, 1, 3]  # floored, last to last
    teacher = ModelLayout(("h",), "p", tuple(f"attention.{i}" for i in range(4)))
    student = ModelLayout(("h",), "p", ("attention.0", "attention.1"))
    k = AttentionDistill.from_params({}, teacher, student)
    assert k.student_layers == ["attention.0", "attention.1"] and k.teacher_layers == ["attention.1", "attention.3"]
    k = AttentionDistill.from_params({"student_layers": ["attention.1"]}, teacher, student)
    assert k.teacher_layers == ["attention.3"]
    with pytest.raises(ValueError, match="declares no attention layers"):
        AttentionDistill.from_params({}, ModelLayout(("h",), "p"), student)


def test_attn_gradient_reaches_the_student_in_float32_under_bf16_maps():
    a_t = attention_maps(2, 2, 5, [5, 4])
    scores = torch.randn(2, 2, 5, 5, requires_grad=True)
    loss = AttentionDistill(["t"], ["s"])(scores.softmax(-1).bfloat16(), a_t.bfloat16())
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0


# -- minilm ---------------------------------------------------------------------------------------------
def minilm_numpy(a_s, a_t, v_s, v_t, lengths, heads) -> float:
    """L_AT + L_VR, each Σ_heads Σ_real tokens KL(teacher row || student row) / (heads · Σ |x|)."""
    if a_s.shape[1] != a_t.shape[1]:
        a_s, a_t = a_s.mean(1, keepdims=True), a_t.mean(1, keepdims=True)
    at = vr = 0.0
    for i, n in enumerate(lengths):
        at += kl_rows(a_t[i, :, :n, :n], a_s[i, :, :n, :n]).sum()
        for v, out in ((v_t, "t"), (v_s, "s")):
            d = v.shape[-1] // heads
            rel = np.stack([softmax_rows(v[i, :n, a * d:(a + 1) * d] @ v[i, :n, a * d:(a + 1) * d].T / np.sqrt(d))
                            for a in range(heads)])
            if out == "t":
                r_t = rel
            else:
                r_s = rel
        vr += kl_rows(r_t, r_s).sum()
    tokens = sum(lengths)
    return at / (a_t.shape[1] * tokens) + vr / (heads * tokens)


@pytest.mark.parametrize("h_s,h_t,d_s,d_t,relation_heads", [(4, 4, 16, 16, None), (2, 4, 8, 16, None),
                                                             (4, 4, 12, 24, 6)])
def test_minilm_matches_float64_formula(h_s, h_t, d_s, d_t, relation_heads):
    lengths = [6, 4, 2]
    a_s, a_t = attention_maps(3, h_s, 6, lengths), attention_maps(3, h_t, 6, lengths)
    v_s, v_t = torch.randn(3, 6, d_s), torch.randn(3, 6, d_t) * 2
    got = MiniLM("ta", "sa", "tv", "sv", relation_heads)(a_s, a_t, v_s, v_t)
    want = minilm_numpy(*(x.double().numpy() for x in (a_s, a_t, v_s, v_t)), lengths, relation_heads or h_t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_minilm_closed_forms():
    k = MiniLM("ta", "sa", "tv", "sv")
    a = attention_maps(2, 2, 5, [5, 3])
    v = torch.randn(2, 5, 8)
    assert k(a, a.clone(), v, v.clone()).item() == pytest.approx(0.0, abs=1e-7)
    # L_AT alone: two tokens, one head, rows [.5 .5] (teacher) vs [.25 .75]: KL = .5 ln 2 + .5 ln(2/3) per row
    a_t = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])
    a_s = torch.tensor([[[[0.25, 0.75], [0.25, 0.75]]]])
    v = torch.tensor([[[1.0], [0.0]]])
    assert k(a_s, a_t, v, v).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # L_VR alone: teacher values [1, 0] relate as softmax([1, 0]) and softmax([0, 0]); zero student values
    # relate uniformly. Only row 1 differs: KL = p ln 2p + (1 - p) ln 2(1 - p), p = e / (e + 1), over |x| = 2.
    p = math.e / (math.e + 1)
    want = (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))) / 2
    assert k(a_t, a_t, torch.zeros(1, 2, 1), v).item() == pytest.approx(want, rel=1e-6)


def test_minilm_padding_is_as_if_the_sequence_were_cut_and_student_zeros_stay_finite():
    k = MiniLM("ta", "sa", "tv", "sv")
    a_s, a_t = attention_maps(1, 2, 6, [4]), attention_maps(1, 2, 6, [4])
    v_s, v_t = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    cut = k(a_s[..., :4, :4], a_t[..., :4, :4], v_s[:, :4], v_t[:, :4]).item()
    assert k(a_s, a_t, v_s, v_t).item() == pytest.approx(cut, rel=1e-6)
    v_s[:, 4:] = 100.0  # padded values do not enter the value relation
    assert k(a_s, a_t, v_s, v_t).item() == pytest.approx(cut, rel=1e-6)
    scores = torch.randn(1, 2, 6, 6, requires_grad=True)
    a_zero = scores.softmax(-1) * (torch.arange(6) != 1).float()  # a real key the student gives exactly 0
    loss = k(a_zero, a_t, v_s, v_t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()


def test_minilm_defaults_to_the_last_attention_and_value_layers():
    t = ModelLayout(("h",), "p", ("attention.0", "attention.1"), ("value.0", "value.1"))
    s = ModelLayout(("h",), "p", ("attention.0",), ("value.0",))
    k = MiniLM.from_params({}, t, s)
    assert k.teacher_layers == ["attention.1", "value.1"] and k.student_layers == ["attention.0", "value.0"]
    with pytest.raises(ValueError, match="declares no value layers"):
        MiniLM.from_params({}, ModelLayout(("h",), "p", ("attention.0",)), s)
    with pytest.raises(ValueError, match="cannot be split into 3 relation heads"):
        MiniLM("ta", "sa", "tv", "sv", 3)(*[attention_maps(1, 2, 3, [3])] * 2, torch.randn(1, 3, 8), torch.randn(1, 3,
                                                                                                                 8))


def test_objective_combines_attn_and_minilm_from_taps():
    t = ModelLayout(("h",), "p", ("attention.0", "attention.1"), ("value.0", "value.1"))
    s = ModelLayout(("h",), "p", ("attention.0",), ("value.0",))
    obj = DistillObjective.from_specs([{"type": "attn", "weight": 2.0}, {"type": "minilm"}], t, s)
    assert obj.teacher_layers == ["attention.1", "value.1"] and obj.student_layers == ["attention.0", "value.0"]
    a_t, a_s = attention_maps(2, 2, 4, [4, 2]), attention_maps(2, 2, 4, [4, 2])
    v_t, v_s = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    teacher = TapOutputs(torch.randn(2, 3), {"attention.1": a_t, "value.1": v_t})
    student = TapOutputs(torch.randn(2, 3), {"attention.0": a_s, "value.0": v_s})
    terms = obj(student, teacher, torch.tensor([0, 1]))
    assert terms["attn"].item() == pytest.approx(AttentionDistill(["t"], ["s"])(a_s, a_t).item())
    assert terms["minilm"].item() == pytest.approx(MiniLM("a", "b", "c", "d")(a_s, a_t, v_s, v_t).item())
    assert terms["loss"].item() == pytest.approx(terms["ce"].item() + 2 * terms["attn"].item() + terms["minilm"].item(),
                                                 rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_both_losses_stay_float32_under_autocast(dtype):
    """As tests/unit/test_precision.py does for the CNN losses: low-precision student taps, the loss in float32."""
    lengths = [32] * 4 + [20] * 4
    layout = ModelLayout(("h",), "p", ("a",), ("v",))
    obj = DistillObjective.from_specs([{"type": "attn"}, {"type": "minilm"}], layout, layout)
    a_t, a_s = attention_maps(8, 4, 32, lengths), attention_maps(8, 4, 32, lengths)
    v_t = torch.randn(8, 32, 64) * 3
    v_s = v_t + torch.randn(8, 32, 64)
    t = TapOutputs(torch.randn(8, 5), {"a": a_t, "v": v_t})
    s = TapOutputs(torch.randn(8, 5), {"a": a_s, "v": v_s})
    y = torch.zeros(8, dtype=torch.long)
    ref = obj(s, t, y)
    s_low = TapOutputs(s.logits.to(dtype), {k: v.to(dtype) for k, v in s.features.items()})
    with torch.autocast("cpu", dtype=dtype):
        low = obj(s_low, t, y)
    for name in ("attn", "minilm"):
        assert low[name].dtype == torch.float32 and torch.isfinite(low[name])
        assert low[name].item() == pytest.approx(ref[name].item(), rel=0.02)
