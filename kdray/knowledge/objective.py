"""The objective of a run: w_ce·CE(y, z_s) + Σ_k w_k·L_k over any subset of knowledge types."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdray.knowledge.base import KNOWLEDGE, Knowledge, ModelLayout, TapOutputs, active_autocast, as_float
from kdray.knowledge.token import TeacherView, TokenStates, token_sums


class DistillObjective(nn.Module):
    """Cross-entropy on the labels plus weighted knowledge terms.

    ``forward`` returns a dict with every term unweighted (``ce``, ``kd``, ``at``, ...) and their
    weighted sum under ``loss``, so each term can be logged on its own. The learnable connectors of
    the knowledge types (FitNets' regressor) live in this module, which the training loop wraps in
    DDP together with the student.

    For a causal LM (the student's ``TapOutputs.logits`` are :class:`~kdray.knowledge.token.TokenStates`) the
    cross-entropy is on the next tokens and the token-level terms (family ``token``) are computed with it in one
    chunked pass (:func:`~kdray.knowledge.token.token_sums`); ``teacher_view`` says how they see the teacher (its
    top-k and tail rule), ``token_chunk`` how many tokens a chunk holds.
    """

    def __init__(
        self,
        knowledge: Mapping[str, Knowledge] | None = None,
        weights: Mapping[str, float] | None = None,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
        teacher_view: TeacherView = TeacherView(),
        token_chunk: int | None = None,
    ) -> None:
        super().__init__()
        self.knowledge = nn.ModuleDict(dict(knowledge or {}))
        self.weights = {k: float((weights or {}).get(k, 1.0)) for k in self.knowledge}
        self.ce_weight = float(ce_weight)
        self.label_smoothing = float(label_smoothing)
        self.teacher_view = teacher_view
        self.token_chunk = token_chunk
        self.partial_labels = False  # some training labels are hidden (-100): a transfer set (kdray.data.transfer)

    @classmethod
    def from_specs(
        cls,
        specs: Sequence[Mapping[str, Any]],
        teacher: ModelLayout,
        student: ModelLayout,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
        teacher_view: TeacherView = TeacherView(),
        token_chunk: int | None = None,
    ) -> "DistillObjective":
        """Build from config entries ``{"type": "kd", "weight": 0.9, "temperature": 4, ...}``."""
        modules, weights = {}, {}
        for spec in specs:
            spec = dict(spec)
            kind = spec.pop("type")
            if kind in modules:
                raise ValueError(f"knowledge type {kind!r} is listed twice")
            cls_ = KNOWLEDGE.get(kind)
            params = cls_.Params(**spec)
            modules[kind] = cls_.from_params(params, teacher, student)
            weights[kind] = params.weight
        return cls(modules, weights, ce_weight, label_smoothing, teacher_view, token_chunk)

    # -- what the training loop needs to know ------------------------------------------------------
    @property
    def teacher_layers(self) -> list[str]:
        return _unique(n for k in self.knowledge.values() for n in k.teacher_layers)

    @property
    def student_layers(self) -> list[str]:
        return _unique(n for k in self.knowledge.values() for n in k.student_layers)

    @property
    def wants_strong_view(self) -> bool:
        """Does a term align the models on a strongly augmented second view of each batch (MLKD)?"""
        return any(k.wants_strong_view for k in self.knowledge.values())

    @property
    def needs_teacher(self) -> bool:
        return len(self.knowledge) > 0

    def bind_models(self, teacher_net: nn.Module, student_net: nn.Module) -> None:
        """Before the dry forward pass: show each knowledge type the two networks (``Knowledge.bind_models``)."""
        for k in self.knowledge.values():
            k.bind_models(teacher_net, student_net)

    @property
    def uses_index(self) -> bool:
        """Does a term need the batch's sample indices (``forward(..., index=)``)?"""
        return any(k.uses_index for k in self.knowledge.values())

    def bind_data(self, num_train: int, labels: Tensor | None = None) -> None:
        """Before ``bind``: tell each knowledge type the training split's size and labels (``Knowledge.bind_data``)."""
        for k in self.knowledge.values():
            k.bind_data(int(num_train), labels)

    def bind(self, teacher_features: dict[str, Tensor], student_features: dict[str, Tensor]) -> None:
        for k in self.knowledge.values():
            k.bind(teacher_features, student_features)

    def set_epoch(self, epoch: int) -> None:
        for k in self.knowledge.values():
            k.set_epoch(epoch)

    # -- the loss ----------------------------------------------------------------------------------
    def forward(self, student: TapOutputs, teacher: TapOutputs | None, target: Tensor,
                index: Tensor | None = None, token_scale: Tensor | None = None,
                mean_scale: float = 1.0, sampled: bool = False,
                label_scale: Tensor | None = None) -> dict[str, Tensor]:
        """Every term in float32, outside autocast: casting the inputs is not enough, since autocast casts
        the matmuls inside a loss back to bf16/fp16 (RKD 61 % off in bf16, SP NaN in fp16).

        ``index``: the batch's positions in the training split (the loop's ``idx``), passed on to the types
        with ``uses_index`` only. A causal LM's terms: see :meth:`_lm_terms` (``token_scale``, ``mean_scale``,
        ``sampled``). ``label_scale`` (a transfer set, see :meth:`_terms`): the cross-entropy's normaliser."""
        if isinstance(student.logits, TokenStates):
            return self._lm_terms(student, teacher, target, token_scale, mean_scale, sampled)
        on = active_autocast()
        if not on:  # fp32: nothing to turn off (this runs every step)
            return self._terms(student, teacher, target, index, label_scale)
        with contextlib.ExitStack() as stack:
            for device in on:
                stack.enter_context(torch.autocast(device, enabled=False))
            return self._terms(student, teacher, target, index, label_scale)

    def _terms(self, student: TapOutputs, teacher: TapOutputs | None, target: Tensor,
               index: Tensor | None = None, label_scale: Tensor | None = None) -> dict[str, Tensor]:
        """A classifier's terms and their weighted sum ``loss``. A transfer set given ``label_scale`` (the training
        loop's: world size x batches / labelled samples of the effective batch over every rank) also returns
        ``_backward``, what to differentiate: the cross-entropy *summed* over this batch's labelled samples times
        ``label_scale``, so DDP's and the accumulation's means give the mean over every labelled sample of the
        effective batch, as one process on the whole batch; ``ce`` (logged) stays this batch's own mean."""
        # the labels hold for the strong view too (MLKD trains on both)
        views = [student.logits] + ([student.strong.logits] if student.strong is not None else [])
        backward = None
        if self.partial_labels:  # one sum over the labelled samples: the logged mean and the gradient's both use it
            summed = self._ce_sum(views[0], target)
            for z in views[1:]:
                summed = summed + self._ce_sum(z, target)
            terms = {"ce": summed / (target != -100).sum().clamp_min(1)}
            if label_scale is not None:
                backward = _weighted(self.ce_weight, summed * label_scale)
        else:
            terms = {"ce": self._ce(views[0], target)}
            for z in views[1:]:
                terms["ce"] = terms["ce"] + self._ce(z, target)
        total = _weighted(self.ce_weight, terms["ce"])
        if self.knowledge:
            if teacher is None:
                raise ValueError("knowledge terms need teacher outputs")
            for name, k in self.knowledge.items():
                if k.uses_index:
                    if index is None:
                        raise ValueError(f"knowledge type {name!r} needs the batch's sample indices: call the "
                                         "objective with index= (the positions of the samples in the training split)")
                    terms[name] = k.compute(student, teacher, target, index=index)
                else:
                    terms[name] = k.compute(student, teacher, target)
                total = total + _weighted(self.weights[name], terms[name])
                if backward is not None:
                    backward = backward + _weighted(self.weights[name], terms[name])
        terms["loss"] = total
        if backward is not None:
            terms["_backward"] = backward
        return terms


    def _ce(self, logits: Tensor, target: Tensor) -> Tensor:
        """The cross-entropy on the labels, the batch's mean."""
        return F.cross_entropy(as_float(logits), target, label_smoothing=self.label_smoothing)

    def _ce_sum(self, logits: Tensor, target: Tensor) -> Tensor:
        """``partial_labels`` (a transfer set: hidden labels are -100): the cross-entropy summed over the labelled
        samples only, 0 for a batch without any (PyTorch's mean would be 0/0 there)."""
        return F.cross_entropy(as_float(logits), target, label_smoothing=self.label_smoothing, reduction="sum")

    def _lm_terms(self, student: TapOutputs, teacher: TapOutputs | None, target: Tensor,
                  token_scale: Tensor | None, mean_scale: float, sampled: bool = False) -> dict[str, Tensor]:
        """A causal LM's terms: the next-token cross-entropy ``ce`` and each token term per target token of this
        batch (for the logs), their weighted sum ``loss``, and ``_backward``, what to differentiate: the token sums
        times ``token_scale`` (world size / target tokens over every rank and accumulation step: DDP's mean over
        ranks then gives the gradient of one process on the whole batch; default 1 / this batch's tokens) plus the
        other terms (hidden-state hints: per-batch means) times ``mean_scale`` (1 / accumulation steps). Also
        ``_correct`` (top-1 next-token hits) and ``_count`` (target tokens). ``sampled``: the targets are the student's
        own samples (an on-policy batch): the cross-entropy is logged but not trained on (it would teach the student
        its own samples), as in GKD, where on-policy batches train on the divergence alone."""
        token = [(n, k) for n, k in self.knowledge.items() if k.family == "token"]
        if token and teacher is None:
            raise ValueError("knowledge terms need teacher outputs")
        sums, correct, count = token_sums(student.logits, teacher.logits if token else None, target,
                                          [k for _, k in token], self.teacher_view, self.token_chunk, sampled)
        per = 1.0 / count.clamp_min(1)
        scale = token_scale if token_scale is not None else per
        terms = {"ce": sums[0] * per}
        ce_weight = 0.0 if sampled else self.ce_weight
        backward = _weighted(ce_weight, sums[0])
        logged = _weighted(ce_weight, terms["ce"])
        for (name, _), s in zip(token, sums[1:]):
            terms[name] = s * per
            backward = backward + _weighted(self.weights[name], s)
            logged = logged + _weighted(self.weights[name], terms[name])
        backward = backward * scale
        with contextlib.ExitStack() as stack:
            for device in active_autocast():
                stack.enter_context(torch.autocast(device, enabled=False))
            for name, k in self.knowledge.items():
                if k.family != "token":
                    terms[name] = k.compute(student, teacher, target)
                    backward = backward + _weighted(self.weights[name] * mean_scale, terms[name])
                    logged = logged + _weighted(self.weights[name], terms[name])
        terms["loss"] = logged
        terms["_backward"], terms["_correct"], terms["_count"] = backward, correct, count
        return terms


def _weighted(w: float, term: Tensor) -> Tensor:
    """``w · term``, without the multiplication (and its backward) when w = 1, the default of every weight:
    bit-identical, and one op pair less per term and step (``benchmarks/bench_epoch.py``)."""
    return term if w == 1.0 else w * term


def _unique(names) -> list[str]:
    return list(dict.fromkeys(names))


def nonfinite_terms(terms: Mapping[str, Tensor]) -> list[str]:
    """The names of the terms that are NaN or infinite (one host sync for all of them)."""
    names = list(terms)
    finite = torch.stack([torch.isfinite(terms[n].detach()).all() for n in names]).tolist()
    return [n for n, ok in zip(names, finite) if not ok]
