"""Deep mutual learning: peers of any architecture train together from scratch and teach each other.

Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018, arXiv:1706.00384. With :math:`K` peers and
:math:`p_k = \\mathrm{softmax}(z_k / T)`, peer :math:`k` minimises

.. math::
    L_k = \\mathrm{CE}(y, z_k) + \\frac{w\\,T^2}{K-1} \\sum_{l \\ne k} \\mathrm{KL}(p_l \\,\\|\\, p_k)

(paper Eq. 10, with :math:`w = 1, T = 1`; the :math:`T^2` factor is Hinton's and is 1 there). The paper updates
the peers one after the other within a step, each against the others' current predictions; kdray updates them
simultaneously, each against the others' predictions of the same forward pass, detached (the common
implementation, e.g. torchdistill's and KD_Lib's): one forward pass per step instead of K. The sum
:math:`\\sum_k L_k` has, for each peer's parameters, exactly that peer's gradient, so one optimiser over all
peers is K independent optimisers with the same hyper-parameters (gradient clipping, if set, clips their
joint norm).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdray.knowledge.base import as_float


def mutual_kl(logits: Sequence[Tensor], temperature: float = 1.0) -> list[Tensor]:
    """For each peer k: :math:`T^2/(K-1) \\sum_{l \\ne k} \\mathrm{KL}(p_l \\| p_k)`, the others detached."""
    t = float(temperature)
    log_p = [F.log_softmax(as_float(z) / t, dim=1) for z in logits]
    out = []
    for k, lp_k in enumerate(log_p):
        others = [F.kl_div(lp_k, lp_l.detach(), reduction="batchmean", log_target=True)
                  for l, lp_l in enumerate(log_p) if l != k]
        out.append(torch.stack(others).mean() * (t * t))
    return out


class MutualStep(nn.Module):
    """All peers as one module, so DDP syncs them in one go; ``forward`` matches ``DistillStep``'s:
    ``(terms, logits of peer 0)``. Terms: ``ce`` and ``dml`` (means over peers) and ``loss`` (their sum over
    peers, weighted), plus ``ce_peer{k}`` for each peer."""

    def __init__(self, peers: Sequence[nn.Module], *, mutual_weight: float = 1.0, temperature: float = 1.0,
                 ce_weight: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if len(peers) < 2:
            raise ValueError("deep mutual learning needs at least two peers")
        self.peers = nn.ModuleList(peers)
        self.mutual_weight, self.temperature = float(mutual_weight), float(temperature)
        self.ce_weight, self.label_smoothing = float(ce_weight), float(label_smoothing)
        self.objective = nn.Module()  # no connectors: what the checkpoint stores as the objective's state

    @property
    def student(self) -> nn.Module:
        return self.peers[0]

    def forward(self, x: Tensor, y: Tensor, teacher_out=None, idx: Tensor | None = None,
                x_strong: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        logits = [peer(x) for peer in self.peers]
        with torch.autocast(x.device.type, enabled=False):  # losses in float32, as DistillObjective's
            ce = [F.cross_entropy(as_float(z), y, label_smoothing=self.label_smoothing) for z in logits]
            kl = mutual_kl(logits, self.temperature)
            total = sum(self.ce_weight * c + self.mutual_weight * m for c, m in zip(ce, kl))
            terms = {"ce": torch.stack(ce).mean(), "dml": torch.stack(kl).mean(),
                     **{f"ce_peer{k}": c for k, c in enumerate(ce)}, "loss": total}
        return terms, logits[0]
