"""Response-based knowledge: the student matches the teacher's output distribution (logits)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdray.knowledge.base import Knowledge, KnowledgeParams, TapOutputs, as_float, register_knowledge


@register_knowledge("kd", "response", "Hinton's soft targets: KL between temperature-softened outputs")
class KD(Knowledge):
    r"""Vanilla knowledge distillation.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS Deep Learning
    Workshop 2015, arXiv:1503.02531.

    .. math::
        L_{kd} = T^2 \cdot \frac{1}{B} \sum_{i=1}^{B}
                 \mathrm{KL}\big(\mathrm{softmax}(z_{t,i}/T)\ \|\ \mathrm{softmax}(z_{s,i}/T)\big)

    The :math:`T^2` factor keeps the gradient scale independent of the temperature:
    :math:`\partial L / \partial z_s = T\,(\mathrm{softmax}(z_s/T) - \mathrm{softmax}(z_t/T)) / B`.
    """

    class Params(KnowledgeParams):
        temperature: float = Field(4.0, gt=0, description="T, the softmax temperature")

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        t = self.temperature
        log_p_s = F.log_softmax(as_float(z_s) / t, dim=1)
        log_p_t = F.log_softmax(as_float(z_t) / t, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(student.logits, teacher.logits)


@register_knowledge("dkd", "response", "Decoupled KD: target-class and non-target-class KL, weighted apart")
class DKD(Knowledge):
    r"""Decoupled knowledge distillation.

    Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679.

    With :math:`p = \mathrm{softmax}(z/T)` and the true class :math:`y`:

    * binary probabilities :math:`b = [p_y,\ 1 - p_y]`;
    * non-target distribution :math:`\hat p = \mathrm{softmax}(z/T)` restricted to the classes
      :math:`\ne y` (computed by masking :math:`z_y` before the softmax, as the reference code does).

    .. math::
        \mathrm{TCKD} = \mathrm{KL}(b_t \| b_s), \qquad
        \mathrm{NCKD} = \mathrm{KL}(\hat p_t \| \hat p_s)

        L_{dkd} = \min(1, \tfrac{\mathrm{epoch}}{\mathrm{warmup}}) \cdot T^2
                  \cdot \frac{1}{B}\sum_i (\alpha\,\mathrm{TCKD}_i + \beta\,\mathrm{NCKD}_i)

    Classical KD is the special case in which :math:`\beta` is tied to :math:`1 - p_{t,y}`; DKD frees it.
    The paper's CIFAR defaults are :math:`\alpha=1, \beta=8, T=4` with a 20-epoch warm-up.
    """

    uses_target = True

    class Params(KnowledgeParams):
        alpha: float = Field(1.0, ge=0, description="weight of the target-class term TCKD")
        beta: float = Field(8.0, ge=0, description="weight of the non-target-class term NCKD")
        temperature: float = Field(4.0, gt=0, description="T, the softmax temperature")
        warmup_epochs: int = Field(0, ge=0, description="epochs over which the loss ramps up linearly")

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup_epochs: int = 0
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.warmup_epochs = int(warmup_epochs)

    def forward(self, z_s: Tensor, z_t: Tensor, target: Tensor) -> Tensor:
        t = self.temperature
        z_s, z_t = as_float(z_s) / t, as_float(z_t) / t
        gt = F.one_hot(target, z_s.shape[1]).bool()
        p_s, p_t = z_s.softmax(1), z_t.softmax(1)
        b_s = torch.stack([p_s[gt], 1 - p_s[gt]], dim=1).clamp_min(1e-12)
        b_t = torch.stack([p_t[gt], 1 - p_t[gt]], dim=1).clamp_min(1e-12)
        tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean()
        # Masking with a large negative logit (not -inf) keeps 0·log 0 terms finite.
        log_q_s = F.log_softmax(z_s - 1000.0 * gt, dim=1)
        log_q_t = F.log_softmax(z_t - 1000.0 * gt, dim=1)
        nckd = F.kl_div(log_q_s, log_q_t, reduction="batchmean", log_target=True)
        ramp = min(1.0, self.epoch / self.warmup_epochs) if self.warmup_epochs > 0 else 1.0
        return ramp * (self.alpha * tckd + self.beta * nckd) * (t * t)

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(student.logits, teacher.logits, target)

