"""ReviewKD: distilling knowledge via knowledge review (Chen et al., CVPR 2021)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from kdray.knowledge.base import (
    Knowledge,
    LayerPairsParams,
    ModelLayout,
    paired_layers,
    register_knowledge,
)
from kdray.knowledge.feature import LayerPairsKnowledge
from kdray.knowledge.tensors import layer_pairs


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
        """(B, C_in, H, W) stage map[, deeper stage's (B, C_out, h, w) residual] -> (B, C_out, *out_size) twice."""
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
                    "Knowledge review: student stages fused deep to shallow (ABF), hierarchical context loss "
                    "to the teacher")
class ReviewKD(LayerPairsKnowledge):
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
        """(B, C_s, H, W) and (B, C_t, H, W) maps, shallow to deep (lists, one per layer pair) -> scalar."""
        f_s, f_t = layer_pairs(f_s, f_t)
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
