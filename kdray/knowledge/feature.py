"""Feature-based knowledge (hints): the student matches the teacher's intermediate representations."""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from kdray.knowledge.base import (
    Knowledge,
    KnowledgeParams,
    LayerPairsParams,
    ModelLayout,
    TapOutputs,
    as_float,
    middle,
    paired_layers,
    register_knowledge,
)


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


class Regressor(nn.Module):
    """FitNets' learned regressor r(·) from a student feature shape to a teacher feature shape.

    Same rank and spatial maps: a 1x1 convolution (Conv1d/Conv2d/Conv3d) changes the channel count, then
    adaptive pooling matches the spatial size. Vectors: a linear layer. Ranks that differ (an MLP
    student against a CNN teacher): flatten, linear, reshape to the teacher's shape.
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.student_shape, self.teacher_shape = tuple(student_shape), tuple(teacher_shape)
        s, t = self.student_shape, self.teacher_shape
        if len(s) == len(t) and 2 <= len(s) <= 4:
            conv = {2: nn.Conv1d, 3: nn.Conv2d, 4: nn.Conv3d}[len(s)]
            self.kind = "conv1x1"
            self.proj: nn.Module = conv(s[0], t[0], kernel_size=1)
        elif len(s) == len(t) == 1:
            self.kind = "linear"
            self.proj = nn.Linear(s[0], t[0])
        else:
            self.kind = "flatten-linear"
            self.proj = nn.Linear(math.prod(s), math.prod(t))

    def forward(self, f_s: Tensor) -> Tensor:
        if self.kind == "conv1x1":
            return resize_to(self.proj(f_s), self.teacher_shape[1:])
        if self.kind == "linear":
            return self.proj(f_s)
        return self.proj(f_s.flatten(1)).view(f_s.shape[0], *self.teacher_shape)

    def describe(self) -> str:
        return {"conv1x1": "conv 1x1, then pooling", "linear": "linear"}.get(self.kind, "flatten, linear")


class ConvRegressor(nn.Module):
    """RepDistiller's FitNets regressor ``ConvReg`` (``models/util.py``): a convolution, BatchNorm, ReLU.

    The convolution follows RepDistiller's rule for the spatial sizes: student twice the teacher's size, a 3x3
    convolution with stride 2; half of it, a 4x4 transposed convolution with stride 2; otherwise larger or
    equal, a convolution of kernel ``1 + s - t`` (1x1 for equal sizes). Any other pair (a student map smaller
    than the teacher's but not half of it) is refused: RepDistiller raises too. 1-D and 3-D maps take the same
    rule with Conv1d / Conv3d (RepDistiller has only 2-D).
    """

    kind = "conv_bn_relu"

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.student_shape, self.teacher_shape = tuple(student_shape), tuple(teacher_shape)
        s, t = self.student_shape, self.teacher_shape
        if len(s) != len(t) or not 2 <= len(s) <= 4:
            raise ValueError(f"the conv_bn_relu regressor needs feature maps of one rank, got {_shape(s)} and "
                             f"{_shape(t)}")
        rank = len(s) - 1
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
        deconv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[rank]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank]
        ss, ts = s[1:], t[1:]
        if all(a == 2 * b for a, b in zip(ss, ts)):
            layer: nn.Module = conv(s[0], t[0], kernel_size=3, stride=2, padding=1)
            self.conv_kind = "conv 3x3 stride 2"
        elif all(2 * a == b for a, b in zip(ss, ts)):
            layer = deconv(s[0], t[0], kernel_size=4, stride=2, padding=1)
            self.conv_kind = "transposed conv 4x4 stride 2"
        elif all(a >= b for a, b in zip(ss, ts)):
            kernel = tuple(1 + a - b for a, b in zip(ss, ts))
            layer = conv(s[0], t[0], kernel_size=kernel)
            self.conv_kind = f"conv {'x'.join(map(str, kernel))}"
        else:
            raise ValueError(f"RepDistiller's rule maps a student map larger than, equal to or half the teacher's "
                             f"size, not {_shape(s)} to {_shape(t)}; use `regressor: linear` (a 1x1 convolution, "
                             "then adaptive pooling to the teacher's size)")
        self.proj = nn.Sequential(layer, bn(t[0]), nn.ReLU())

    def describe(self) -> str:
        return self.conv_kind

    def forward(self, f_s: Tensor) -> Tensor:
        return self.proj(f_s)


def _shape(shape: tuple[int, ...]) -> str:
    """(C, H, W) as "C channels, HxW"."""
    if len(shape) == 1:
        return f"{shape[0]} features"
    return f"{shape[0]} channels, {'x'.join(map(str, shape[1:]))}"


REGRESSORS = ("auto", "conv_bn_relu", "linear")


def make_regressor(kind: str, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """FitNets' regressor: ``conv_bn_relu`` (:class:`ConvRegressor`), ``linear`` (:class:`Regressor`), or
    ``auto``: conv_bn_relu between image maps (C, H, W) on both sides, linear for everything else (vectors,
    1-D maps, token sequences (hidden, tokens), an MLP against a CNN)."""
    if kind == "auto":
        kind = "conv_bn_relu" if len(student_shape) == len(teacher_shape) == 3 else "linear"
    if kind == "conv_bn_relu":
        return ConvRegressor(student_shape, teacher_shape)
    if kind == "linear":
        return Regressor(student_shape, teacher_shape)
    raise ValueError(f"unknown regressor {kind!r}; choose one of {', '.join(REGRESSORS)}")


@register_knowledge("fitnet", "feature", "FitNets hints: L2 between a teacher layer and a regressed student layer")
class FitNet(Knowledge):
    r"""FitNets: hints from an intermediate teacher layer.

    Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015,
    arXiv:1412.6550.

    .. math::
        L_{hint} = \frac{1}{N} \sum \big(r(F_s) - F_t\big)^2

    where :math:`F_t` is the teacher's *hint* layer, :math:`F_s` the student's *guided* layer, :math:`r`
    a learned regressor whose shape is inferred from one dry forward pass, and the mean runs over every
    element (RepDistiller's ``nn.MSELoss``). The paper trains this stage alone before KD; here it is one term
    of the joint objective, as in the CRD/RepDistiller benchmarks (their weight is 100).

    Reference: RepDistiller ``distiller_zoo/FitNet.py`` (``HintLoss``) with ``models/util.py`` (``ConvReg``),
    commit b84f547, which ``regressor: conv_bn_relu`` matches (:class:`ConvRegressor`; the weight 100 was
    tuned with it). ``regressor: linear`` is a plain 1x1 convolution (then adaptive pooling to the teacher's
    size) or a linear map (:class:`Regressor`). The default, ``auto``, takes conv_bn_relu between image maps
    (CNN to CNN) and linear otherwise (vectors, 1-D maps and token sequences, for which RepDistiller has no
    regressor). Deliberate differences: 1-D and 3-D maps may use conv_bn_relu too; the rule's unsupported
    case (a student map smaller than the teacher's but not half of it) is refused in ``bind``, naming the
    layers, instead of failing in the first step.
    """

    class Params(KnowledgeParams):
        teacher_layer: str | None = Field(None, description="teacher hint layer (default: middle)")
        student_layer: str | None = Field(None, description="student guided layer (default: middle)")
        regressor: Literal["auto", "conv_bn_relu", "linear"] = Field(
            "auto", description="r(.): conv_bn_relu (RepDistiller's ConvReg), linear (1x1 conv / linear map), "
                                "auto (conv_bn_relu between image maps, else linear)")

    def __init__(self, teacher_layer: str, student_layer: str, regressor: str = "auto") -> None:
        super().__init__()
        if regressor not in REGRESSORS:
            raise ValueError(f"unknown regressor {regressor!r}; choose one of {', '.join(REGRESSORS)}")
        self.teacher_layers, self.student_layers = [teacher_layer], [student_layer]
        self.regressor_kind = regressor
        self.regressor: nn.Module | None = None

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> Knowledge:
        return cls(
            kwargs.get("teacher_layer") or middle(teacher.feature_layers, "teacher_layer"),
            kwargs.get("student_layer") or middle(student.feature_layers, "student_layer"),
            kwargs.get("regressor", "auto"),
        )

    def bind(self, teacher_features: dict[str, Tensor], student_features: dict[str, Tensor]) -> None:
        t = teacher_features[self.teacher_layers[0]]
        s = student_features[self.student_layers[0]]
        s_shape, t_shape = tuple(s.shape[1:]), tuple(t.shape[1:])
        try:
            self.regressor = make_regressor(self.regressor_kind, s_shape, t_shape).to(s.device)
        except ValueError as e:
            raise ValueError(f"fitnet cannot regress student layer {self.student_layers[0]!r} ({_shape(s_shape)}) "
                             f"onto teacher layer {self.teacher_layers[0]!r} ({_shape(t_shape)}): {e}") from None

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        """(B, *student shape) guided-layer and (B, *teacher shape) hint-layer taps -> scalar."""
        if self.regressor is None:  # used directly on tensors: infer the connector now
            self.regressor = make_regressor(self.regressor_kind, tuple(f_s.shape[1:]),
                                            tuple(f_t.shape[1:])).to(f_s.device)
        return F.mse_loss(self.regressor(as_float(f_s)), as_float(f_t))  # fp32 connector on bf16 taps

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(student.features[self.student_layers[0]], teacher.features[self.teacher_layers[0]])


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    r"""Spatial attention :math:`\frac{1}{C}\sum_c |A_c|^p`, shape (B, *spatial), not yet normalised.

    ``f`` is (B, C, *spatial) or (B, D); a vector is read as one channel over D positions.
    """
    f = as_float(f)
    if f.dim() == 2:
        f = f.unsqueeze(1)
    return f.pow(2).mean(1) if p == 2 else f.abs().pow(p).mean(1)


def matched_attention(q_s: Tensor, q_t: Tensor) -> tuple[Tensor, Tensor]:
    """Pool two attention maps to a common size, then flatten and L2-normalise each sample.

    Same rank: each spatial dim is pooled to the smaller of the two. Different rank (a vector
    against a map): both are flattened and the longer is pooled to the shorter length.
    """
    if q_s.dim() == q_t.dim():
        size = tuple(min(a, b) for a, b in zip(q_s.shape[1:], q_t.shape[1:]))
        q_s, q_t = (resize_to(q.unsqueeze(1), size).squeeze(1) for q in (q_s, q_t))
    else:
        q_s, q_t = q_s.flatten(1), q_t.flatten(1)
        n = min(q_s.shape[1], q_t.shape[1])
        q_s, q_t = (resize_to(q.unsqueeze(1), (n,)).squeeze(1) for q in (q_s, q_t))
    return F.normalize(q_s.flatten(1), dim=1), F.normalize(q_t.flatten(1), dim=1)


@register_knowledge("at", "feature", "Attention transfer: match normalised spatial attention maps over layer pairs")
class AT(Knowledge):
    r"""Attention transfer (activation-based).

    Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer", ICLR 2017, arXiv:1612.03928.

    For each layer pair :math:`j`, with :math:`Q^j = \mathrm{vec}(\frac{1}{C}\sum_c |A^j_c|^p)`:

    .. math::
        L_{at} = \sum_{j} \frac{1}{B\,N_j} \sum_{i=1}^{B}
                 \Big\| \frac{Q^j_{s,i}}{\|Q^j_{s,i}\|_2} - \frac{Q^j_{t,i}}{\|Q^j_{t,i}\|_2} \Big\|_2^2

    with :math:`p = 2` (the paper's choice) and :math:`N_j` the number of positions, i.e. the authors'
    code ``(at(x) - at(y)).pow(2).mean()``. RepDistiller's default weight is 1000.

    Reference: github.com/szagoruyko/attention-transfer ``utils.py`` (``at``, ``at_loss``), and for maps of
    unequal size mdistiller ``mdistiller/distillers/AT.py`` and RepDistiller ``distiller_zoo/AT.py``, which
    this matches: the larger *feature map* is average-pooled to the smaller size first, then squared
    (``pool: features``, the default). ``pool: attention`` squares first and pools the attention map, the
    order kdray used before; the two differ (26 % on ResNet stage pairs). Deliberate differences: :math:`|A|^p`
    (the references write ``pow(p)``, the same for even :math:`p`); a vector tap (B, D) is read as one
    channel over D positions, and maps of different rank are flattened and the longer pooled to the shorter.
    """

    class Params(LayerPairsParams):
        p: float = Field(2.0, gt=0, description="exponent of the attention map")
        pool: Literal["features", "attention"] = Field(
            "features", description="maps of unequal size: pool the feature maps before squaring (the authors') "
                                    "or the attention maps after")

    def __init__(self, teacher_layers: list[str], student_layers: list[str], p: float = 2.0,
                 pool: str = "features") -> None:
        super().__init__()
        if len(teacher_layers) != len(student_layers) or not teacher_layers:
            raise ValueError("attention transfer needs the same non-zero number of teacher and student layers")
        if pool not in ("features", "attention"):
            raise ValueError(f"pool must be 'features' or 'attention', got {pool!r}")
        self.teacher_layers, self.student_layers, self.p = list(teacher_layers), list(student_layers), float(p)
        self.pool = pool

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> Knowledge:
        t, s = paired_layers(kwargs, teacher, student)
        return cls(t, s, kwargs.get("p", 2.0), kwargs.get("pool", "features"))

    def forward(self, f_s: list[Tensor] | Tensor, f_t: list[Tensor] | Tensor) -> Tensor:
        """(B, C_s, *spatial) and (B, C_t, *spatial) maps (or lists of them, one per layer pair) -> scalar."""
        if isinstance(f_s, Tensor):
            f_s, f_t = [f_s], [f_t]
        total = f_s[0].new_zeros((), dtype=torch.float32)
        for a_s, a_t in zip(f_s, f_t):
            if self.pool == "features":
                a_s, a_t = common_size(neuron_maps(as_float(a_s)), neuron_maps(as_float(a_t)))
            q_s, q_t = matched_attention(attention_map(a_s, self.p), attention_map(a_t, self.p))
            total = total + (q_s - q_t).pow(2).mean()
        return total

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(
            [student.features[n] for n in self.student_layers],
            [teacher.features[n] for n in self.teacher_layers],
        )


# -- transformers: attention maps ----------------------------------------------------------------------
def token_mask(a: Tensor) -> Tensor:
    """(B, T) bool: the real (unpadded) tokens of an attention-probability map (B, heads, T, T).

    A padded key gets probability exactly 0 from every head and query (the mask adds the dtype's
    minimum before the softmax), a real key a positive one, so the teacher's own map says which tokens
    are padding; no attention mask has to travel with the taps. Inputs without padding (images) are all real.
    """
    return a.detach().flatten(1, 2).amax(1) > 0


def uniform_layer_map(num_student: int, num_teacher: int) -> list[int]:
    """TinyBERT's uniform mapping n = g(m) = m·N/M (1-based, floored), so the last student layer learns
    from the last teacher layer; returns the 0-based teacher index of each student layer."""
    return [max(1, m * num_teacher // num_student) - 1 for m in range(1, num_student + 1)]


@register_knowledge("attn", "feature", "TinyBERT attention distillation: MSE between attention maps of mapped layers")
class AttentionDistill(Knowledge):
    r"""TinyBERT's attention-based distillation.

    Jiao, Yin, Shang, Jiang, Chen, Li, Wang & Liu, "TinyBERT: Distilling BERT for Natural Language
    Understanding", Findings of EMNLP 2020, arXiv:1909.10351.

    Student layer :math:`m` (of :math:`M`) learns from teacher layer :math:`n = g(m) = m \cdot N / M`
    (floored; the last student layer learns from the last teacher layer). For each pair, with
    :math:`A_i \in \mathbb{R}^{T \times T}` the attention map of head :math:`i` of :math:`h`:

    .. math::
        L_{attn} = \sum_{(m, n)} \frac{1}{h} \sum_{i=1}^{h} \mathrm{MSE}\big(A^S_{m,i}, A^T_{n,i}\big)

    where MSE averages over batch and map entries. Differences to the paper, and why:

    * :math:`A` are attention *probabilities* (after the softmax), not TinyBERT's pre-softmax scores:
      Hugging Face models return probabilities, and scores carry an arbitrary per-row offset (and the
      -10000 padding mask) that the softmax removes. The probabilities are taken before attention
      dropout (see ``kdray.models.hf``).
    * Padding: padded key columns are 0 in both maps; padded query rows (which still attend to the
      real tokens) are left out of the mean, so the loss averages over each sample's real
      :math:`T_b \times T_b` block (the tokens are read off the teacher's map: a padded key has
      probability 0 everywhere). Without padding this is exactly the plain MSE of the paper.
    * Different head counts (the paper's students keep 12 heads): the head-averaged maps are compared.

    Sequence lengths must match (same tokens for both models).

    Reference: github.com/huawei-noah/Pretrained-Language-Model ``TinyBERT/task_distill.py`` (the attention
    term of its intermediate-layer distillation: MSE of the mapped layers' attention scores, padding set to 0).
    Deliberate differences: the three listed above.
    """

    class Params(LayerPairsParams):
        teacher_layers: list[str] | None = Field(
            None, description="teacher attention taps (default: g(m) = m·N/M of the model's attention layers)")
        student_layers: list[str] | None = Field(
            None, description="student attention taps, paired in order (default: all of them)")

    def __init__(self, teacher_layers: list[str], student_layers: list[str]) -> None:
        super().__init__()
        if len(teacher_layers) != len(student_layers) or not teacher_layers:
            raise ValueError("attention distillation needs the same non-zero number of teacher and student layers")
        self.teacher_layers, self.student_layers = list(teacher_layers), list(student_layers)

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> Knowledge:
        t, s = kwargs.get("teacher_layers"), kwargs.get("student_layers")

        def layers(layout: ModelLayout, who: str) -> tuple[str, ...]:
            if not layout.attention_layers:
                raise ValueError(f"the {who} declares no attention layers (Hugging Face transformers do); "
                                 f"name {who}_layers explicitly")
            return layout.attention_layers

        if s is None:
            s = list(layers(student, "student")) if t is None else [
                layers(student, "student")[i] for i in uniform_layer_map(len(t), len(layers(student, "student")))]
        if t is None:
            t_all = layers(teacher, "teacher")
            t = [t_all[i] for i in uniform_layer_map(len(s), len(t_all))]
        return cls(t, s)

    def forward(self, a_s: list[Tensor] | Tensor, a_t: list[Tensor] | Tensor) -> Tensor:
        if isinstance(a_s, Tensor):
            a_s, a_t = [a_s], [a_t]
        total = a_s[0].new_zeros((), dtype=torch.float32)
        for s, t in zip(a_s, a_t):
            s, t = as_float(s), as_float(t)
            if s.dim() != 4 or t.dim() != 4 or s.shape[-2:] != t.shape[-2:] or s.shape[0] != t.shape[0]:
                raise ValueError(f"attention maps must be (B, heads, T, T) of one length, got {tuple(s.shape)} "
                                 f"and {tuple(t.shape)}")
            real = token_mask(t)
            if s.shape[1] != t.shape[1]:
                s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
            block = (real.unsqueeze(2) & real.unsqueeze(1)).unsqueeze(1).to(s.dtype)  # (B, 1, T, T)
            total = total + ((s - t).pow(2) * block).sum() / (block.sum() * s.shape[1]).clamp_min(1)
        return total

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(
            [student.features[n] for n in self.student_layers],
            [teacher.features[n] for n in self.teacher_layers],
        )


# -- more hints over layer pairs: NST, FSP, AB, VID (issue 12) ------------------------------------------


class _LayerPairs(Knowledge):
    """Shared plumbing of the hint losses summed over (teacher, student) layer pairs."""

    Params = LayerPairsParams

    def __init__(self, teacher_layers: list[str], student_layers: list[str]) -> None:
        super().__init__()
        if len(teacher_layers) != len(student_layers) or not teacher_layers:
            raise ValueError(f"{self.name} needs the same non-zero number of teacher and student layers")
        self.teacher_layers, self.student_layers = list(teacher_layers), list(student_layers)

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> Knowledge:
        t, s = paired_layers(kwargs, teacher, student)
        rest = {k: v for k, v in kwargs.items() if k not in ("teacher_layers", "student_layers")}
        return cls(t, s, **rest)

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(
            [student.features[n] for n in self.student_layers],
            [teacher.features[n] for n in self.teacher_layers],
        )


def _pairs(f_s: list[Tensor] | Tensor, f_t: list[Tensor] | Tensor) -> tuple[list[Tensor], list[Tensor]]:
    if isinstance(f_s, Tensor):
        f_s = [f_s]
    if isinstance(f_t, Tensor):
        f_t = [f_t]
    if len(f_s) != len(f_t):
        raise ValueError(f"{len(f_s)} student features against {len(f_t)} teacher features")
    return [as_float(f) for f in f_s], [as_float(f) for f in f_t]


def poly2_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    r""":math:`\frac{1}{B\,C_a C_b}\sum_{n,i,j} (a_{n,i}^\top b_{n,j})^2`, the mean of the polynomial kernel
    (d = 2, c = 0) over every pair of rows of (B, C_a, N) and (B, C_b, N) (a batched matmul, not
    RepDistiller's (B, C, C, N) broadcast)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


@register_knowledge("nst", "feature", "Neuron selectivity transfer: polynomial-kernel MMD between channel activation distributions")
class NST(_LayerPairs):
    r"""Neuron selectivity transfer.

    Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", 2017,
    arXiv:1707.01219; matched against RepDistiller ``distiller_zoo/NST.py`` (``NSTLoss``, commit b84f547).

    Each channel :math:`i` of a feature map is one sample :math:`f^i \in \mathbb{R}^{HW}` of the layer's
    distribution of neuron selectivity patterns, normalised :math:`\hat f^i = f^i / \|f^i\|_2`. For each
    layer pair, with :math:`C_T, C_S` channels, the squared MMD with the polynomial kernel
    :math:`k(x, y) = (x^\top y + c)^d`, :math:`d = 2, c = 0`:

    .. math::
        L_{nst} = \sum_{pairs} \frac{1}{B}\sum_{n=1}^{B} \Big[
            \frac{1}{C_T^2}\sum_{i,i'} k(\hat f_T^i, \hat f_T^{i'})
          + \frac{1}{C_S^2}\sum_{j,j'} k(\hat f_S^j, \hat f_S^{j'})
          - \frac{2}{C_T C_S}\sum_{i,j} k(\hat f_S^j, \hat f_T^i) \Big]

    as RepDistiller's ``full_loss`` (the teacher term is constant for the student, kept so that the value
    is the MMD itself, 0 for identical maps). Channel counts may differ; maps of different spatial size
    are average-pooled to the smaller size first (as ``at`` and RepDistiller); a vector tap (B, D) is read as
    one neuron over D positions. Because each channel is normalised, the loss is invariant to a positive
    rescaling of any channel. Default layers: the models' stage outputs, paired as ``at`` pairs them
    (RepDistiller: ``feat[1:-1]``, summed). The CRD benchmark's weight for NST is 50.

    Deliberate differences from the reference: none in the value; the kernel means are batched matrix
    products instead of its (B, C, C, N) broadcast, and a vector tap is read as one neuron.
    """

    def forward(self, f_s: list[Tensor] | Tensor, f_t: list[Tensor] | Tensor) -> Tensor:
        f_s, f_t = _pairs(f_s, f_t)
        total = f_s[0].new_zeros(())
        for s, t in zip(f_s, f_t):
            s, t = common_size(neuron_maps(s), neuron_maps(t))
            s, t = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)
            total = total + (poly2_kernel_mean(t, t).detach() + poly2_kernel_mean(s, s)
                             - 2 * poly2_kernel_mean(s, t))
        return total


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    r"""The FSP matrix :math:`G_{ij} = \frac{1}{hw}\sum_{x} F^1_i(x) F^2_j(x)` of two layers of one model,
    (B, C_1, C_2). The larger map is average-pooled to the smaller first (RepDistiller); a vector (B, D) is
    read as D channels at one position."""
    a = bottom.unsqueeze(-1) if bottom.dim() == 2 else bottom
    b = top.unsqueeze(-1) if top.dim() == 2 else top
    a, b = common_size(a, b)
    a, b = a.flatten(2), b.flatten(2)
    return torch.bmm(a, b.transpose(1, 2)) / a.shape[2]


def fsp_shape(bottom: Tensor, top: Tensor) -> tuple[int, int]:
    return (bottom.shape[1], top.shape[1])


@register_knowledge("fsp", "feature", "FSP: match the Gram (flow) matrices between consecutive layers")
class FSP(_LayerPairs):
    r"""Flow of solution procedure (FSP) matrices.

    Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and
    Transfer Learning", CVPR 2017; matched against RepDistiller ``distiller_zoo/FSP.py`` (``FSP``, commit
    b84f547).

    For two layers :math:`F^1 \in \mathbb{R}^{h \times w \times m}`, :math:`F^2 \in \mathbb{R}^{h \times w
    \times n}` of the same model, :math:`G(F^1, F^2)_{ij} = \frac{1}{hw}\sum_{s,t} F^1_{s,t,i} F^2_{s,t,j}`.
    With the layers :math:`l_1 \dots l_K` of each model taken in consecutive pairs :math:`(l_k, l_{k+1})`:

    .. math::
        L_{fsp} = \sum_{k=1}^{K-1} \frac{1}{B\,m_k n_k} \sum_{x=1}^{B}
                  \big\| G_T(l_k, l_{k+1}; x) - G_S(l_k, l_{k+1}; x) \big\|_F^2

    the paper's equal weights :math:`\lambda_k`, averaged over batch and entries as RepDistiller's
    ``(s - t).pow(2).mean()``, summed over pairs. Within a pair the larger map is pooled to the smaller
    (RepDistiller). A single layer is paired with itself (its channel Gram matrix), so a model that declares
    one stage still has a loss. Default layers: the models' stage outputs, as ``at`` pairs them (RepDistiller:
    ``feat[:-1]``).

    The teacher's and student's FSP matrices must have the same size, i.e. equal channel counts layer by
    layer (the paper pairs networks of equal widths; RepDistiller raises "num of channels not equal").
    kdray checks this in ``bind`` (so ``kdray check`` / the dry run reports it before training) and refuses
    with an error naming the layers; there is no learned connector. The paper trains this stage alone
    before the main task (RepDistiller too: weight 0 afterwards); here it is one term of the joint objective.

    Deliberate differences from the reference: a single layer is paired with itself (RepDistiller needs two),
    unequal channels are refused in ``bind`` naming the layers (RepDistiller raises at construction), and the
    term is part of the joint objective rather than a separate first stage.
    """

    def layer_pairs(self) -> list[tuple[int, int]]:
        n = len(self.teacher_layers)
        return [(0, 0)] if n == 1 else [(i, i + 1) for i in range(n - 1)]

    def _check(self, f_s: list[Tensor], f_t: list[Tensor]) -> None:
        for i, j in self.layer_pairs():
            gs, gt = fsp_shape(f_s[i], f_s[j]), fsp_shape(f_t[i], f_t[j])
            if gs != gt:
                raise ValueError(
                    f"fsp needs equal channel counts: teacher layers {self.teacher_layers[i]!r} -> "
                    f"{self.teacher_layers[j]!r} give a {gt[0]}x{gt[1]} FSP matrix, student layers "
                    f"{self.student_layers[i]!r} -> {self.student_layers[j]!r} a {gs[0]}x{gs[1]} one; name "
                    "teacher_layers/student_layers whose channels match, or use another knowledge type")

    def bind(self, teacher_features: dict[str, Tensor], student_features: dict[str, Tensor]) -> None:
        self._check([student_features[n] for n in self.student_layers],
                    [teacher_features[n] for n in self.teacher_layers])

    def forward(self, f_s: list[Tensor] | Tensor, f_t: list[Tensor] | Tensor) -> Tensor:
        f_s, f_t = _pairs(f_s, f_t)
        if len(f_s) != len(self.teacher_layers):
            raise ValueError(f"fsp was built for {len(self.teacher_layers)} layers, got {len(f_s)}")
        self._check(f_s, f_t)
        total = f_s[0].new_zeros(())
        for i, j in self.layer_pairs():
            total = total + (fsp_matrix(f_s[i], f_s[j]) - fsp_matrix(f_t[i], f_t[j])).pow(2).mean()
        return total


def _batch_norm(channels: int, rank: int) -> nn.Module:
    """BatchNorm over dim 1 of a (B, C, *spatial) tensor of ``rank`` dims per sample."""
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}[rank](channels)


class ABConnector(nn.Module):
    """AB's connector r(·): FitNet's ``Regressor`` (a 1x1 convolution, then pooling to the teacher's size)
    followed by BatchNorm, as RepDistiller's ``ConvReg(use_relu=False)`` (conv + BN, no ReLU)."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.student_shape, self.teacher_shape = tuple(student_shape), tuple(teacher_shape)
        self.proj = Regressor(student_shape, teacher_shape)
        self.bn = _batch_norm(teacher_shape[0], len(teacher_shape))

    def forward(self, f_s: Tensor) -> Tensor:
        return self.bn(self.proj(f_s))


@register_knowledge("ab", "feature", "Activation boundaries: hinge loss so student neurons fire where the teacher's do")
class AB(_LayerPairs):
    r"""Distillation of activation boundaries.

    Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
    Neurons", AAAI 2019, arXiv:1811.03233; matched against RepDistiller ``distiller_zoo/AB.py`` (``ABLoss``)
    and ``models/util.py`` (``Connector``, ``ConvReg``), commit b84f547.

    With :math:`T` the teacher's pre-activation, :math:`S = r(F_S)` the connector's output for the student
    layer and margin :math:`\mu`, for layer pair :math:`k` of :math:`K`:

    .. math::
        \ell_k = \sum \Big[ (S + \mu)^2 \, \mathbb{1}[S > -\mu,\ T \le 0]
                         + (S - \mu)^2 \, \mathbb{1}[S \le \mu,\ T > 0] \Big]

        L_{ab} = \sum_{k=1}^{K} 2^{\,k-K} \cdot \frac{3}{1000} \cdot \frac{\ell_k}{B}

    (sums over all elements; the per-layer weights :math:`2^{k-K}`, the last pair weighing 1, and the
    scale 3/1000 are RepDistiller's; :math:`\mu = 1`). The student is pushed to the right side of the
    teacher's activation boundary with a margin, not to the teacher's values.

    Taps: kdray taps module outputs, which for most CNN stages are *after* the ReLU (RepDistiller asks its
    models for ``preact=True`` features). For the teacher this changes nothing: only the sign of
    :math:`T` enters and :math:`\mathrm{ReLU}(x) > 0 \iff x > 0`. For the student, the connector is
    always used, even where shapes match (RepDistiller uses the identity there): a post-ReLU tap is
    :math:`\ge 0` and could never reach the :math:`-\mu` side, while the connector (a 1x1 convolution,
    pooling to the teacher's size, BatchNorm, as ``ConvReg(use_relu=False)``) gives a pre-activation-like
    signed response. To distil a true pre-activation, name it (e.g. a block's last BatchNorm) in
    ``student_layers``. The paper (and RepDistiller) trains this loss alone as an initialisation stage and
    then drops it (weight 0); here it is one term of the joint objective. Default layers: the stage outputs,
    paired as ``at`` pairs them (RepDistiller: ``feat[1:-1]``).

    Deliberate differences from the reference, both explained above: the connector is used where shapes match
    too (RepDistiller: the identity), and post-ReLU taps stand in for the teacher's pre-activations (only their
    sign is read).
    """

    class Params(LayerPairsParams):
        margin: float = Field(1.0, ge=0, description="margin mu around the activation boundary")

    def __init__(self, teacher_layers: list[str], student_layers: list[str], margin: float = 1.0) -> None:
        super().__init__(teacher_layers, student_layers)
        self.margin = float(margin)
        self.connectors: nn.ModuleList | None = None

    def _connect(self, f_s: list[Tensor], f_t: list[Tensor]) -> None:
        self.connectors = nn.ModuleList(
            ABConnector(tuple(s.shape[1:]), tuple(t.shape[1:])) for s, t in zip(f_s, f_t)).to(f_s[0].device)

    def bind(self, teacher_features: dict[str, Tensor], student_features: dict[str, Tensor]) -> None:
        self._connect([student_features[n] for n in self.student_layers],
                      [teacher_features[n] for n in self.teacher_layers])

    def forward(self, f_s: list[Tensor] | Tensor, f_t: list[Tensor] | Tensor) -> Tensor:
        f_s, f_t = _pairs(f_s, f_t)
        if self.connectors is None:  # used directly on tensors: infer the connectors now
            self._connect(f_s, f_t)
        m, n = self.margin, len(f_s)
        total = f_s[0].new_zeros(())
        for k, (s, t, r) in enumerate(zip(f_s, f_t, self.connectors)):
            s = r(s)
            on = t > 0
            loss = ((s + m).pow(2) * ((s > -m) & ~on) + (s - m).pow(2) * ((s <= m) & on)).sum()
            total = total + 2.0 ** (k + 1 - n) * loss / s.shape[0] / 1000 * 3
        return total


def _one_by_one(rank: int):
    """A bias-free 1x1 convolution for (B, C, *spatial) tensors of ``rank`` dims per sample, or a linear map."""
    if rank == 1:
        return lambda i, o: nn.Linear(i, o, bias=False)
    conv = {2: nn.Conv1d, 3: nn.Conv2d, 4: nn.Conv3d}[rank]
    return lambda i, o: conv(i, o, kernel_size=1, bias=False)


class VIDConnector(nn.Module):
    r"""VID's variational model :math:`q(t \mid s) = \mathcal{N}(\mu(s), \sigma^2)` for one layer pair.

    :math:`\mu`: three bias-free 1x1 convolutions with ReLUs between, C_S -> C_T -> C_T -> C_T (RepDistiller's
    ``VIDLoss(s, t, t)``); :math:`\sigma^2_c = \mathrm{softplus}(\alpha_c) + \epsilon`, one per teacher channel,
    :math:`\alpha` initialised so that :math:`\sigma^2 = ` ``init_pred_var``. Taps of different rank (a vector
    against a map): the student is flattened and the same MLP of linear maps ends in the teacher's shape.
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...],
                 init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.student_shape, self.teacher_shape = tuple(student_shape), tuple(teacher_shape)
        s, t = self.student_shape, self.teacher_shape
        c = t[0]
        self.same_rank = len(s) == len(t) and len(s) <= 4
        if self.same_rank:
            layer, c_in, c_out = _one_by_one(len(s)), s[0], c
        else:
            layer, c_in, c_out = _one_by_one(1), math.prod(s), math.prod(t)
        self.mean = nn.Sequential(layer(c_in, c), nn.ReLU(), layer(c, c), nn.ReLU(), layer(c, c_out))
        self.eps = float(eps)
        self.log_scale = nn.Parameter(torch.full((c,), math.log(math.expm1(init_pred_var - eps))))

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        if self.same_rank:
            if f_s.dim() > 2:
                f_s, f_t = common_size(f_s, f_t)
            mu = self.mean(f_s)
        else:
            mu = self.mean(f_s.flatten(1)).view(f_t.shape)
        var = (F.softplus(self.log_scale) + self.eps).view(1, -1, *([1] * (f_t.dim() - 2)))
        return 0.5 * ((mu - f_t).pow(2) / var + var.log()).mean()


@register_knowledge("vid", "feature", "Variational information distillation: Gaussian likelihood of teacher features given the student's")
class VID(_LayerPairs):
    r"""Variational information distillation.

    Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation for Knowledge Transfer",
    CVPR 2019, arXiv:1904.05835; matched against RepDistiller ``distiller_zoo/VID.py`` (``VIDLoss``, commit
    b84f547) and its use in ``train_student.py`` (``VIDLoss(s, t, t)``, summed over ``feat[1:-1]``).

    Maximising a variational lower bound on the mutual information :math:`I(t; s)` amounts to minimising
    the negative log-likelihood of the teacher feature under a Gaussian whose mean is regressed from the
    student feature and whose variance is learned per channel (constant terms dropped):

    .. math::
        L_{vid} = \sum_{pairs} \frac{1}{B\,C\,HW} \sum_{n,c,h,w}
                  \frac{1}{2}\Big[ \frac{\big(t_{n,c,h,w} - \mu_c(s_n)_{h,w}\big)^2}{\sigma_c^2}
                  + \log \sigma_c^2 \Big],
        \qquad \sigma_c^2 = \log(1 + e^{\alpha_c}) + \epsilon

    with :math:`\mu` three 1x1 convolutions (``VIDConnector``), :math:`\sigma^2` initialised to
    ``init_pred_var`` = 5 and :math:`\epsilon = 10^{-5}` (RepDistiller's defaults). Maps of different
    spatial size are average-pooled to the smaller size first (teacher or student, as RepDistiller).
    One connector per layer pair is created in ``bind`` and trained with the student. The loss can be
    negative (a log-likelihood). The CRD benchmark's weight for VID is 1.

    Deliberate differences from the reference: none in the value; a vector tap is a map of one position.
    """

    class Params(LayerPairsParams):
        init_pred_var: float = Field(5.0, gt=0, description="initial variance sigma^2 of every channel")
        eps: float = Field(1e-5, gt=0, description="variance floor epsilon")

        @model_validator(mode="after")
        def _var_above_eps(self) -> "VID.Params":
            if self.init_pred_var <= self.eps:
                raise ValueError(f"init_pred_var ({self.init_pred_var}) must exceed eps ({self.eps})")
            return self

    def __init__(self, teacher_layers: list[str], student_layers: list[str], init_pred_var: float = 5.0,
                 eps: float = 1e-5) -> None:
        super().__init__(teacher_layers, student_layers)
        self.init_pred_var, self.eps = float(init_pred_var), float(eps)
        self.connectors: nn.ModuleList | None = None

    def _connect(self, f_s: list[Tensor], f_t: list[Tensor]) -> None:
        self.connectors = nn.ModuleList(
            VIDConnector(tuple(s.shape[1:]), tuple(t.shape[1:]), self.init_pred_var, self.eps)
            for s, t in zip(f_s, f_t)).to(f_s[0].device)

    def bind(self, teacher_features: dict[str, Tensor], student_features: dict[str, Tensor]) -> None:
        self._connect([student_features[n] for n in self.student_layers],
                      [teacher_features[n] for n in self.teacher_layers])

    def forward(self, f_s: list[Tensor] | Tensor, f_t: list[Tensor] | Tensor) -> Tensor:
        f_s, f_t = _pairs(f_s, f_t)
        if self.connectors is None:  # used directly on tensors: infer the connectors now
            self._connect(f_s, f_t)
        total = f_s[0].new_zeros(())
        for s, t, c in zip(f_s, f_t, self.connectors):
            total = total + c(s, t)
        return total


# -- OFD and ReviewKD (issue 12) -----------------------------------------------------------------------
def bn_margin(gamma: Tensor, beta: Tensor) -> Tensor:
    r"""OFD's margin per channel: :math:`m = E[x \mid x < 0]` for :math:`x \sim \mathcal{N}(\beta, \gamma^2)`,
    the distribution a BatchNorm with weight :math:`\gamma` and bias :math:`\beta` gives its outputs.

    .. math::
        m = \beta - |\gamma| \, \frac{\phi(\beta / |\gamma|)}{\Phi(-\beta / |\gamma|)}

    (the mean of a normal truncated above at 0), or :math:`-3|\gamma|` where
    :math:`\Phi(-\beta/|\gamma|) \le 0.001` (almost no negative responses): the reference's
    ``get_margin_from_BN`` (overhaul-distillation ``CIFAR-100/distiller.py``), vectorised and computed in
    float64. A channel with :math:`\gamma = 0` is the constant :math:`\beta`: its margin is
    :math:`\min(\beta, 0)` (the reference divides by zero there).
    """
    s, m = gamma.detach().double().abs(), beta.detach().double()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    z = m / safe
    cdf = torch.special.ndtr(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    margin = torch.where(cdf > 1e-3, m - safe * pdf / cdf.clamp_min(1e-300), -3 * s)
    return torch.where(s > 0, margin, m.clamp(max=0)).float()


def batch_margin(f_t: Tensor) -> Tensor:
    """OFD's margin from one batch of teacher features (B, C, *spatial) or (B, C): ``bn_margin`` of each
    channel's mean and standard deviation over batch and positions, a stand-in for the BatchNorm's β and γ."""
    f = f_t.detach().transpose(0, 1).reshape(f_t.shape[1], -1).double()
    return bn_margin(f.std(1, unbiased=False), f.mean(1))


def ofd_partial_l2(f_s: Tensor, f_t: Tensor, margin: Tensor) -> Tensor:
    r"""OFD's partial L2 :math:`\sum_i [\,s_i > t_i \ \lor\ t_i > 0\,] (s_i - t_i)^2` with the teacher
    clamped below at the margin, :math:`t = \max(F_t, m)`: positions where student :math:`\le` teacher
    :math:`\le 0` are skipped (both "off"; the student is already at or below the teacher's negative
    response). ``margin`` is per channel (dim 1) and broadcast; returns the sum (reference
    ``distillation_loss``)."""
    m = margin.to(f_t).view(1, -1, *([1] * (f_t.dim() - 2)))
    t = torch.maximum(f_t, m)
    keep = (f_s > t) | (t > 0)
    return ((f_s - t).pow(2) * keep).sum()


class OFDConnector(nn.Module):
    """OFD's connector: a bias-free 1x1 convolution (a bias-free linear map for vectors) from the student's
    channels to the teacher's, then BatchNorm, weights He-normal over fan-out, BN weight 1 and bias 0
    (reference ``build_feature_connector``). Taps of different rank: flatten, bias-free linear map,
    reshape to the teacher's shape, BatchNorm. Spatial size stays the student's (the teacher is pooled to it)."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.student_shape, self.teacher_shape = tuple(student_shape), tuple(teacher_shape)
        s, t = self.student_shape, self.teacher_shape
        if len(s) == len(t) and len(s) <= 4:
            self.kind = "conv1x1" if len(s) > 1 else "linear"
            self.proj: nn.Module = _one_by_one(len(s))(s[0], t[0])
        else:
            self.kind = "flatten-linear"
            self.proj = nn.Linear(math.prod(s), math.prod(t), bias=False)
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_out", nonlinearity="relu")  # N(0, 2 / (k²·C_out))
        self.bn = _batch_norm(t[0], len(t))

    def forward(self, f_s: Tensor) -> Tensor:
        if self.kind == "flatten-linear":
            return self.bn(self.proj(f_s.flatten(1)).view(f_s.shape[0], *self.teacher_shape))
        return self.bn(self.proj(f_s))


@register_knowledge("ofd", "feature",
                    "Overhaul of feature distillation: partial L2 to pre-ReLU teacher features clamped at a BN margin")
class OFD(_LayerPairs):
    r"""A comprehensive overhaul of feature distillation (OFD).

    Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul of Feature Distillation", ICCV 2019,
    arXiv:1904.01866; matched against overhaul-distillation ``CIFAR-100/distiller.py`` (``distillation_loss``,
    ``build_feature_connector``, ``get_margin_from_BN``) and ``train_with_distillation.py`` (line 91:
    ``loss_distill.sum() / batch_size / 1000``), commit 76344a8, and mdistiller ``mdistiller/distillers/OFD.py``
    (commit a08d46f).

    For layer pair :math:`i` of :math:`n`, with :math:`r_i` the connector (1x1 conv + BN) on the student
    feature, :math:`F_t` the teacher's *pre-ReLU* feature and the per-channel margin
    :math:`m_c = E[x \mid x < 0]`, :math:`x \sim \mathcal{N}(\beta_c, \gamma_c^2)` read off the teacher's
    BatchNorm before the ReLU (``bn_margin``):

    .. math::
        L_{ofd} = \frac{1}{1000\,B} \sum_{i=1}^{n} 2^{\,i-n} \sum_{\text{elements}}
                  \big[ s > t \ \lor\ t > 0 \big] (s - t)^2,
        \qquad s = r_i(F_s), \quad t = \max(F_t, m)

    i.e. the teacher is clamped below at the margin and the partial L2 skips positions where student
    :math:`\le` teacher :math:`\le 0` (``ofd_partial_l2``); the per-layer weights :math:`2^{i-n}` (the last
    pair weighs 1) and the scale 1/(1000 B) are the reference's (mdistiller: ``FEAT_WEIGHT`` 0.001 and a
    mean over the batch), so the default weight is 1. When spatial sizes differ the teacher is average-pooled
    to the student's (mdistiller). Default layers: the models' stage outputs, paired as ``at`` pairs them
    (the reference: all three CIFAR stages, mdistiller ``preact_feats[1:]``).

    The margin's BatchNorm: ``bind_models`` (called before the dry forward pass) watches the teacher's
    BatchNorm modules in each hint layer's subtree and ``bind`` takes the *last one executed* (the layer
    itself when it is a BatchNorm). For kdray's CIFAR ResNets that is ``layerN.<last block>.bn2``, the BN the
    reference's ``get_bn_before_relu`` returns. A hint layer with no BatchNorm in it is refused with an error
    naming it. Used directly on tensors (no ``bind_models``), the margin is estimated from the teacher batch:
    ``bn_margin`` of each channel's mean and standard deviation (``batch_margin``).

    Pre-ReLU taps: kdray taps module outputs. A kdray CIFAR ResNet block computes ``relu(bn2(..) + shortcut)``
    inside its ``forward``, so its pre-ReLU output (the reference's feature) is no module's output: the default
    teacher taps ``layer1``..``layer3`` are *after* the ReLU. The loss is then exactly OFD's with a margin of
    0: the clamp :math:`\max(F_t, m)` changes nothing (:math:`F_t \ge 0 > m`), targets are matched where the
    teacher fires and, where it does not, the student is pushed to :math:`\le 0` instead of to
    :math:`\le \max(F_t^{pre}, m)`. Pre-ReLU taps that exist: in a ResNet, ``layerN.K.bn2`` (the residual
    branch before the shortcut is added; margin from that BN itself); in kdray's pre-activation WRNs, the
    stage outputs ``block1``..``block3`` are pre-ReLU sums, and the reference's exact features are the BN
    outputs ``block2.0.bn1``, ``block3.0.bn1``, ``bn1`` (its ``get_bn_before_relu``; name these, since the
    BN found inside ``blockN`` would be the wrong one). The student taps need no ReLU-care: the connector
    (conv + BN) gives a signed response.

    Deliberate differences from the reference, described above: post-ReLU taps where a model has no pre-ReLU
    module output (the margin then acts as 0), and a margin estimated from the teacher batch when the loss is
    used on tensors alone.
    """

    def __init__(self, teacher_layers: list[str], student_layers: list[str]) -> None:
        super().__init__(teacher_layers, student_layers)
        self.connectors: nn.ModuleList | None = None
        self.margin_layers: list[str] = []  # the teacher BatchNorm each margin was read from
        self._bn_candidates: list[list[tuple[str, nn.Module]]] = []  # plain lists: not submodules
        self._bn_executed: list[tuple[str, nn.Module] | None] = []
        self._bn_hooks: list[Any] = []

    # -- the teacher's BatchNorms ------------------------------------------------------------------------
    def bind_models(self, teacher_net: nn.Module, student_net: nn.Module) -> None:
        self._release_hooks()
        modules = dict(teacher_net.named_modules())
        self._bn_candidates, self._bn_executed = [], [None] * len(self.teacher_layers)
        for i, name in enumerate(self.teacher_layers):
            layer = modules.get(name)
            if layer is None:
                raise ValueError(f"teacher layer {name!r} does not exist")
            bns = [(f"{name}.{sub}" if sub else name, m) for sub, m in layer.named_modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if not bns:
                raise ValueError(
                    f"ofd reads its margin from the teacher's BatchNorm before the ReLU, but teacher layer {name!r} "
                    f"({type(layer).__name__}) has no BatchNorm in it; name teacher_layers that are or contain the "
                    "BatchNorm before a ReLU (e.g. a block's bn2)")
            self._bn_candidates.append(bns)
            for full, m in bns:
                self._bn_hooks.append(m.register_forward_hook(self._recorder(i, full)))

    def _recorder(self, i: int, full: str):
        def hook(module, _inputs, _output):
            self._bn_executed[i] = (full, module)
        return hook

    def _release_hooks(self) -> None:
        for h in self._bn_hooks:
            h.remove()
        self._bn_hooks = []

    def _resolve_margins(self) -> None:
        """The margins from the last BatchNorm executed in each hint layer (during the dry forward pass; the last
        one registered if none ran), then the watch ends."""
        self._release_hooks()
        if not self._bn_candidates:
            return
        names = []
        for i, cands in enumerate(self._bn_candidates):
            full, bn = self._bn_executed[i] or cands[-1]
            gamma = bn.weight if bn.weight is not None else torch.ones(bn.num_features)
            beta = bn.bias if bn.bias is not None else torch.zeros(bn.num_features)
            self.register_buffer(f"margin{i}", bn_margin(gamma, beta).to(gamma.device), persistent=False)
            names.append(full)
        self.margin_layers = names
        self._bn_candidates, self._bn_executed = [], []

    def margins(self) -> list[Tensor] | None:
        if self._bn_candidates:
            self._resolve_margins()
        if not self.margin_layers:
            return None
        return [getattr(self, f"margin{i}") for i in range(len(self.teacher_layers))]

    # -- connectors and the loss -------------------------------------------------------------------------
    def _connect(self, f_s: list[Tensor], f_t: list[Tensor]) -> None:
        self.connectors = nn.ModuleList(
            OFDConnector(tuple(s.shape[1:]), tuple(t.shape[1:])) for s, t in zip(f_s, f_t)).to(f_s[0].device)

    def bind(self, teacher_features: dict[str, Tensor], student_features: dict[str, Tensor]) -> None:
        self._connect([student_features[n] for n in self.student_layers],
                      [teacher_features[n] for n in self.teacher_layers])
        self._resolve_margins()

    def forward(self, f_s: list[Tensor] | Tensor, f_t: list[Tensor] | Tensor) -> Tensor:
        f_s, f_t = _pairs(f_s, f_t)
        if self.connectors is None:  # used directly on tensors: infer the connectors now
            self._connect(f_s, f_t)
        if len(f_s) != len(self.connectors):
            raise ValueError(f"ofd was built for {len(self.connectors)} layers, got {len(f_s)}")
        bound = self.margins()
        n = len(f_s)
        total = f_s[0].new_zeros(())
        for i, (s, t, r) in enumerate(zip(f_s, f_t, self.connectors)):
            t = t.detach()
            margin = bound[i] if bound is not None else batch_margin(t)
            s = r(s)
            if s.dim() == t.dim() and s.dim() > 2 and s.shape[2:] != t.shape[2:]:
                t = resize_to(t, tuple(s.shape[2:]))
            total = total + ofd_partial_l2(s, t, margin) / 2 ** (n - 1 - i)
        return total / f_s[0].shape[0] / 1000


class ABF(nn.Module):
    """ReviewKD's attention-based fusion for one stage (reference ``ABF``): a 1x1 conv + BN to ``mid``
    channels; where a deeper stage's residual is fused, it is resized (nearest) to this stage's size, and a
    1x1 conv + sigmoid on the concatenation gives two maps that weigh the stage and the residual; the fused
    map is resized (nearest) to the teacher's size, and a 3x3 conv + BN maps it to the teacher's channels.
    Returns (output, fused map: the residual for the next, shallower stage). Maps are (B, C, H, W)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None = None,
                out_size: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("this ABF fuses a deeper stage's residual; none was given")
            residual = F.interpolate(residual, size=tuple(x.shape[2:]), mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, 0:1] + residual * z[:, 1:2]
        if out_size is not None and tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def as_map2d(f: Tensor) -> Tensor:
    """A tap as a (B, C, H, W) map: a vector (B, C) is (B, C, 1, 1) (ReviewKD's pooled feature), a sequence
    (B, C, L) is (B, C, L, 1)."""
    if f.dim() == 2:
        return f[:, :, None, None]
    if f.dim() == 3:
        return f.unsqueeze(-1)
    if f.dim() == 4:
        return f
    raise ValueError(f"reviewkd fuses vectors and maps of up to 2 spatial dims, got a {tuple(f.shape)} tap")


def hcl(f_s: Tensor, f_t: Tensor, levels: tuple[int, ...] | list[int] = (4, 2, 1)) -> Tensor:
    r"""ReviewKD's hierarchical context loss for one stage, (B, C, H, W) maps of one shape:

    .. math::
        \mathrm{HCL} = \frac{\mathrm{MSE}(F_s, F_t) + \sum_{k} 2^{-k}\,\mathrm{MSE}(P_{l_k} F_s, P_{l_k} F_t)}
                            {1 + \sum_k 2^{-k}}

    :math:`P_l` adaptive average pooling to :math:`l \times l`, over the levels :math:`l_k` (4, 2, 1) smaller
    than the map (reference ``hcl``: a level :math:`l \ge h` is skipped; here :math:`l \ge \max(h, w)`, and a
    non-square map is pooled to :math:`\min(l, h) \times \min(l, w)`), :math:`k` counting the levels used.
    """
    loss = F.mse_loss(f_s, f_t)
    h, w = f_s.shape[2:]
    cnt = tot = 1.0
    for lvl in levels:
        if lvl >= max(h, w):
            continue
        size = (min(lvl, h), min(lvl, w))
        cnt /= 2.0
        loss = loss + F.mse_loss(F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size)) * cnt
        tot += cnt
    return loss / tot


def _with_embedding(layout: ModelLayout) -> ModelLayout:
    """The stage outputs and then the pooled embedding (ReviewKD's last "stage"), when the model declares one."""
    layers, emb = tuple(layout.feature_layers), layout.embedding_layer
    if emb and emb not in layers:
        layers = (*layers, emb)
    return layout._replace(feature_layers=layers)


@register_knowledge("reviewkd", "feature",
                    "Knowledge review: student stages fused deep to shallow (ABF), hierarchical context loss to the teacher")
class ReviewKD(_LayerPairs):
    r"""Knowledge review.

    Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021, arXiv:2104.09044; matched
    against ReviewKD ``CIFAR-100/model/reviewkd.py`` (``ABF``, ``ReviewKD``, ``build_review_kd``, ``hcl``) and
    ``CIFAR-100/train.py`` (lines 48-50, 222-225), commit cede6ea, and mdistiller
    ``mdistiller/distillers/ReviewKD.py`` and ``mdistiller/engine/cfg.py`` (lines 150-159), commit a08d46f.

    The student's stage features :math:`F_s^1 \dots F_s^n` (shallow to deep) are reviewed from deep to
    shallow: :math:`(O^n, R^n) = \mathrm{ABF}_n(F_s^n)` and
    :math:`(O^i, R^i) = \mathrm{ABF}_i(F_s^i, R^{i+1})` for :math:`i < n`, each ABF fusing its stage with the
    residual :math:`R^{i+1}` of the deeper ones by attention (``ABF``) and producing :math:`O^i` with the
    teacher's channels and size. Each output is compared with the teacher's feature of the same stage:

    .. math::
        L_{review} = \min\!\big(1, \tfrac{\mathrm{epoch}}{\mathrm{warmup}}\big)
                     \sum_{i=1}^{n} \mathrm{HCL}(O^i, F_t^i)

    with ``hcl``'s MSE at full size plus adaptive-average-pooled 4x4, 2x2, 1x1 levels weighted 1/2, 1/4,
    1/8, normalised by the weights' sum. The ABFs are connectors created in ``bind`` from the taps' shapes:
    stage :math:`i` maps the student's channels through ``mid_channels`` to the teacher's, default
    :math:`\min(512, C_s^n)`, the deepest student stage's channels (reference: ``mid_channel = min(512,
    in_channels[-1])``; 256 for resnet8x4). Vectors are (B, C, 1, 1) maps, sequences (B, C, L, 1).

    Default layers: the models' stage outputs followed by the pooled embedding (the reference's four CIFAR
    "stages" ``layer1``..``layer3`` and the pooled feature: ``layer1, layer2, layer3, flatten`` for kdray's
    ResNets), the last common number paired as ``at`` pairs them. The reference compares with the teacher's
    pre-ReLU stage outputs (``preact=True``) and the student's post-ReLU ones; kdray taps module outputs, so
    both are post-ReLU for kdray's ResNets (no module outputs a block's pre-ReLU sum); the ABF's final BN
    gives signed outputs either way. Warm-up: the loss ramps up linearly over ``warmup_epochs`` = 20
    (epochs 1-based as mdistiller's trainer; the reference's epoch counts from 0, so its first epoch has
    weight 0; before ``set_epoch`` is called the ramp is 0). Weight: 1 (mdistiller ``cfg.py``, the reference's
    ``--kd-loss-weight`` default); both use 5 for resnet32x4 -> resnet8x4 (mdistiller
    ``configs/cifar100/reviewkd.yaml``, ReviewKD ``script/reviewKD.sh``).

    Deliberate differences from the reference, described above: both models' taps are post-ReLU, and the
    warm-up counts epochs from 1 (mdistiller's trainer) rather than 0.
    """

    class Params(LayerPairsParams):
        mid_channels: int | None = Field(
            None, ge=1, description="ABF width (default: min(512, channels of the deepest student stage))")
        warmup_epochs: int = Field(20, ge=0, description="epochs over which the loss ramps up linearly (0: none)")
        pool_levels: list[int] = Field([4, 2, 1],
                                       description="HCL pooling levels l (l x l), each weighing half the last")

        @model_validator(mode="after")
        def _levels(self) -> "ReviewKD.Params":
            if any(lvl < 1 for lvl in self.pool_levels):
                raise ValueError(f"pool_levels must be positive, got {self.pool_levels}")
            return self

    def __init__(self, teacher_layers: list[str], student_layers: list[str], mid_channels: int | None = None,
                 warmup_epochs: int = 20, pool_levels: list[int] | tuple[int, ...] = (4, 2, 1)) -> None:
        super().__init__(teacher_layers, student_layers)
        self.mid_channels = None if mid_channels is None else int(mid_channels)
        self.warmup_epochs = int(warmup_epochs)
        self.pool_levels = tuple(int(lvl) for lvl in pool_levels)
        self.abfs: nn.ModuleList | None = None

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> Knowledge:
        t, s = paired_layers(kwargs, _with_embedding(teacher), _with_embedding(student))
        rest = {k: v for k, v in kwargs.items() if k not in ("teacher_layers", "student_layers")}
        return cls(t, s, **rest)

    def _connect(self, f_s: list[Tensor], f_t: list[Tensor]) -> None:
        mid = self.mid_channels or min(512, f_s[-1].shape[1])
        n = len(f_s)
        self.abfs = nn.ModuleList(
            ABF(s.shape[1], mid, t.shape[1], fuse=i < n - 1) for i, (s, t) in enumerate(zip(f_s, f_t))
        ).to(f_s[0].device)

    def bind(self, teacher_features: dict[str, Tensor], student_features: dict[str, Tensor]) -> None:
        self._connect([as_map2d(student_features[n]) for n in self.student_layers],
                      [as_map2d(teacher_features[n]) for n in self.teacher_layers])

    def review(self, f_s: list[Tensor], f_t: list[Tensor]) -> list[Tensor]:
        """The ABF outputs O^1..O^n (shallow to deep) for student maps and the teacher maps' sizes."""
        outs: list[Tensor] = [f_s[0]] * len(f_s)
        residual = None
        for i in range(len(f_s) - 1, -1, -1):
            outs[i], residual = self.abfs[i](f_s[i], residual, tuple(f_t[i].shape[2:]))
        return outs

    def forward(self, f_s: list[Tensor] | Tensor, f_t: list[Tensor] | Tensor) -> Tensor:
        f_s, f_t = _pairs(f_s, f_t)
        f_s, f_t = [as_map2d(f) for f in f_s], [as_map2d(f).detach() for f in f_t]
        if self.abfs is None:  # used directly on tensors: infer the connectors now
            self._connect(f_s, f_t)
        if len(f_s) != len(self.abfs):
            raise ValueError(f"reviewkd was built for {len(self.abfs)} layers, got {len(f_s)}")
        total = f_s[0].new_zeros(())
        for o, t in zip(self.review(f_s, f_t), f_t):
            total = total + hcl(o, t, self.pool_levels)
        ramp = min(1.0, self.epoch / self.warmup_epochs) if self.warmup_epochs > 0 else 1.0
        return ramp * total
