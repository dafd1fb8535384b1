"""OFD: a comprehensive overhaul of feature distillation (Heo et al., ICCV 2019)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kdray.knowledge.base import (
    register_knowledge,
)
from kdray.knowledge.feature import LayerPairsKnowledge, batch_norm, one_by_one
from kdray.knowledge.tensors import layer_pairs, resize_to


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
            self.proj: nn.Module = one_by_one(len(s))(s[0], t[0])
        else:
            self.kind = "flatten-linear"
            self.proj = nn.Linear(math.prod(s), math.prod(t), bias=False)
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_out", nonlinearity="relu")  # N(0, 2 / (k²·C_out))
        self.bn = batch_norm(t[0], len(t))

    def forward(self, f_s: Tensor) -> Tensor:
        """(B, C_s, *spatial) student map -> (B, C_t, *spatial), batch-normalised."""
        if self.kind == "flatten-linear":
            return self.bn(self.proj(f_s.flatten(1)).view(f_s.shape[0], *self.teacher_shape))
        return self.bn(self.proj(f_s))


@register_knowledge("ofd", "feature",
                    "Overhaul of feature distillation: partial L2 to pre-ReLU teacher features clamped at a BN margin")
class OFD(LayerPairsKnowledge):
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
        """(B, C_s, *spatial) and (B, C_t, *spatial) pre-ReLU maps (or lists, one per layer pair) -> scalar."""
        f_s, f_t = layer_pairs(f_s, f_t)
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
