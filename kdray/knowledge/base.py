"""What every kind of knowledge shares: its registry, its parameter schema and how it reads taps.

A knowledge type is a ``torch.nn.Module`` with two faces:

* ``forward(...)`` takes plain tensors (logits, feature maps, embeddings) and returns the loss. This is
  the paper's formula, testable on hand-made tensors.
* ``compute(student, teacher, target)`` picks the tensors it needs out of the tapped outputs of a
  run's student and teacher and calls ``forward``. The training loop only ever calls ``compute``.
  Types with ``uses_index`` (CRD's memory bank) also get ``index=``: each sample's position in the
  training split, and are told the split's size (and labels) by ``bind_data`` before ``bind``.

Layers are named by module path (``layer2``, ``features.3``); when a config does not name them, the
model's own ``kd_feature_layers`` / ``kd_embedding_layer`` give the defaults.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import re
from typing import Any, Callable, ClassVar, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from kdray.registry import Registry


class TapOutputs(NamedTuple):
    """A model's logits and the feature maps tapped from its named layers, for one batch."""

    logits: Tensor
    features: dict[str, Tensor]
    strong: "TapOutputs | None" = None  # the same model on a strongly augmented view (MLKD); None unless asked for


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


def _autocast_devices() -> tuple[str, ...]:
    """The device types this torch build can autocast (asked once: the check runs on every loss call)."""
    known = []
    for device in ("cpu", "cuda", "xpu", "mps"):
        try:
            torch.is_autocast_enabled(device)
        except (RuntimeError, TypeError, ValueError):  # a device type this build does not know
            continue
        known.append(device)
    return tuple(known)


_AUTOCAST_DEVICES = _autocast_devices()
_LOW = (torch.float16, torch.bfloat16)


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)  # one call instead of one per device type


def active_autocast() -> list[str]:
    """The device types whose autocast is on in this thread (asked on every loss call: the common answer,
    none, costs one call)."""
    if _ANY_AUTOCAST is not None and not _ANY_AUTOCAST():
        return []
    return [d for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]


def _to_float32(x: Any) -> Any:
    """Half-precision tensors (anywhere in lists, tuples, dicts, TapOutputs) as float32; everything else as is."""
    if isinstance(x, Tensor):
        return x.float() if x.dtype in _LOW else x
    if isinstance(x, TapOutputs):
        return TapOutputs(_to_float32(x.logits), _to_float32(x.features), _to_float32(x.strong))
    if isinstance(x, (list, tuple)):
        if all(type(v) is Tensor and v.dtype not in _LOW for v in x):  # the common case: nothing to cast
            return x
        return type(x)(_to_float32(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_float32(v) for k, v in x.items()} if x else x
    return x


def float32_loss(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run a loss's ``forward`` in float32 whatever autocast is active: half-precision inputs are cast up and
    autocast is off inside (casting alone is not enough: autocast casts the loss's own matmuls back down).
    :class:`Knowledge` applies it to every subclass's ``forward``, so a loss called directly (a plugin
    composing losses, a notebook) is as safe as one called through the objective."""
    if getattr(forward, "_kdray_float32", False):
        return forward

    @functools.wraps(forward)
    def wrapper(self, *args: Any, **kwargs: Any) -> Tensor:
        args, kwargs = _to_float32(args), _to_float32(kwargs)
        on = active_autocast()
        if not on:
            return forward(self, *args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device in on:
                stack.enter_context(torch.autocast(device, enabled=False))
            return forward(self, *args, **kwargs)

    wrapper._kdray_float32 = True  # type: ignore[attr-defined]
    return wrapper


class Knowledge(nn.Module):
    """Base class of a knowledge type (a distillation loss).

    Every subclass's ``forward`` computes in float32 (or float64 for float64 inputs) whatever autocast is
    active (:func:`float32_loss`, applied once here for every subclass)."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""  # response | feature | relational
    summary: ClassVar[str] = ""
    Params: ClassVar[type[KnowledgeParams]] = KnowledgeParams
    uses_target: ClassVar[bool] = False
    # True: ``compute`` takes ``index=`` (the batch's positions in the training split, the same meaning on
    # every rank) and ``bind_data`` must be called with the training split's size before ``bind``.
    uses_index: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.forward = float32_loss(cls.__dict__["forward"])

    def __init__(self) -> None:
        super().__init__()
        self.teacher_layers: list[str] = []
        self.student_layers: list[str] = []
        self.epoch = 0

    @classmethod
    def paper(cls) -> str:
        """The short citation of the paper this type implements ("Hinton et al. 2015"), or "".

        Read from the class's own docstring (not an inherited one): the paragraph after its first line
        starts with the reference, ``Authors, "Title", Venue Year, arXiv:...``. See :func:`short_citation`.
        """
        return short_citation(cls.__dict__.get("__doc__"))

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

    def bind_models(self, teacher_net: nn.Module, student_net: nn.Module) -> None:
        """See the two networks themselves (teacher ``members[0].net``, student ``net``) before the dry forward
        pass; ``bind`` follows that pass. For losses that read a model's modules, not only its taps (OFD reads
        the teacher's BatchNorm before each hint layer). Default: nothing. Raise ``ValueError`` for a layer
        that cannot serve (``kdray check`` reports it as a config error)."""

    def bind_data(self, num_train: int, labels: Tensor | None = None) -> None:
        """Be told the training split before ``bind``: its size (``len(data.train)``, the range of the sample
        indices ``compute`` gets) and, when known, its labels (``(num_train,)``, by sample index; ``None`` in a
        dry run). For losses that keep per-sample state (CRD's memory bank). Default: nothing."""

    def bind(self, teacher_features: dict[str, Tensor], student_features: dict[str, Tensor]) -> None:
        """Create connectors (regressors...) from the shapes of one dry forward pass. Default: none."""

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss which epoch (1-based) is running; DKD's warm-up uses it."""
        self.epoch = epoch

    @property
    def wants_strong_view(self) -> bool:
        """Whether the loop should also run student and teacher on a strongly augmented view of each batch
        and hand their outputs over as ``TapOutputs.strong`` (MLKD with ``strong_augment``). Default: no."""
        return False

    # -- use ---------------------------------------------------------------------------------------
    def compute(self, student: TapOutputs, teacher: TapOutputs, target: Tensor) -> Tensor:
        """The loss of one batch. Types with ``uses_index`` take a fourth argument, ``index: Tensor`` (B,)."""
        raise NotImplementedError


_YEAR = re.compile(r"(?<![\w:./-])(?:19|20)\d\d(?!\w|\.\d)")  # not inside arXiv:2002.10957
_QUOTE = re.compile(r"[\"\u201c\u201d]|``|''")
_INITIAL = re.compile(r"^(?:[A-Z]\.-?)+$")  # G. / G.E. / J.-P.
# Without a quoted title: "Smith & Jones (2020)", "Smith et al. 2020", "Smith, Jones, 2020. Title."
_UNQUOTED = re.compile(r"^(?P<authors>[^\W\d][^\d\"()]{0,200}?)[\s,.]*\(?(?P<year>(?:19|20)\d\d)(?!\w|\.\d)")
_ARXIV = re.compile(r"arXiv:\s*([0-9]{2})[01][0-9]\.[0-9]{4,5}")
_PARTICLES = {"van", "von", "der", "den", "de", "del", "della", "di", "da", "du", "dos", "le", "la", "ter", "bin", "al"}
_SURNAME = re.compile(r"^[^\W\d_][\w'\u2019-]*$")


def short_citation(doc: str | None) -> str:
    """``Hinton, Vinyals & Dean, "Distilling ...", NIPS Deep Learning Workshop 2015, arXiv:1503.02531.``
    -> ``Hinton et al. 2015``: the first author's surname, "et al." when there are more authors, and the
    year that follows the title. "" when the paragraph after the docstring's first line is no reference."""
    if not doc:
        return ""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", inspect.cleandoc(doc)) if p.strip()]
    if len(paragraphs) < 2:
        return ""
    para = paragraphs[1]  # the reference comes right after the summary line
    quote = _QUOTE.search(para)
    if quote:
        authors, rest = para[:quote.start()], para[quote.end():]
        close = _QUOTE.search(rest)  # the year comes after the title, not inside it
        year = _YEAR.search(rest[close.end():]) if close else None
        year = year.group(0) if year else ""
    else:
        m = _UNQUOTED.match(para)
        authors, year = (m.group("authors"), m.group("year")) if m else ("", "")
    if not year:  # only an arXiv identifier: its YYMM gives the year
        arxiv = _ARXIV.search(para)
        year = f"20{arxiv.group(1)}" if arxiv else ""
    authors = authors.strip().rstrip(",;:.").strip()
    names = [a.strip() for a in re.split(r",|;|&|\band\b|\bet al\b\.?", authors) if a.strip()]
    if not year or not names:
        return ""
    words = [w for w in names[0].split() if not _INITIAL.match(w)]
    # Names are capitalised words, bar particles (van der Maaten), which stay with the surname.
    if not words or len(words) > 4 or not all(_SURNAME.match(w) and (w[0].isupper() or w in _PARTICLES)
                                              for w in words) or not words[-1][0].isupper():
        return ""
    surname = " ".join(words[next((i for i, w in enumerate(words) if w in _PARTICLES), len(words) - 1):])
    many = len(names) > 1 or re.search(r"\bet al\b", authors) is not None
    return f"{surname}{' et al.' if many else ''} {year}"


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
    """Losses are computed in float32 at least, even under autocast: softmax at T=1/20 in bf16 is too coarse.
    float64 stays float64 (a loss evaluated in double precision, as the tests do)."""
    return t.float() if t.dtype not in (torch.float32, torch.float64) else t


class LayerPairsParams(KnowledgeParams):
    """Teacher and student layers paired in order; by default the models' last common number of stages."""

    teacher_layers: list[str] | None = Field(None, description="teacher layers (default: all stages)")
    student_layers: list[str] | None = Field(None, description="student layers, paired in order")

    @model_validator(mode="after")
    def _same_length(self) -> "LayerPairsParams":
        t, s = self.teacher_layers, self.student_layers
        if t is not None and s is not None and len(t) != len(s):
            raise ValueError(f"teacher_layers ({len(t)}) and student_layers ({len(s)}) must pair up one to one")
        if (t is not None and not t) or (s is not None and not s):
            raise ValueError("teacher_layers / student_layers must not be empty")
        return self


def paired_layers(kwargs: dict[str, Any], teacher: ModelLayout, student: ModelLayout) -> tuple[list[str], list[str]]:
    """``at``'s defaults: the last ``n`` stage outputs of each model, ``n`` the smaller stage count; a list
    given for one side only is paired with that many last stages of the other."""
    t, s = kwargs.get("teacher_layers"), kwargs.get("student_layers")
    if t is None and s is None:
        if not teacher.feature_layers or not student.feature_layers:
            raise ValueError("a model declares no feature layers; name teacher_layers/student_layers")
        n = min(len(teacher.feature_layers), len(student.feature_layers))
        return list(teacher.feature_layers[-n:]), list(student.feature_layers[-n:])
    if t is None:
        if not teacher.feature_layers:
            raise ValueError("the teacher declares no feature layers; name teacher_layers")
        t = list(teacher.feature_layers[-len(s):])
    elif s is None:
        if not student.feature_layers:
            raise ValueError("the student declares no feature layers; name student_layers")
        s = list(student.feature_layers[-len(t):])
    if len(t) != len(s):
        raise ValueError(f"teacher_layers ({len(t)}) and student_layers ({len(s)}) must pair up one to one")
    return list(t), list(s)


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
    "short_citation",
]
