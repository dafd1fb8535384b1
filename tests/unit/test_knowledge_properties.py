"""Property tests at the extremes for every registered knowledge type.

Each loss, built with its default layers, runs in float32 on drawn extreme inputs: true-class margins up to 50
at T in {1, 4, 20} (standardised logits too), batches of 2, exact duplicate rows, constant feature maps,
features scaled by 1e-4 and 1e4 (each side apart), bf16 inputs. It must be finite and equal a float64
computation of the same formula (``loss_references``, fed the values kdray saw: bf16-rounded where bf16) to
1e-4 relative. Where float32 cannot resolve the value, the test's docstring states the absolute tolerance it
adds and why. Inputs come from a few drawn parameters (``property_harness``), examples are derandomized.
"""
from __future__ import annotations

import copy
import math

import torch
from hypothesis import example, given
from hypothesis import strategies as st
from loss_references import (
    EPS32,
    ab_reference,
    at_maps_reference,
    attn_reference,
    bn_resolution,
    cc_reference,
    conv_bn_relu_reference,
    crd_reference,
    dist_reference,
    dkd_reference,
    f64,
    fsp_reference,
    hcl_reference,
    kd_reference,
    median_fraction,
    minilm_reference,
    mlkd_terms,
    nst_reference,
    ofd_reference,
    pkt_reference,
    pool_mean,
    regressor_conv,
    rkd_reference,
    sp_reference,
    squares_atol,
    tkd_reference,
    vid_reference,
    zscore,
)
from property_harness import (
    SETTINGS,
    Attention,
    Features,
    Logits,
    assert_close,
    attention_cases,
    build,
    feature_cases,
    logit_cases,
    make_attention,
    make_features,
    make_logits,
    on,
)

from kdray.knowledge import KNOWLEDGE, TapOutputs

COVERED: set[str] = set()


def covers(name: str):
    """Mark a property test as covering a knowledge type (see the last test)."""
    COVERED.add(name)
    return lambda fn: fn


def taps(z: torch.Tensor | None = None, **features: torch.Tensor) -> TapOutputs:
    return TapOutputs(z, features)


def kl_resolution(classes: int) -> float:
    """How well float32 knows a KL of two softmaxes over ``classes``: each log-probability to ~2^-24 of its
    size, |log p| <~ 1 + log C where it has weight. When both sides put mass within 2^-24 of 1 on one class
    (margin 50 at T = 1, 12.5 at T = 4) the KL's exact value is below that: float32 returns its rounding."""
    return 4 * (1 + math.log(classes)) * EPS32


# The listed extremes, pinned as explicit examples besides the drawn ones.
CONFIDENT = Logits(seed=1, batch=2, classes=100, margin=50.0, temperature=1.0, confident="both", duplicate="both",
                   bf16=False)
HOT_BF16 = Logits(seed=2, batch=2, classes=5, margin=50.0, temperature=20.0, confident="teacher",
                  duplicate="student", bf16=True)
CONSTANT = Features(seed=2, batch=2, scale_s=1e-4, scale_t=1e4, constant="both", duplicate=None, bf16=False,
                    relu=True)
DEGENERATE = Features(seed=3, batch=2, scale_s=1e4, scale_t=1e-4, constant="student", duplicate="student",
                      bf16=True, relu=False)  # the student batch is one constant map
# Both samples confident in one class, 1e-7 apart: float32 DIST was 1.3 % off here (a column's correlation).
SAME_CLASS = Logits(seed=125710921, batch=2, classes=5, margin=50.0, temperature=4.0, confident="student",
                    duplicate=None, bf16=False)
TWINS = Features(seed=4, batch=2, scale_s=1e4, scale_t=1e-4, constant=None, duplicate="both", bf16=True, relu=False)


# -- response ------------------------------------------------------------------------------------------------
@covers("kd")
@SETTINGS
@given(case=logit_cases, standardize=st.booleans())
@example(case=CONFIDENT, standardize=False)
@example(case=HOT_BF16, standardize=True)
def test_kd_at_the_extremes_matches_float64(case, standardize):
    """KD; absolute tolerance T^2 · ``kl_resolution``: the KL of two confident distributions is below float32's
    resolution of probabilities near 1."""
    z_s, z_t, y = make_logits(case)
    t = case.temperature
    got = build("kd", {}, {}, temperature=t, standardize=standardize).compute(taps(z_s), taps(z_t), y)
    assert_close(got, kd_reference(z_s, z_t, t, standardize), atol=t * t * kl_resolution(case.classes))


@covers("dkd")
@SETTINGS
@given(case=logit_cases, standardize=st.booleans(), beta=st.sampled_from([0.5, 8.0]))
@example(case=CONFIDENT, standardize=False, beta=0.5)
@example(case=HOT_BF16, standardize=True, beta=8.0)
def test_dkd_at_the_extremes_matches_float64(case, standardize, beta):
    """DKD (TCKD in log space, exact at margin 50), both KLs held to KD's resolution (T^2 (α + β) ·
    ``kl_resolution``): NCKD of two near-equal non-target distributions, TCKD where both splits round alike."""
    z_s, z_t, y = make_logits(case)
    t = case.temperature
    k = build("dkd", {}, {}, alpha=1.0, beta=beta, temperature=t, standardize=standardize)
    got = k.compute(taps(z_s), taps(z_t), y)
    s, tt = (zscore(z_s), zscore(z_t)) if standardize else (z_s, z_t)
    assert_close(got, dkd_reference(s, tt, y, 1.0, beta, t), atol=t * t * (1.0 + beta) * kl_resolution(case.classes))


@covers("dist")
@SETTINGS
@given(case=logit_cases, standardize=st.booleans())
@example(case=CONFIDENT, standardize=False)
@example(case=HOT_BF16, standardize=True)
@example(case=SAME_CLASS, standardize=False)
def test_dist_at_the_extremes_matches_float64(case, standardize):
    """DIST, computed in float64 inside (its docstring says why); 1e-4 relative, no absolute tolerance."""
    z_s, z_t, y = make_logits(case)
    t = case.temperature
    got = build("dist", {}, {}, temperature=t, standardize=standardize).compute(taps(z_s), taps(z_t), y)
    assert_close(got, dist_reference(z_s, z_t, 2.0, 2.0, t, standardize))


@covers("ctkd")
@SETTINGS
@given(case=logit_cases, epoch=st.integers(0, 20))
@example(case=CONFIDENT, epoch=0)
@example(case=HOT_BF16, epoch=20)
def test_ctkd_at_the_extremes_matches_float64(case, epoch):
    """CTKD: KD at the learnt temperature 0.5 + 20.5 σ(θ), θ read off the module, the curriculum's epoch drawn
    (λ acts on the gradient only); KD's tolerance at that temperature."""
    z_s, z_t, y = make_logits(case)
    k = build("ctkd", {}, {}, epoch=epoch, init_temperature=case.temperature, min_temperature=0.5,
              max_temperature=21.0)
    t = 0.5 + 20.5 / (1 + math.exp(-float(k.raw_temperature.detach().double())))
    got = k.compute(taps(z_s), taps(z_t), y)
    assert_close(got, kd_reference(z_s, z_t, t), atol=t * t * kl_resolution(case.classes))


@covers("mlkd")
@SETTINGS
@given(case=logit_cases, default_temperatures=st.booleans(), strong=st.booleans())
@example(case=CONFIDENT, default_temperatures=False, strong=False)
@example(case=HOT_BF16, default_temperatures=True, strong=True)
def test_mlkd_at_the_extremes_matches_float64(case, default_temperatures, strong):
    """MLKD over its default temperatures or the case's T, with a strong view or not.

    The teacher-confidence masks act through the share of samples (classes) at or below the median, a step
    function of ties: confidences within 2^-24 of 1 are one number in float32 (mdistiller compares them in
    float32, as kdray states), distinct in float64; each share is taken as the float64 one or the
    float32-rounded one, whichever is closer. Tolerance: the KL levels at KD's resolution (Σ T^2 ·
    ``kl_resolution``), the Gram levels as squared differences of sums of products known to 2^-24 each."""
    z_s, z_t, y = make_logits(case)
    ts = [2.0, 3.0, 4.0, 5.0, 6.0] if default_temperatures else [case.temperature]
    k = build("mlkd", {}, {}, temperatures=ts, strong_augment=strong)
    ins, batch, klass, conf, mass = mlkd_terms(z_s, z_t, ts)
    student, teacher, extra = taps(z_s), taps(z_t), 0.0
    if strong:  # the reference's strong-view KL: the weak view again at T = 2 and 6
        z_s2, z_t2, _ = make_logits(case, seed_offset=1)
        student, teacher = TapOutputs(z_s, {}, taps(z_s2)), TapOutputs(z_t, {}, taps(z_t2))
        extra = sum(kd_reference(z_s, z_t, t) if t in (2.0, 6.0) else kd_reference(z_s2, z_t2, t) for t in ts)
    got = k.compute(student, teacher, y)
    wants = [f_m * (ins + batch) + f_c * klass + extra
             for f_m in (median_fraction(conf), median_fraction(conf, float32=True))
             for f_c in (median_fraction(mass), median_fraction(mass, float32=True))]
    kl_atol = sum(t * t for t in ts) * (2 if strong else 1) * kl_resolution(case.classes)
    gram_atol = squares_atol(batch + klass, 4 * EPS32 * case.batch, len(ts) * (case.batch + case.classes))
    assert_close(got, min(wants, key=lambda w: abs(float(w) - float(got))), atol=kl_atol + gram_atol)


# -- feature -------------------------------------------------------------------------------------------------
# Stage 1: the teacher's map is larger (pooled to the student's 4x4); stage 2: the student's (pooled to 2x2).
STAGES_S, STAGES_T = {"f1": (4, 4, 4), "f2": (6, 4, 4)}, {"f1": (5, 8, 8), "f2": (3, 2, 2)}


def pairs(s: dict, t: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [s["f1"], s["f2"]], [t["f1"], t["f2"]]


@covers("fitnet")
@SETTINGS
@given(case=feature_cases, sizes=st.sampled_from([(4, 4), (8, 4), (2, 4)]))
@example(case=DEGENERATE, sizes=(4, 4))
def test_fitnet_at_the_extremes_matches_float64(case, sizes):
    """FitNets with RepDistiller's conv-BN-ReLU regressor (1x1, 3x3 stride 2 or 4x4 transposed, by the sizes),
    re-implemented in float64 with its weights. 1e-4 relative, and ``squares_atol`` at the BatchNorm output's
    float32 resolution (``bn_resolution``): a student batch that is one constant map has a channel of variance
    0, whose float32 normalisation is rounding noise over sqrt(eps) where float64's is exactly β."""
    s, t = make_features(case, {"f2": (6, sizes[0], sizes[0])}, {"f2": (8, sizes[1], sizes[1])})
    k = build("fitnet", t, s)
    got = k.compute(taps(**s), taps(**t), None)
    want = (conv_bn_relu_reference(k.regressor, f64(s["f2"])) - f64(t["f2"])).pow(2).mean()
    delta = bn_resolution(regressor_conv(k.regressor, s["f2"]), k.regressor.proj[1])
    assert_close(got, want, atol=squares_atol(want, delta))


@covers("at")
@SETTINGS
@given(case=feature_cases)
@example(case=CONSTANT)
def test_at_at_the_extremes_matches_float64(case):
    """AT over both stages (feature maps pooled first); ``squares_atol`` with δ = 16 · 2^-24 per normalised
    attention entry: constant maps on both sides give the same uniform attention, a loss float32 leaves at
    its rounding (~1e-15) where float64's is ~0."""
    s, t = make_features(case, STAGES_S, STAGES_T)
    got = build("at", t, s).compute(taps(**s), taps(**t), None)
    want = at_maps_reference(*pairs(s, t))
    assert_close(got, want, atol=squares_atol(want, 16 * EPS32, 2.0))


@covers("nst")
@SETTINGS
@given(case=feature_cases)
@example(case=CONSTANT)
def test_nst_at_the_extremes_matches_float64(case):
    """NST (the MMD through the kernel's explicit feature map in the reference, the kernel trick in kdray);
    absolute tolerance 2 pairs · 4 · 4 · 2^-24: an MMD is T + S - 2X, kernel means in [0, 1] known to
    float32's resolution, which cancel to 0 when both sides are constant maps."""
    s, t = make_features(case, STAGES_S, STAGES_T)
    got = build("nst", t, s).compute(taps(**s), taps(**t), None)
    assert_close(got, nst_reference(*pairs(s, t)), atol=2 * 4 * 4 * EPS32)


@covers("fsp")
@SETTINGS
@given(case=feature_cases)
@example(case=CONSTANT)
def test_fsp_at_the_extremes_matches_float64(case):
    """FSP over the (f1, f2) pair (channels equal side by side, the larger map of each model pooled); 1e-4
    relative, and ``squares_atol`` at 16 · 2^-24 of the Gram entries' size, for two near-equal matrices."""
    s, t = make_features(case, {"f1": (4, 8, 8), "f2": (6, 4, 4)}, {"f1": (4, 4, 4), "f2": (6, 2, 2)})
    got = build("fsp", t, s).compute(taps(**s), taps(**t), None)
    want = fsp_reference(*pairs(s, t))
    size = max(f64(f).abs().max().item() for f in (*s.values(), *t.values())) ** 2
    assert_close(got, want, atol=squares_atol(want, 16 * EPS32 * size))


@covers("ab")
@SETTINGS
@given(case=feature_cases)
@example(case=DEGENERATE)
def test_ab_at_the_extremes_matches_float64(case):
    """AB: connector (1x1 conv, pooling to the teacher's size, training-mode BN) re-implemented with its weights,
    then the margin hinge (a sum of squares, continuous at the hinge's edges). 1e-4 relative, and FitNet's
    BatchNorm resolution for a student batch of variance 0."""
    s, t = make_features(case, STAGES_S, STAGES_T)
    k = build("ab", t, s)
    got = k.compute(taps(**s), taps(**t), None)
    want, atol = ab_reference(k.connectors, *pairs(s, t), 1.0)
    assert_close(got, want, atol=atol)


@covers("vid")
@SETTINGS
@given(case=feature_cases)
@example(case=DEGENERATE)
def test_vid_at_the_extremes_matches_float64(case):
    """VID: the Gaussian NLL with the mean MLP and variances read off its connectors; 1e-4 relative."""
    s, t = make_features(case, STAGES_S, STAGES_T)
    k = build("vid", t, s)
    got = k.compute(taps(**s), taps(**t), None)
    assert_close(got, vid_reference(k.connectors, *pairs(s, t)))


@covers("ofd")
@SETTINGS
@given(case=feature_cases)
@example(case=DEGENERATE)
def test_ofd_at_the_extremes_matches_float64(case):
    """OFD on taps without ``bind_models`` (the margin from the teacher batch's channel mean and std, a
    truncated-normal mean written here), connectors re-implemented with their weights. 1e-4 relative, and
    FitNet's BatchNorm resolution for a student batch of variance 0 (plus the float32 margin's rounding)."""
    s, t = make_features(case, STAGES_S, STAGES_T)
    k = build("ofd", t, s)
    got = k.compute(taps(**s), taps(**t), None)
    want, atol = ofd_reference(k.connectors, *pairs(s, t))
    assert_close(got, want, atol=atol)


@covers("reviewkd")
@SETTINGS
@given(case=feature_cases, epoch=st.integers(0, 30))
@example(case=CONSTANT, epoch=30)
def test_reviewkd_at_the_extremes_matches_float64(case, epoch):
    """ReviewKD over its default stages (two maps, then the pooled embedding as a 1x1 map). The ABF fusion's
    outputs come from the same module converted to float64: re-implementing its convolutions, BNs and
    attention would repeat the module line by line, so this compares precision there, not the formula. hcl's
    pyramid, the vector-as-map rule and the warm-up ramp are re-derived here; 1e-4 relative.

    A batch of 2 whose student samples are duplicates gives the embedding stage's BatchNorm (and, for constant
    maps, every stage's) a channel of variance 0: float32 returns its mean's rounding over sqrt(eps) and the
    fusion carries that noise into the shallower stages, where float64 has exactly β. Such a batch is held
    to a finite loss only."""
    s, t = make_features(case, {**STAGES_S, "e": (6,)}, {**STAGES_T, "e": (3,)})
    k = build("reviewkd", t, s, epoch=epoch)
    assert k.student_layers == k.teacher_layers == ["f1", "f2", "e"]
    k64 = copy.deepcopy(k).double()
    got = k.compute(taps(**s), taps(**t), None)
    if case.batch == 2 and on(case.duplicate, "student"):
        assert torch.isfinite(got)
        return
    maps = [f64(f) if f.dim() == 4 else f64(f)[:, :, None, None] for f in (*s.values(), *t.values())]
    outs = k64.review(maps[:3], maps[3:])
    assert_close(got, min(1.0, epoch / 20) * sum(hcl_reference(o, f) for o, f in zip(outs, maps[3:])))


@covers("attn")
@SETTINGS
@given(case=attention_cases)
@example(case=Attention(seed=4, batch=2, heads_s=2, margin=50.0, value_scale=1.0, constant=None, duplicate="both",
                        bf16=True))
def test_attn_at_the_extremes_matches_float64(case):
    """TinyBERT's attention MSE on padded maps (real tokens from the generator's lengths, not read off the
    maps); ``squares_atol`` with δ = 4 · 2^-24: probabilities in [0, 1]."""
    a_s, a_t, _, _, lengths = make_attention(case)
    got = build("attn", {"a": a_t}, {"a": a_s}).compute(taps(a=a_s), taps(a=a_t), None)
    want = attn_reference(a_s, a_t, lengths)
    assert_close(got, want, atol=squares_atol(want, 4 * EPS32))


# -- relational ----------------------------------------------------------------------------------------------
EMBED_S, EMBED_T = {"e": (6, 2, 2)}, {"e": (10,)}  # a student map (pooled to a vector) against a teacher vector


@covers("rkd")
@SETTINGS
@given(case=feature_cases)
@example(case=TWINS)
def test_rkd_at_the_extremes_matches_float64(case):
    """RKD (its potentials are invariant to scale, and each side's scale is drawn apart); ``squares_atol`` with
    δ = 64 · 2^-24: potentials of O(1) known to float32's resolution (a batch of 2 has the same potentials on
    both sides, a loss of exactly 0 that float32 leaves at ~1e-13)."""
    s, t = make_features(case, EMBED_S, EMBED_T)
    got = build("rkd", t, s).compute(taps(**s), taps(**t), None)
    want = rkd_reference(pool_mean(s["e"]), pool_mean(t["e"]), 25.0, 50.0)
    assert_close(got, want, atol=squares_atol(want, 64 * EPS32, 75.0))


@covers("sp")
@SETTINGS
@given(case=feature_cases)
@example(case=CONSTANT)
def test_sp_at_the_extremes_matches_float64(case):
    """SP on the last stage (maps of different shapes on the two sides); ``squares_atol`` with δ = 16 · 2^-24:
    row-normalised similarities are O(1), and two constant or duplicated batches give nearly equal ones."""
    s, t = make_features(case, {"f2": (6, 4, 4)}, {"f2": (3, 2, 2)})
    got = build("sp", t, s).compute(taps(**s), taps(**t), None)
    want = sp_reference([s["f2"]], [t["f2"]])
    assert_close(got, want, atol=squares_atol(want, 16 * EPS32))


@covers("pkt")
@SETTINGS
@given(case=feature_cases)
@example(case=TWINS)
def test_pkt_at_the_extremes_matches_float64(case):
    """PKT (its B x B part in float64 already); 1e-4 relative, and ``squares_atol`` with δ = 8 · 2^-24 for the
    float32 pooling of the map tap before it (the KL is second order in the kernels' difference)."""
    s, t = make_features(case, EMBED_S, EMBED_T)
    got = build("pkt", t, s).compute(taps(**s), taps(**t), None)
    want = pkt_reference(s["e"], t["e"])
    assert_close(got, want, atol=squares_atol(want, 8 * EPS32))


@covers("cc")
@SETTINGS
@given(case=feature_cases, connector=st.booleans())
@example(case=TWINS, connector=True)
def test_cc_at_the_extremes_matches_float64(case, connector):
    """CC with and without its linear connector (weights read off the module); ``squares_atol`` with
    δ = 16 · 2^-24: the kernel entries are O(1)."""
    s, t = make_features(case, EMBED_S, EMBED_T)
    k = build("cc", t, s, connector=connector)
    got = k.compute(taps(**s), taps(**t), None)
    want = cc_reference(s["e"], t["e"], 0.4, 2, k.connector)
    assert_close(got, want, atol=squares_atol(want, 16 * EPS32))


@covers("crd")
@SETTINGS
@given(case=feature_cases)
@example(case=TWINS)
def test_crd_at_the_extremes_matches_float64(case):
    """CRD on a fresh memory bank (banks and Z from this first batch, the embeddings' weights read off the
    module, negatives fixed); samples duplicated on both sides share their index too (a padded shard).
    1e-4 relative."""
    s, t = make_features(case, EMBED_S, EMBED_T)
    n = 16
    k = build("crd", t, s, num_train=n, feat_dim=8, nce_k=6)
    g = torch.Generator().manual_seed(case.seed)
    idx = torch.randperm(n, generator=g)[:case.batch]
    if case.duplicate == "both":
        idx[1] = idx[0]
    cidx = torch.cat([idx[:, None], torch.randint(0, n, (case.batch, 6), generator=g)], 1)
    want = crd_reference(s["e"], t["e"], k.embed_s.linear.weight, k.embed_s.linear.bias, k.embed_t.linear.weight,
                         k.embed_t.linear.bias, k.memory.memory_s.clone(), k.memory.memory_t.clone(), cidx, 0.07, n)
    assert_close(k(s["e"], t["e"], idx, cidx), want)


@covers("minilm")
@SETTINGS
@given(case=attention_cases)
@example(case=Attention(seed=3, batch=2, heads_s=4, margin=50.0, value_scale=1e-4, constant=None, duplicate="both",
                        bf16=False))
def test_minilm_at_the_extremes_matches_float64(case):
    """MiniLM on padded attention maps and value taps; absolute tolerance 2 · ``kl_resolution`` over the tokens
    (two KLs): values scaled by 1e-4 give near-uniform relations whose KL (~1e-16) float32 cannot resolve."""
    a_s, a_t, v_s, v_t, lengths = make_attention(case)
    k = build("minilm", {"a": a_t, "v": v_t}, {"a": a_s, "v": v_s})
    got = k.compute(taps(a=a_s, v=v_s), taps(a=a_t, v=v_t), None)
    want = minilm_reference(a_s, a_t, v_s, v_t, lengths, heads=a_t.shape[1])
    assert_close(got, want, atol=2 * kl_resolution(a_t.shape[-1]))


@covers("tkd")
@SETTINGS
@given(case=logit_cases, kind=st.sampled_from(["fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd"]),
       beta=st.sampled_from([0.0, 0.1, 0.5, 1.0]))
@example(case=CONFIDENT, kind="jsd", beta=0.5)
@example(case=CONFIDENT, kind="rkl", beta=0.5)
@example(case=HOT_BF16, kind="skew_rkl", beta=0.5)
def test_tkd_at_the_extremes_matches_float64(case, kind, beta):
    """tkd on a classifier's logits (each sample one token), every divergence against the float64 formulas on
    probabilities (mixtures in probability space); absolute tolerance T² · ``kl_resolution`` as KD's (two confident
    distributions), and T² · C · 2^-24 for tvd (a sum of C rounded probability differences)."""
    z_s, z_t, y = make_logits(case)
    t = case.temperature
    got = build("tkd", {}, {}, divergence=kind, temperature=t, beta=beta).compute(taps(z_s), taps(z_t), y)
    atol = t * t * (case.classes * EPS32 if kind == "tvd" else kl_resolution(case.classes))
    assert_close(got, tkd_reference(z_s, z_t, kind, t, beta), atol=atol)


@covers("uld")
@SETTINGS
@given(case=logit_cases, t_s=st.sampled_from([1.0, 2.0]), t_t=st.sampled_from([1.0, 4.0]))
@example(case=CONFIDENT, t_s=1.0, t_t=1.0)
@example(case=HOT_BF16, t_s=1.0, t_t=1.0)
def test_uld_at_the_extremes_matches_float64(case, t_s, t_t):
    """uld on a classifier's logits (each sample one token) against the float64 formula: the L1 between the sorted
    probabilities, a sum of C rounded probability differences (tolerance 2 · C · 2^-24), the mean over samples."""
    z_s, z_t, y = make_logits(case)
    got = build("uld", {}, {}, student_temperature=t_s, teacher_temperature=t_t).compute(taps(z_s), taps(z_t), y)
    q = torch.softmax(z_s.double() / t_s, -1).sort(-1, descending=True).values
    p = torch.softmax(z_t.double() / t_t, -1).sort(-1, descending=True).values
    assert_close(got, (q - p).abs().sum(-1).mean(), atol=2 * case.classes * EPS32)


# -- every registered type -----------------------------------------------------------------------------------
def test_every_registered_knowledge_type_has_a_property_test():
    """A new knowledge type must come with a property test here."""
    names = set(KNOWLEDGE.names())
    assert COVERED == names, (f"registered without a property test: {sorted(names - COVERED)}; "
                              f"covered but not registered: {sorted(COVERED - names)}")
