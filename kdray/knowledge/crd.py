"""CRD: contrastive representation distillation (Tian et al., ICLR 2020), with its memory banks."""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdray.knowledge.base import Knowledge, KnowledgeParams, ModelLayout, TapOutputs, last, register_knowledge
from kdray.knowledge.tensors import embedding


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(*tensors: Tensor) -> list[Tensor]:
    """Each tensor's rows from every rank, concatenated in rank order (``all_gather``); unchanged in one process.

    Every rank must pass tensors of one shape: the training loop's ``Batches`` gives all ranks the same batch
    sizes (its ``DistributedSampler`` pads the shards to one length, and the batches are cut alike)."""
    if _world_size() == 1:
        return list(tensors)
    import torch.distributed as dist

    out = []
    for t in tensors:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        out.append(torch.cat(parts))
    return out


def _first_occurrences(y: Tensor) -> tuple[Tensor, Tensor]:
    """``y`` sorted, and for each sorted entry the position in ``y`` of the first entry with its value.

    Lets a scatter with repeated indices write the same row for every repeat, so the result does not depend
    on the order the writes land in (no host sync, unlike ``torch.unique``)."""
    vals, perm = torch.sort(y, stable=True)
    pos = torch.arange(y.numel(), device=y.device)
    start = torch.ones_like(vals, dtype=torch.bool)
    start[1:] = vals[1:] != vals[:-1]
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values  # its group's first position
    return vals, perm[first]


class ContrastMemory(torch.nn.Module):
    r"""CRD's memory bank: an (N, feat_dim) bank of unit embeddings per model, updated with momentum.

    Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699.
    Reference: RepDistiller ``crd/memory.py`` (``ContrastMemory``). For each anchor :math:`v` of one model
    and the K+1 bank rows :math:`m_k` of the *other* model at indices ``idx`` (column 0 = the sample's
    own index, the positive):

    .. math::
        h_k = \exp(m_k^\top v / \tau) / Z, \qquad Z = N \cdot \overline{\exp(m^\top v / \tau)}
        \text{ (fixed from the first batch)}

    and after scoring, the rows of the batch's own indices are updated:
    :math:`m_y \leftarrow \mathrm{normalize}(\mu\, m_y + (1 - \mu)\, v)`. Defaults: :math:`\tau = 0.07`,
    :math:`\mu = 0.5` (RepDistiller ``train_student.py`` lines 84-85; K = 16384 there, line 83). Banks
    start uniform in :math:`\pm 1/\sqrt{d/3}`.

    The banks and Z are plain tensors, not registered buffers: DDP (``broadcast_buffers``) would broadcast
    every buffer from rank 0 at every forward, two (N, d) banks per step. They are in ``state_dict()`` all
    the same (``get_extra_state``: a checkpoint restores them exactly) and follow ``.to()`` (``_apply``).
    Under DDP (``torch.distributed`` initialised, world > 1) the banks stay identical on every rank: rank 0's
    banks are broadcast before the first scoring, Z is the mean of the ranks' first-batch estimates, and
    every rank calls :meth:`update` with the embeddings and indices gathered from all ranks
    (:func:`gather_rows`). A repeated index in an update (padded shards) takes its first occurrence's row.
    """

    _STATE = ("memory_s", "memory_t", "z")

    def __init__(self, feat_dim: int, n_data: int, nce_t: float = 0.07, nce_m: float = 0.5) -> None:
        super().__init__()
        self.n_data, self.feat_dim, self.nce_t, self.nce_m = int(n_data), int(feat_dim), float(nce_t), float(nce_m)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.memory_s = torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv)  # student embeddings
        self.memory_t = torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv)  # teacher embeddings
        self.z = torch.full((2,), -1.0)  # Z_s, Z_t; < 0 until the first batch sets them
        self._z_set = False  # a Python mirror of z >= 0: no host sync per step

    # -- state: plain tensors in state_dict() and .to() ----------------------------------------------------
    def get_extra_state(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self._STATE}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        for name in self._STATE:
            cur, new = getattr(self, name), state[name]
            if tuple(new.shape) != tuple(cur.shape):
                raise ValueError(f"CRD memory {name} of shape {tuple(new.shape)} in the state, but this run's is "
                                 f"{tuple(cur.shape)} (another training split or feat_dim)")
            cur.copy_(new)
        self._z_set = bool(self.z[0] >= 0)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's signature
        super()._apply(fn, recurse)
        for name in self._STATE:
            t = getattr(self, name)
            moved = fn(t)
            setattr(self, name, moved if moved.dtype == torch.float32 else t.to(moved.device))  # banks stay fp32
        return self

    def _follow(self, device: torch.device) -> None:
        if self.memory_s.device != device:  # used directly on tensors: move once
            for name in self._STATE:
                setattr(self, name, getattr(self, name).to(device))

    # -- use -----------------------------------------------------------------------------------------------
    def scores(self, v_s: Tensor, v_t: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(B, K+1) scores of student anchors against teacher bank rows and of teacher anchors against student rows."""
        self._follow(v_s.device)
        if not self._z_set and _world_size() > 1:  # start every rank from rank 0's banks
            import torch.distributed as dist

            dist.broadcast(self.memory_s, 0)
            dist.broadcast(self.memory_t, 0)
        b, k1 = idx.shape
        m_t = self.memory_t.index_select(0, idx.reshape(-1)).view(b, k1, -1)
        m_s = self.memory_s.index_select(0, idx.reshape(-1)).view(b, k1, -1)
        out_s = torch.exp(torch.bmm(m_t, v_s.unsqueeze(2)).squeeze(2) / self.nce_t)  # anchor: student
        out_t = torch.exp(torch.bmm(m_s, v_t.unsqueeze(2)).squeeze(2) / self.nce_t)  # anchor: teacher
        if not self._z_set:
            with torch.no_grad():
                z = torch.stack([out_s.mean(), out_t.mean()]) * self.n_data
                if _world_size() > 1:  # equal batch sizes: the mean of the ranks' means is the global mean
                    import torch.distributed as dist

                    dist.all_reduce(z)
                    z /= dist.get_world_size()
                self.z.copy_(z)
            self._z_set = True
        return out_s / self.z[0], out_t / self.z[1]

    @torch.no_grad()
    def update(self, v_s: Tensor, v_t: Tensor, y: Tensor) -> None:
        """Momentum update of the rows ``y`` with the (B, d) embeddings ``v_s``, ``v_t`` (under DDP: gathered)."""
        self._follow(v_s.device)
        y, src = _first_occurrences(y.reshape(-1).to(self.memory_s.device))
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            pos = bank.index_select(0, y) * self.nce_m + v.detach().to(bank.dtype)[src] * (1 - self.nce_m)
            bank.index_copy_(0, y, pos / pos.norm(dim=1, keepdim=True))


def nce_loss(x: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    r"""CRD's NCE loss (paper Eq. 18; RepDistiller ``crd/criterion.py`` ``ContrastLoss``).

    With :math:`x` the (B, K+1) scores, column 0 the positive, noise :math:`P_n = 1/N`:

    .. math::
        L = -\frac{1}{B} \sum_{i} \Big[\log \frac{x_{i0}}{x_{i0} + K P_n + \epsilon}
            + \sum_{k=1}^{K} \log \frac{K P_n}{x_{ik} + K P_n + \epsilon}\Big]
    """
    m = x.shape[1] - 1
    noise = m / float(n_data)
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (x[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


class Embed(torch.nn.Module):
    """RepDistiller's ``Embed`` (``crd/criterion.py`` lines 79-102): a linear map to ``dim_out``, L2-normalised."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        """(B, *) features -> (B, D) unit-length embeddings."""
        return F.normalize(self.linear(x.flatten(1)), p=2, dim=1)


@register_knowledge("crd", "relational",
                    "Contrastive representation distillation: NCE of embeddings against the other model's memory bank")
class CRD(Knowledge):
    r"""Contrastive representation distillation.

    Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699.
    Reference code: RepDistiller ``crd/criterion.py`` (``CRDLoss`` lines 8-48, ``ContrastLoss`` 51-76,
    ``Embed`` 79-102), ``crd/memory.py`` (``ContrastMemory.forward`` lines 23-79), ``train_student.py``
    (defaults lines 81-85, embeddings of the last feature, lines 190-198), ``dataset/cifar100.py``
    (negatives, ``CIFAR100InstanceSample.__getitem__`` lines 158-169).

    With :math:`s_i = \mathrm{normalize}(W_s f^s_i + b_s)` and :math:`t_i = \mathrm{normalize}(W_t f^t_i + b_t)`
    the student's and teacher's embeddings of sample :math:`i` in :math:`\mathbb{R}^d` (two learned
    ``Embed`` connectors made from the dry pass's shapes, ``bind``), memory banks :math:`M^s, M^t \in
    \mathbb{R}^{N \times d}` of both models' embeddings of the :math:`N` training samples, and for each
    sample :math:`K` negative indices :math:`j_1..j_K`:

    .. math::
        h^s_{ij} = \frac{\exp(M^t_j{}^\top s_i / \tau)}{Z_s}, \qquad
        h^t_{ij} = \frac{\exp(M^s_j{}^\top t_i / \tau)}{Z_t}, \qquad
        Z = N \cdot \overline{\exp(\cdot / \tau)} \text{ of the first batch}

        L(h) = -\frac{1}{B} \sum_i \Big[\log \frac{h_{ii}}{h_{ii} + K/N + \epsilon}
               + \sum_{k=1}^{K} \log \frac{K/N}{h_{ij_k} + K/N + \epsilon}\Big]

        L_{crd} = L(h^s) + L(h^t)

    (paper Eq. 18 with the noise distribution :math:`P_n = 1/N`, :math:`\epsilon = 10^{-7}`); after each
    training step the banks' rows of the batch move to :math:`\mathrm{normalize}(\mu M_i + (1 - \mu) v_i)`
    (:class:`ContrastMemory`). Defaults as RepDistiller's: :math:`d = 128, K = 16384, \tau = 0.07, \mu = 0.5`;
    :math:`K` is capped at :math:`N - 1` (``bind_data``). RepDistiller weighs the term 0.8 on CIFAR-100
    (``scripts/run_cifar_distill.sh`` line 29, ``-b 0.8``); kdray's ``weight`` defaults to 1 like every type's.
    Spatial taps are average-pooled to vectors (RepDistiller takes the pooled last feature); by default
    both layers are the models' embedding layers.

    Negatives: RepDistiller's default (``--mode exact``) draws each sample's K negatives from the training
    samples of the *other* classes, without replacement. kdray draws them on the device (``torch``'s RNG,
    which the loop reseeds per rank and epoch) uniformly from the other classes' samples *with* replacement
    (``negatives: other_class``; the same expected loss, one draw per negative, no per-sample index lists),
    from the labels of the training split that ``bind_data`` is given. ``negatives: uniform`` draws from
    all N samples (RepDistiller's ``ContrastMemory`` without ``contrast_idx``: its alias sampler), as does
    a dry run, which knows no labels. Column 0 of the scored indices is the sample itself (the positive).

    The loss needs the batch's sample indices (``uses_index``): the loop's ``idx``, positions in the training
    split, the same on every rank. Under DDP the banks are kept identical on every rank (see
    :class:`ContrastMemory`); they and Z are checkpointed with the objective's ``state_dict``.

    Deliberate differences from the reference, both described above: negatives are drawn with replacement on
    the device (RepDistiller: without replacement, on the CPU), and the banks are kept identical across DDP
    ranks (RepDistiller runs on one GPU).
    """

    uses_index = True

    class Params(KnowledgeParams):
        teacher_layer: str | None = Field(None, description="teacher embedding layer (default: the model's)")
        student_layer: str | None = Field(None, description="student embedding layer (default: the model's)")
        feat_dim: int = Field(128, ge=1, description="d, the width of the contrastive embedding")
        nce_k: int = Field(16384, ge=1, description="K, negatives per sample (at most the training samples - 1)")
        nce_t: float = Field(0.07, gt=0, description="τ, the temperature of the scores")
        nce_m: float = Field(0.5, ge=0, lt=1, description="μ, the momentum of the memory-bank update")
        negatives: Literal["other_class", "uniform"] = Field(
            "other_class", description="draw negatives from the other classes' samples (RepDistiller's) or all")

    def __init__(self, teacher_layer: str, student_layer: str, feat_dim: int = 128, nce_k: int = 16384,
                 nce_t: float = 0.07, nce_m: float = 0.5, negatives: str = "other_class") -> None:
        super().__init__()
        if negatives not in ("other_class", "uniform"):
            raise ValueError(f"negatives must be 'other_class' or 'uniform', got {negatives!r}")
        self.teacher_layers, self.student_layers = [teacher_layer], [student_layer]
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = int(feat_dim), int(nce_k), float(nce_t), float(nce_m)
        self.negatives = negatives
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None
        self.memory: ContrastMemory | None = None
        self.num_train = 0
        self.k = 0  # K after the cap
        # other_class: labels by sample index, the indices sorted by label, each class's count and start
        self._classes: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> Knowledge:
        return cls(
            kwargs.get("teacher_layer") or teacher.embedding_layer or last(teacher.feature_layers, "teacher_layer"),
            kwargs.get("student_layer") or student.embedding_layer or last(student.feature_layers, "student_layer"),
            kwargs.get("feat_dim", 128), kwargs.get("nce_k", 16384), kwargs.get("nce_t", 0.07),
            kwargs.get("nce_m", 0.5), kwargs.get("negatives", "other_class"),
        )

    # -- binding -------------------------------------------------------------------------------------------
    def bind_data(self, num_train: int, labels: Tensor | None = None) -> None:
        n = int(num_train)
        if n < 2:
            raise ValueError(f"CRD needs at least 2 training samples, the split has {n}")
        self.num_train, self.k = n, min(self.nce_k, n - 1)
        self.memory = ContrastMemory(self.feat_dim, n, self.nce_t, self.nce_m)
        self._classes = None
        if labels is not None and self.negatives == "other_class":
            labels = labels.detach().reshape(-1).long()
            if labels.numel() != n:
                raise ValueError(f"CRD got {labels.numel()} labels for a training split of {n} samples")
            if labels.min() < 0:
                raise ValueError("CRD's other-class negatives need class labels >= 0")
            counts = torch.bincount(labels)
            if int(counts.max()) < n:  # a single class has no other class to draw from: uniform then
                self._classes = (labels, torch.argsort(labels, stable=True), counts, torch.cumsum(counts, 0) - counts)

    def _make_embeds(self, e_s: Tensor, e_t: Tensor) -> None:
        self.embed_s = Embed(e_s.shape[1], self.feat_dim).to(e_s.device)
        self.embed_t = Embed(e_t.shape[1], self.feat_dim).to(e_t.device)

    def bind(self, teacher_features: dict[str, Tensor], student_features: dict[str, Tensor]) -> None:
        self._make_embeds(embedding(student_features[self.student_layers[0]]),
                          embedding(teacher_features[self.teacher_layers[0]]))

    # -- use -----------------------------------------------------------------------------------------------
    def sample_contrast(self, idx: Tensor) -> Tensor:
        """(B, K+1) indices into the banks: column 0 the batch's own indices (positives), then K negatives."""
        b, n, dev = idx.numel(), self.num_train, idx.device
        if self._classes is None:
            neg = torch.randint(0, n, (b, self.k), device=dev)
        else:
            if self._classes[0].device != dev:
                self._classes = tuple(t.to(dev) for t in self._classes)  # type: ignore[assignment]
            labels, order, counts, starts = self._classes
            c = labels[idx]
            count, start = counts[c].unsqueeze(1), starts[c].unsqueeze(1)
            avail = n - count  # samples of the other classes, >= 1
            # the r-th sample of the others in label order: skip the own class's block [start, start + count)
            r = (torch.rand(b, self.k, device=dev, dtype=torch.float64) * avail).long()
            r = torch.minimum(r, avail - 1)
            neg = order[r + count * (r >= start)]
        return torch.cat([idx.reshape(-1, 1), neg], 1)

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Tensor | None = None) -> Tensor:
        """(B, D_s) and (B, D_t) embeddings, (B,) positions ``idx`` in the training split -> scalar.

        ``contrast_idx`` (B, K+1), column 0 = ``idx``: the bank rows to score (default: :meth:`sample_contrast`).
        In training mode the banks are updated after scoring (under DDP with all ranks' rows)."""
        if self.memory is None:
            raise ValueError("CRD has no memory bank yet: call bind_data(num_train) with the training split's size")
        e_s, e_t = embedding(f_s), embedding(f_t)
        if self.embed_s is None or self.embed_t is None:  # used directly on tensors: infer the connectors now
            self._make_embeds(e_s, e_t)
        v_s, v_t = self.embed_s(e_s), self.embed_t(e_t)
        idx = idx.reshape(-1).to(v_s.device)
        contrast_idx = self.sample_contrast(idx) if contrast_idx is None else contrast_idx.to(v_s.device)
        out_s, out_t = self.memory.scores(v_s, v_t, contrast_idx)
        loss = nce_loss(out_s, self.num_train) + nce_loss(out_t, self.num_train)
        if self.training:
            rows, ids = gather_rows(torch.cat([v_s, v_t], 1).detach(), idx)
            self.memory.update(rows[:, :self.feat_dim], rows[:, self.feat_dim:], ids)
        return loss

    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor,  # type: ignore[override]
                index: Tensor | None = None) -> Tensor:
        if index is None:
            raise ValueError("CRD needs the batch's sample indices (index=), the positions in the training split")
        return self(student.features[self.student_layers[0]], teacher.features[self.teacher_layers[0]], index)
