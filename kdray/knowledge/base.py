"""What every kind of knowledge shares: its registry, its parameter schema and how it reads taps.

A knowledge type is a ``torch.nn.Module`` with two faces:

* ``forward(...)`` takes plain tensors (logits, feature maps, embeddings) and returns the loss. This is
  the paper's formula, testable on hand-made tensors.
* ``compute(student, teacher, target)`` picks the tensors it needs out of the tapped outputs of a
  run's student and teacher and calls ``forward``. The training loop only ever calls ``compute``.

Layers are named by module path (``layer2``, ``features.3``); when a config does not name them, the
model's own ``kd_feature_layers`` / ``kd_embedding_layer`` give the defaults.
"""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from kdray.registry import Registry


class TapOutputs(NamedTuple):
    """A model's logits and the feature maps tapped from its named layers, for one batch."""

    logits: Tensor
    features: dict[str, Tensor]


class ModelLayout(NamedTuple):
    """The layers of a model that knowledge types use by default.

    Transformers also declare their attention-probability taps (``kd_attention_layers``, (B, heads, T, T))
    and value-projection taps (``kd_value_layers``, (B, T, H)), one per layer, for TinyBERT and MiniLM.
    """

    feature_layers: tuple[str, ...]
    embedding_layer: str
    attention_layers: tuple[str, ...] = ()
    value_layers: tuple[str, ...] = ()

    @classmethod
    def of(cls, model: nn.Module) -> "ModelLayout":
        net = getattr(model, "net", model)
        return cls(
            tuple(getattr(net, "kd_feature_layers", ())),
            getattr(net, "kd_embedding_layer", ""),
            tuple(getattr(net, "kd_attention_layers", ())),
            tuple(getattr(net, "kd_value_layers", ())),
        )


class KnowledgeParams(BaseModel):
    """Parameters common to every knowledge type; subclasses add their own."""

    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, ge=0, description="w_k, the weight of this term in the objective")


class Knowledge(nn.Module):
    """Base class of a knowledge type (a distillation loss)."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""  # response | feature | relational
    summary: ClassVar[str] = ""
    Params: ClassVar[type[KnowledgeParams]] = KnowledgeParams
    uses_target: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.teacher_layers: list[str] = []
        self.student_layers: list[str] = []
        self.epoch = 0

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_params(
        cls, params: dict[str, Any] | KnowledgeParams, teacher: ModelLayout, student: ModelLayout
    ) -> "Knowledge":
        """Build from validated parameters, resolving default layers from the two models' layouts."""
        p = params if isinstance(params, KnowledgeParams) else cls.Params(**params)
        kwargs = p.model_dump(exclude={"weight"})
        return cls._build(kwargs, teacher, student)

    @classmethod
    def _build(cls, kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> "Knowledge":
        return cls(**kwargs)

    def bind(self, teacher_features: dict[str, Tensor], student_features: dict[str, Tensor]) -> None:
        """Create connectors (regressors...) from the shapes of one dry forward pass. Default: none."""

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss which epoch (1-based) is running; DKD's warm-up uses it."""
        self.epoch = epoch

    # -- use ---------------------------------------------------------------------------------------
    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        raise NotImplementedError


def middle(layers: tuple[str, ...], what: str) -> str:
    """The middle layer of a model (FitNets' default hint / guided layer)."""
    if not layers:
        raise ValueError(f"the model declares no feature layers; name the {what} explicitly")
    return layers[len(layers) // 2]


def last(layers: tuple[str, ...], what: str) -> str:
    if not layers:
        raise ValueError(f"the model declares no feature layers; name the {what} explicitly")
    return layers[-1]


def as_float(t: Tensor) -> Tensor:
    """Losses are computed in float32 even under autocast: softmax at T=1/20 in bf16 is too coarse."""
    return t.float() if t.dtype != torch.float32 else t


KNOWLEDGE: Registry[type[Knowledge]] = Registry("knowledge type")


def register_knowledge(name: str, family: str, summary: str):
    """Class decorator: register a knowledge type under ``name``."""

    def decorator(cls: type[Knowledge]) -> type[Knowledge]:
        cls.name, cls.family, cls.summary = name, family, summary
        KNOWLEDGE.register(name, cls)
        return cls

    return decorator


__all__ = [
    "KNOWLEDGE",
    "Knowledge",
    "KnowledgeParams",
    "ModelLayout",
    "TapOutputs",
    "register_knowledge",
]
