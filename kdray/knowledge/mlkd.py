"""MLKD: multi-level logit distillation (Jin, Wang & Lin, CVPR 2023)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from kdray.knowledge.base import Knowledge, KnowledgeParams, TapOutputs, as_float, register_knowledge

MLKD_TEMPERATURES = (2.0, 3.0, 4.0, 5.0, 6.0)
MLKD_WEAK_IN_STRONG_SUM = (2.0, 6.0)


def _median_fraction(x: Tensor) -> Tensor:
    """The fraction of the entries of ``x`` at or below their median, as the reference's mask
    ``x.le(np.percentile(x, 50)).mean()``: the median with linear interpolation (``torch.quantile``'s
    default, as ``np.percentile``'s), computed in float64 and compared in ``x``'s precision."""
    threshold = torch.quantile(x.detach().double(), 0.5).to(x.dtype)
    return (x.detach() <= threshold).float().mean()


def _mlkd_instance(z_s: Tensor, z_t: Tensor, t: float) -> Tensor:
    """The reference ``kd_loss``: T² · batch mean of KL(softmax(z_t/T) || softmax(z_s/T))."""
    log_p_s, log_p_t = F.log_softmax(z_s / t, dim=1), F.log_softmax(z_t / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


@register_knowledge("mlkd", "response",
                    "Multi-level logit distillation: KL, batch and class Gram matrices at several temperatures")
class MLKD(Knowledge):
    r"""Multi-level logit distillation (instance, batch and class alignment over several temperatures).

    Jin, Wang & Lin, "Multi-Level Logit Distillation", CVPR 2023, pp. 24276-24285 (no arXiv version).
    Reference: github.com/Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/distillers/KD_ours.py``
    (class ``KD_ours``), run by ``tools/train_ours.py`` with ``AugTrainer`` (``mdistiller/engine/trainer.py``
    lines 228-263).

    With :math:`P^T = \mathrm{softmax}(Z/T)` row-wise for a batch of logits :math:`Z \in \mathbb{R}^{B\times C}`
    and the set of temperatures :math:`\mathcal{T} = \{2, 3, 4, 5, 6\}` ("prediction augmentation"):

    .. math::
        L_{ins}(T) = T^2\,\frac{1}{B}\sum_{i=1}^{B}\mathrm{KL}\big(P^T_{t,i}\ \|\ P^T_{s,i}\big), \qquad
        L_{batch}(T) = \frac{1}{B}\big\|P^T_t P^{T\top}_t - P^T_s P^{T\top}_s\big\|_F^2, \qquad
        L_{class}(T) = \frac{1}{C}\big\|P^{T\top}_t P^T_t - P^{T\top}_s P^T_s\big\|_F^2

        L_{weak} = \sum_{T\in\mathcal{T}} \Big(\bar m\,\big(L_{ins}(T) + L_{batch}(T)\big) + \bar c\,L_{class}(T)\Big)

        L_{mlkd} = L_{weak} \;+\; \sum_{T\in\mathcal{T}} L_{ins}(T;\ \hat z_s, \hat z_t)
        \quad\text{(the last sum only with a strong view)}

    ``kd_loss``, ``bc_loss`` and ``cc_loss`` (lines 13-47) give :math:`L_{ins}`, :math:`L_{batch}` (B x B
    Gram matrices, squared error summed and divided by B) and :math:`L_{class}` (C x C, divided by C); only
    :math:`L_{ins}` carries the :math:`T^2` factor. The reference sums them over ``cfg.KD.TEMPERATURE`` = 4
    (``mdistiller/engine/cfg.py`` line 61) and the hard-coded 3, 5, 2, 6 (weak terms lines 115-140,
    164-185, 207-227).

    Teacher-confidence masks (lines 98-111), from the teacher's weak-view probabilities at
    :math:`T = 1`, no gradient: a sample counts when its confidence :math:`\max_c P^1_{t,ic}` is at or
    below the batch median; a class when its summed probability :math:`\sum_i P^1_{t,ic}` is at or below
    the median over classes (``np.percentile(..., 50)``, linear interpolation). Because ``kd_loss`` /
    ``bc_loss`` / ``cc_loss`` reduce to a scalar *before* ``(loss * mask).mean()`` (the ``reduce=False``
    of lines 119 and 168 is commented out), each mask acts only through the fraction of what it keeps:
    :math:`\bar m = |\{i\ \text{kept}\}|/B` (:math:`\approx \tfrac12`) scales :math:`L_{ins}` and
    :math:`L_{batch}`, :math:`\bar c = |\{c\ \text{kept}\}|/C` scales :math:`L_{class}`. kdray does the
    same (not a per-sample mask).

    Strong view (``strong_augment=True``; the reference's ``AugTrainer`` feeds each batch twice, the second
    time through ``RandAugment(2, 10)``, ``mdistiller/dataset/cifar100.py`` lines 321-340): the reference
    adds ``loss_kd_strong`` (lines 142-162), an *unmasked* :math:`L_{ins}` sum in which
    :math:`\hat z = ` the strong-view logits at :math:`T \in \{4, 3, 5\}` but, at :math:`T \in \{2, 6\}`,
    the *weak*-view logits again (lines 154-161). kdray reproduces this (``weak_in_strong_sum``; set it to
    ``[]`` to compare the strong view at every temperature). The strong-view Gram terms ``loss_cc_strong``
    and ``loss_bc_strong`` (lines 186-206, 228-248) are computed there but left out of ``losses_dict``
    (lines 249-254), so they are not in the loss here either. The reference also adds the cross-entropy of
    the strong view to its CE term (line 114); that belongs to the training loop, not to this term.
    Without a strong view the loss is :math:`L_{weak}` alone.

    Weights and schedule: :math:`L_{mlkd}` is the reference's loss divided by its ``KD_WEIGHT``; the
    reference's CIFAR-100 runs use CE weight 0.1 and KD weight 0.9 (``cfg.py`` lines 63-64, not overridden
    by ``configs/cifar100/ours/*.yaml``), so set ``weight: 0.9`` with ``ce_weight: 0.1``. Its ImageNet runs
    use temperature 1 in place of 4 and weights 0.5 / 0.5 (``configs/imagenet/r34_r18/kd_ours.yaml``):
    ``temperatures: [1, 2, 3, 5, 6]``. There is no warm-up (``forward_train`` ignores the epoch).
    The teacher's logits are detached.

    Deliberate differences from the reference: none in the value; the masks act through the fraction they
    keep, exactly as the reference's scalar-then-mask order makes them act (described above).
    """

    class Params(KnowledgeParams):
        temperatures: list[float] = Field(
            default_factory=lambda: list(MLKD_TEMPERATURES), min_length=1,
            description="the temperatures of the prediction augmentation; every level is summed over them "
                        "(the instance-level KL scaled by T², the batch and class alignments not)")
        strong_augment: bool = Field(
            False, description="also align the predictions on a strongly augmented view of each batch, as the "
                               "paper does; the training loop then runs student and teacher on a second view")
        weak_in_strong_sum: list[float] = Field(
            default_factory=lambda: list(MLKD_WEAK_IN_STRONG_SUM),
            description="temperatures at which the reference's strong-view KL sum compares the weak-view "
                        "logits instead (KD_ours.py lines 154-161); [] compares the strong view at every one")

        @model_validator(mode="after")
        def _positive(self) -> "MLKD.Params":
            if any(t <= 0 for t in self.temperatures) or any(t <= 0 for t in self.weak_in_strong_sum):
                raise ValueError("temperatures must be > 0")
            return self

    def __init__(
        self,
        temperatures: list[float] | tuple[float, ...] = MLKD_TEMPERATURES,
        strong_augment: bool = False,
        weak_in_strong_sum: list[float] | tuple[float, ...] = MLKD_WEAK_IN_STRONG_SUM,
    ) -> None:
        super().__init__()
        temperatures = [float(t) for t in temperatures]
        weak_in_strong_sum = [float(t) for t in weak_in_strong_sum]
        if not temperatures:
            raise ValueError("temperatures must not be empty")
        if any(t <= 0 for t in temperatures + weak_in_strong_sum):
            raise ValueError(f"temperatures must be > 0, got {temperatures} and {weak_in_strong_sum}")
        self.temperatures = temperatures
        self.strong_augment = bool(strong_augment)
        self.weak_in_strong_sum = weak_in_strong_sum

    @property
    def wants_strong_view(self) -> bool:
        return self.strong_augment

    def forward(
        self, z_s: Tensor, z_t: Tensor, z_s_strong: Tensor | None = None, z_t_strong: Tensor | None = None
    ) -> Tensor:
        """(B, C) student and teacher logits of the weak view[, (B, C) of the strong view] -> scalar."""
        if (z_s_strong is None) != (z_t_strong is None):
            raise ValueError("give both the student's and the teacher's strong-view logits, or neither")
        # float32 outside autocast: the Gram matrices are matmuls, which autocast would run in bf16/fp16
        with torch.autocast(z_s.device.type, enabled=False):
            z_s, z_t = as_float(z_s), as_float(z_t).detach()
            p_t1 = z_t.softmax(dim=1)
            sample_frac = _median_fraction(p_t1.max(dim=1).values)
            class_frac = _median_fraction(p_t1.sum(dim=0))
            b, c = z_s.shape
            instance = batch = klass = z_s.new_zeros(())
            for t in self.temperatures:
                instance = instance + _mlkd_instance(z_s, z_t, t)
                p_s, p_t = (z_s / t).softmax(dim=1), (z_t / t).softmax(dim=1)
                batch = batch + (p_t @ p_t.t() - p_s @ p_s.t()).pow(2).sum() / b
                klass = klass + (p_t.t() @ p_t - p_s.t() @ p_s).pow(2).sum() / c
            loss = sample_frac * (instance + batch) + class_frac * klass
            if z_s_strong is not None:
                zs2, zt2 = as_float(z_s_strong), as_float(z_t_strong).detach()
                for t in self.temperatures:
                    weak = t in self.weak_in_strong_sum
                    loss = loss + _mlkd_instance(z_s if weak else zs2, z_t if weak else zt2, t)
            return loss

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        if not self.strong_augment:
            return self(student.logits, teacher.logits)
        if student.strong is None or teacher.strong is None:
            raise ValueError("mlkd has strong_augment set, but the training loop gave no strong view "
                             "(TapOutputs.strong) of the student's or the teacher's outputs")
        return self(student.logits, teacher.logits, student.strong.logits, teacher.strong.logits)
