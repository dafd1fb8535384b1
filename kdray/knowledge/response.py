"""Response-based knowledge: the student matches the teacher's output distribution (logits)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from kdray.knowledge.base import Knowledge, KnowledgeParams, TapOutputs, as_float, register_knowledge

STANDARDIZE_EPS = 1e-7


def standardize_logits(z: Tensor) -> Tensor:
    r"""Z-score each sample's logits over the classes (logit standardization).

    Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024,
    arXiv:2403.01427. As the reference ``normalize`` (github.com/sunshangquan/logit-standardization-KD,
    ``mdistiller/distillers/KD.py`` lines 7-10), with the unbiased standard deviation (``Tensor.std``) and
    the epsilon added to it:

    .. math::
        \mathcal{Z}(z) = \frac{z - \bar z}{10^{-7} + \sigma(z)}, \qquad
        \sigma(z) = \sqrt{\tfrac{1}{C-1} \textstyle\sum_c (z_c - \bar z)^2}

    The result is unchanged by adding a constant to a sample's logits or by scaling them by a positive
    factor, so the student need only match the teacher's logit *relations*, not its range.
    """
    return (z - z.mean(dim=1, keepdim=True)) / (STANDARDIZE_EPS + z.std(dim=1, keepdim=True))


def float_logits(z_s: Tensor, z_t: Tensor, standardize: bool) -> tuple[Tensor, Tensor]:
    """Both logit tensors in float32, z-scored first (:func:`standardize_logits`) when the type standardises."""
    z_s, z_t = as_float(z_s), as_float(z_t)
    return (standardize_logits(z_s), standardize_logits(z_t)) if standardize else (z_s, z_t)


_STANDARDIZE_DOC = (
    "z-score each sample's logits over the classes before the temperature (Sun et al., CVPR 2024); "
    "their runs pair it with temperature 2 and a loss weight of 9"
)


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

    With ``standardize=True`` the student's and the teacher's logits go through
    :func:`standardize_logits` first, :math:`z \mapsto \mathcal{Z}(z)` (Sun et al., "Logit
    Standardization in Knowledge Distillation", CVPR 2024). The reference keeps the :math:`T^2` factor
    (``mdistiller/distillers/KD.py`` line 18) and runs it with a *base* temperature of 2 and a KD weight
    of 9 (``tools/train.py`` lines 102-121, README); here the temperature default stays 4, so set
    ``temperature: 2`` (and ``weight: 9``) to reproduce their setting.

    Reference: RepDistiller ``distiller_zoo/KD.py`` (``DistillKL``) and mdistiller ``mdistiller/distillers/KD.py``
    (Hinton et al. published no code), which this matches: the summed KL per sample, averaged over the batch,
    times :math:`T^2`. Deliberate differences: none (the teacher's side enters as log-probabilities,
    ``log_target=True``: the same KL, without the log of a rounded probability).
    """

    class Params(KnowledgeParams):
        temperature: float = Field(4.0, gt=0, description="T, the softmax temperature")
        standardize: bool = Field(False, description=_STANDARDIZE_DOC)

    def __init__(self, temperature: float = 4.0, standardize: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.standardize = bool(standardize)

    def forward(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        """(B, C) student and teacher logits -> scalar."""
        t = self.temperature
        z_s, z_t = float_logits(z_s, z_t, self.standardize)
        log_p_s = F.log_softmax(z_s / t, dim=1)
        log_p_t = F.log_softmax(z_t / t, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(student.logits, teacher.logits)


def binary_log_probs(z: Tensor, gt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""DKD's binary split in log space: :math:`\log p_y`, :math:`\log(1 - p_y)` and the non-target logits (B, C-1).

    With :math:`d = z_y - \log\sum_{j \ne y} e^{z_j}`: :math:`\log p_y = \log\sigma(d)` and
    :math:`\log(1 - p_y) = \log\sigma(-d)`. Both stay exact in float32 when :math:`p_y` rounds to 1
    (a confident network at T = 1), where ``1 - p_y`` would be 0."""
    others = z[~gt].view(z.shape[0], -1)
    d = z[gt] - torch.logsumexp(others, dim=1)
    return F.logsigmoid(d), F.logsigmoid(-d), others


@register_knowledge("dkd", "response", "Decoupled KD: target-class and non-target-class KL, weighted apart")
class DKD(Knowledge):
    r"""Decoupled knowledge distillation.

    Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679.

    With :math:`p = \mathrm{softmax}(z/T)` and the true class :math:`y`:

    * binary probabilities :math:`b = [p_y,\ 1 - p_y]`, :math:`1 - p_y = \sum_{j \ne y} p_j`;
    * non-target distribution :math:`\hat p = \mathrm{softmax}(z/T)` restricted to the classes
      :math:`\ne y`.

    .. math::
        \mathrm{TCKD} = \mathrm{KL}(b_t \| b_s), \qquad
        \mathrm{NCKD} = \mathrm{KL}(\hat p_t \| \hat p_s)

        L_{dkd} = \min(1, \tfrac{\mathrm{epoch}}{\mathrm{warmup}}) \cdot T^2
                  \cdot \frac{1}{B}\sum_i (\alpha\,\mathrm{TCKD}_i + \beta\,\mathrm{NCKD}_i)

    Classical KD is the special case in which :math:`\beta` is tied to :math:`1 - p_{t,y}`; DKD frees it.
    The paper's CIFAR defaults are :math:`\alpha=1, \beta=8, T=4` with a 20-epoch warm-up; its ImageNet
    setting is :math:`\alpha=1, \beta=0.5, T=1`.

    Reference: github.com/megvii-research/mdistiller ``mdistiller/distillers/DKD.py`` (``dkd_loss``), which
    this matches. Deliberate differences, both exact rewritings of the same values:

    * :math:`\log p_y` and :math:`\log(1 - p_y)` are computed in log space (:func:`binary_log_probs`); the
      reference sums the non-target probabilities (``cat_mask``) and takes ``torch.log``, so in float32 a
      confident student (true-class margin 25 at T = 1) has :math:`\log p_y = 0` and loses the target-class
      gradient. Here value and gradient match float64 at margins up to 50.
    * :math:`\hat p` is the softmax over the :math:`C - 1` non-target logits themselves; the reference
      subtracts 1000 from the target logit first, the same up to :math:`e^{-1000}` while the margin stays
      below 1000.

    ``standardize=True`` z-scores both logit vectors first (:func:`standardize_logits`; Sun et al.,
    CVPR 2024, whose DKD keeps the :math:`T^2` factor, ``mdistiller/distillers/DKD.py`` lines 12-39, and
    runs with :math:`T=2` and :math:`\alpha, \beta` multiplied by 9).
    """

    uses_target = True

    class Params(KnowledgeParams):
        alpha: float = Field(1.0, ge=0, description="weight of the target-class term TCKD")
        beta: float = Field(8.0, ge=0, description="weight of the non-target-class term NCKD")
        temperature: float = Field(4.0, gt=0, description="T, the softmax temperature")
        warmup_epochs: int = Field(0, ge=0, description="epochs over which the loss ramps up linearly")
        standardize: bool = Field(False, description=_STANDARDIZE_DOC)

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup_epochs: int = 0,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.warmup_epochs = int(warmup_epochs)
        self.standardize = bool(standardize)

    def forward(self, z_s: Tensor, z_t: Tensor, target: Tensor) -> Tensor:
        """(B, C) student and teacher logits, (B,) true classes -> scalar."""
        t = self.temperature
        z_s, z_t = float_logits(z_s, z_t, self.standardize)
        z_s, z_t = z_s / t, z_t / t
        gt = F.one_hot(target, z_s.shape[1]).bool()
        ls_y, ls_o, others_s = binary_log_probs(z_s, gt)
        lt_y, lt_o, others_t = binary_log_probs(z_t, gt)
        tckd = (lt_y.exp() * (lt_y - ls_y) + lt_o.exp() * (lt_o - ls_o)).mean()
        log_q_s, log_q_t = others_s.log_softmax(1), others_t.log_softmax(1)
        nckd = F.kl_div(log_q_s, log_q_t, reduction="batchmean", log_target=True)
        ramp = min(1.0, self.epoch / self.warmup_epochs) if self.warmup_epochs > 0 else 1.0
        return ramp * (self.alpha * tckd + self.beta * nckd) * (t * t)

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(student.logits, teacher.logits, target)



# -- DIST ------------------------------------------------------------------------------------------------
def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``, as the DIST reference computes
    it: the cosine of the centred rows with ``eps`` added to the product of norms."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@register_knowledge("dist", "response",
                    "DIST: Pearson correlation of probabilities across classes and across the batch")
class DIST(Knowledge):
    r"""Distillation from a stronger teacher by relations of probabilities (DIST).

    Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022,
    arXiv:2205.10536. Reference: github.com/hunto/image_classification_sota (the ``classification``
    submodule of github.com/hunto/DIST_KD), ``lib/models/losses/dist_kd.py``.

    With :math:`P = \mathrm{softmax}(Z/T)` row-wise for a batch of logits :math:`Z \in \mathbb{R}^{B \times C}`
    and the Pearson correlation :math:`\rho(u, v) = \frac{(u - \bar u)\cdot(v - \bar v)}
    {\|u - \bar u\|\,\|v - \bar v\| + \epsilon}` (:math:`\epsilon = 10^{-8}`, as the reference):

    .. math::
        \mathrm{inter} = 1 - \frac{1}{B}\sum_{i=1}^{B} \rho(P_{s,i:},\ P_{t,i:}), \qquad
        \mathrm{intra} = 1 - \frac{1}{C}\sum_{c=1}^{C} \rho(P_{s,:c},\ P_{t,:c})

        L_{dist} = \beta\,T^2\,\mathrm{inter} + \gamma\,T^2\,\mathrm{intra}

    The inter-class term matches each sample's ranking of the classes; the intra-class term matches, for
    each class, how the batch's samples rank against one another. Both are invariant to a positive affine
    map of the probabilities, so the student need not reproduce a stronger teacher's exact values.
    An intra-class column of a batch of one sample has no variance: its correlation is 0 and the term a
    constant 1 (no gradient).

    Defaults: the paper states :math:`\beta = \gamma = \tau = 1` (ImageNet, ``kd: 'dist'`` →
    ``DIST(beta=1, gamma=1, tau=1)``, ``lib/models/losses/kd_loss.py`` lines 67-68). The defaults here
    are the repository's CIFAR-100 setting, ``configs/strategies/distill/dist_cifar.yaml`` lines 35-36:
    ``kd: dist_t4`` (:math:`\tau = 4`, ``kd_loss.py`` lines 69-71) with ``kd_loss_weight: 2``, folded
    into :math:`\beta = \gamma = 2` so that the knowledge weight stays 1.

    ``standardize=True`` z-scores both logit vectors before the temperature (:func:`standardize_logits`,
    Sun et al., CVPR 2024; their paper does not evaluate DIST, this is the same pre-process).

    Precision: standardisation, softmax and correlations are computed in float64 (B x C only) and the loss
    returned in float32, where the reference computes in float32. A correlation is scale-invariant, so a
    column whose entries are all within ~1e-7 of one another (every sample of a small batch confident in
    one class: probabilities near 1, which float32 resolves only to 2^-24) gets an arbitrary float32
    correlation: at B = 2, C = 5, T = 4 and a true-class margin of 50 the loss was 1.3 % off float64
    (17 % with ``standardize`` at C = 2, where every z-scored row is ±1/√2 up to rounding).

    Deliberate differences from the reference: the defaults fold its CIFAR ``kd_loss_weight: 2`` into
    :math:`\beta, \gamma` (above), and the computation runs in float64 (below).
    """

    class Params(KnowledgeParams):
        beta: float = Field(2.0, ge=0, description="β, weight of the inter-class relation (per sample, across classes)")
        gamma: float = Field(2.0, ge=0,
                             description="γ, weight of the intra-class relation (per class, across the batch)")
        temperature: float = Field(4.0, gt=0, description="τ, the softmax temperature (the loss is scaled by τ²)")
        standardize: bool = Field(False, description=_STANDARDIZE_DOC)

    def __init__(self, beta: float = 2.0, gamma: float = 2.0, temperature: float = 4.0,
                 standardize: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if beta < 0 or gamma < 0:
            raise ValueError(f"beta and gamma must be >= 0, got beta={beta}, gamma={gamma}")
        self.beta, self.gamma, self.temperature = float(beta), float(gamma), float(temperature)
        self.standardize = bool(standardize)

    def forward(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        """(B, C) student and teacher logits -> scalar."""
        t, dtype = self.temperature, as_float(z_s).dtype
        # float64 inside (see the docstring): probabilities near 1 decide the correlation of a column
        z_s, z_t = float_logits(as_float(z_s).double(), as_float(z_t).double(), self.standardize)
        p_s, p_t = (z_s / t).softmax(dim=1), (z_t / t).softmax(dim=1)
        inter = 1 - _pearson_rows(p_s, p_t).mean()
        intra = 1 - _pearson_rows(p_s.t(), p_t.t()).mean()
        return ((t * t) * (self.beta * inter + self.gamma * intra)).to(dtype)

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(student.logits, teacher.logits)


# -- CTKD ------------------------------------------------------------------------------------------------
class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -λ (Ganin & Lempitsky, ICML 2015)."""

    @staticmethod
    def forward(ctx, x: Tensor, lambda_: float) -> Tensor:  # type: ignore[override]
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return -ctx.lambda_ * grad, None


def gradient_reversal(x: Tensor, lambda_: float) -> Tensor:
    return _GradientReversal.apply(x, float(lambda_))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# The reference initialises the raw parameter to 1 (models/temp_global.py line 13) and maps it to
# t_start + t_end·sigmoid(raw) with t_start = 1, t_end = 20 (helper/loops.py line 134, train_student.py lines 89-90).
CTKD_INIT_TEMPERATURE = 1.0 + 20.0 * _sigmoid(1.0)  # 15.62...


@register_knowledge("ctkd", "response",
                    "Curriculum temperature: KD whose learnable temperature is trained adversarially")
class CTKD(Knowledge):
    r"""Curriculum Temperature for Knowledge Distillation (global temperature).

    Li, Li, Yang, Cheng, Chen & Yang, "Curriculum Temperature for Knowledge Distillation", AAAI 2023,
    arXiv:2211.16231. Reference: github.com/zhengli97/CTKD (``models/temp_global.py``,
    ``helper/loops.py``, ``train_student.py``, ``distiller_zoo/KD.py``).

    The temperature is a learnable scalar :math:`\theta` (an ``nn.Parameter`` of this module, hence
    optimised with the student by the objective's optimizer), kept in :math:`(T_{min}, T_{max})` by a
    sigmoid, as the reference's ``t_start + t_end * sigmoid(θ)``:

    .. math::
        T = T_{min} + (T_{max} - T_{min})\,\sigma\big(\mathrm{GRL}_\lambda(\theta)\big), \qquad
        L_{ctkd} = T^2 \cdot \frac{1}{B}\sum_i
                   \mathrm{KL}\big(\mathrm{softmax}(z_{t,i}/T)\ \|\ \mathrm{softmax}(z_{s,i}/T)\big)

    :math:`\mathrm{GRL}_\lambda` is the identity forward and multiplies the gradient by :math:`-\lambda`
    backward: the student descends :math:`L`, the temperature *ascends* it (it makes the task harder),
    with a strength that grows along a cosine curriculum over epoch :math:`e` (1-based, ``set_epoch``):

    .. math::
        \lambda_e = \lambda_{min} + \tfrac12(\lambda_{max} - \lambda_{min})
                    \big(1 + \cos\big((1 + \min(e, E)/E)\,\pi\big)\big)

    i.e. :math:`\lambda_{min}` at :math:`e = 0` rising to :math:`\lambda_{max}` at :math:`e \ge E`. The
    reference passes :math:`-\lambda_e` to its GRL (``CosineDecay(max_value=0, min_value=-1,
    num_loops=10)``, ``train_student.py`` lines 186-202 and 401-419, ``scripts/run_cifar_distill.sh``
    ``--decay_max 0 --decay_min -1 --decay_loops 10``), which is the same thing.

    Defaults (reference): :math:`T_{min} = 1`, :math:`T_{max} = 1 + 20 = 21` (``--t_start 1 --t_end 20``),
    initial temperature :math:`1 + 20\,\sigma(1) \approx 15.62` (raw parameter initialised to 1),
    :math:`\lambda_{min} = 0`, :math:`\lambda_{max} = 1`, :math:`E = 10` epochs. Their CIFAR script weighs
    CE by 0.1 and this term by 0.9 (``-r 0.1 -a 0.9``). With :math:`\lambda = 0` (epoch 0) or a frozen
    parameter this is :func:`KD` at the current temperature. The current value is :attr:`temperature`.

    Deliberate differences from the reference: :math:`\lambda` is the strength of the reversal (the reference
    passes its negative to the GRL: the same gradients), and the temperature is a parameter of this module,
    optimised with the student by the run's optimizer (the reference adds it to its trainable list: the same).
    """

    class Params(KnowledgeParams):
        init_temperature: float = Field(CTKD_INIT_TEMPERATURE, gt=0,
                                        description="temperature at the start (reference: 1 + 20·sigmoid(1) ≈ 15.62)")
        min_temperature: float = Field(1.0, gt=0, description="lower bound of the learnable temperature (t_start)")
        max_temperature: float = Field(21.0, gt=0,
                                       description="upper bound of the learnable temperature (t_start + t_end)")
        lambda_min: float = Field(0.0, ge=0, description="gradient-reversal strength λ at epoch 0")
        lambda_max: float = Field(1.0, ge=0, description="gradient-reversal strength λ from curriculum_epochs on")
        curriculum_epochs: int = Field(10, ge=1,
                                       description="epochs over which λ rises from lambda_min to lambda_max (cosine)")

        @model_validator(mode="after")
        def _ranges(self) -> "CTKD.Params":
            if not self.min_temperature < self.init_temperature < self.max_temperature:
                raise ValueError(f"need min_temperature < init_temperature < max_temperature, got "
                                 f"{self.min_temperature}, {self.init_temperature}, {self.max_temperature}")
            if self.lambda_min > self.lambda_max:
                raise ValueError(f"lambda_min ({self.lambda_min}) must not exceed lambda_max ({self.lambda_max})")
            return self

    def __init__(
        self,
        init_temperature: float = CTKD_INIT_TEMPERATURE,
        min_temperature: float = 1.0,
        max_temperature: float = 21.0,
        lambda_min: float = 0.0,
        lambda_max: float = 1.0,
        curriculum_epochs: int = 10,
    ) -> None:
        super().__init__()
        if not 0 < min_temperature < max_temperature:
            raise ValueError(f"need 0 < min_temperature < max_temperature, got {min_temperature}, {max_temperature}")
        if not min_temperature < init_temperature < max_temperature:
            raise ValueError(f"init_temperature must lie strictly between {min_temperature} and {max_temperature}, "
                             f"got {init_temperature}")
        if not 0 <= lambda_min <= lambda_max:
            raise ValueError(f"need 0 <= lambda_min <= lambda_max, got {lambda_min}, {lambda_max}")
        if curriculum_epochs < 1:
            raise ValueError(f"curriculum_epochs must be >= 1, got {curriculum_epochs}")
        self.min_temperature, self.max_temperature = float(min_temperature), float(max_temperature)
        self.lambda_min, self.lambda_max = float(lambda_min), float(lambda_max)
        self.curriculum_epochs = int(curriculum_epochs)
        u = (init_temperature - min_temperature) / (max_temperature - min_temperature)
        self.raw_temperature = torch.nn.Parameter(torch.tensor([math.log(u / (1 - u))]))

    def grl_lambda(self, epoch: int | None = None) -> float:
        """λ of the gradient reversal at ``epoch`` (default: the current one)."""
        e = min(max(self.epoch if epoch is None else epoch, 0), self.curriculum_epochs)
        ramp = (1.0 - math.cos(math.pi * e / self.curriculum_epochs)) / 2
        return self.lambda_min + (self.lambda_max - self.lambda_min) * ramp

    def _temperature(self, lambda_: float) -> Tensor:
        raw = gradient_reversal(self.raw_temperature.float(), lambda_)
        return (self.min_temperature + (self.max_temperature - self.min_temperature) * torch.sigmoid(raw))[0]

    @property
    def temperature(self) -> float:
        """The current temperature (a number, for logging)."""
        return float(self._temperature(0.0).detach())

    def forward(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        """(B, C) student and teacher logits -> scalar."""
        t = self._temperature(self.grl_lambda())
        log_p_s = F.log_softmax(as_float(z_s) / t, dim=1)
        log_p_t = F.log_softmax(as_float(z_t) / t, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        return self(student.logits, teacher.logits)
