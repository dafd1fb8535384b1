"""Hugging Face transformers as teachers and students: ``hf/<hub id or local path>``.

``hf/bert-base-uncased`` (a hub id: needs the network or the local cache), ``hf/./runs/my-bert`` or
``hf//abs/path`` (a folder written by ``save_pretrained``). Text models get
``AutoModelForSequenceClassification`` and take int64 token ids ``(B, T)``; image models get
``AutoModelForImageClassification`` and take the float images ``(B, C, H, W)`` that kdray's
``Preprocess`` produces. Either way ``num_labels`` is the data set's class count.

Options: ``pretrained`` (default true: the folder's / hub's weights, a new classification head where
its size differs), ``config`` (overrides of the HF config, e.g. ``{num_hidden_layers: 4}`` for a
smaller student, randomly initialised with ``pretrained: false``) and ``hf_config`` (a whole config
dict: built with no file or network access). A built model records ``{hf_config, pretrained: false}``
as its options, so a saved record rebuilds it from the record alone, weights from its state_dict.

The network is wrapped in :class:`HFClassifier`, whose ``forward(x)`` returns logits. Its taps (for
kdray's forward hooks) are identity modules that the wrapper feeds:

* ``hidden.{i}``, i = 0..L: the hidden states (embeddings, then every layer). Token sequences are
  presented **channels-first, (B, H, T)**, like a 1-D feature map, so FitNets' regressor (a 1x1
  Conv1d, i.e. one linear map applied to every token) and attention transfer (a map over tokens)
  apply unchanged. Convolutional image models' hidden states stay (B, C, H, W).
* ``attention.{i}``, i = 0..L-1: attention probabilities (B, heads, T, T), after the softmax and the
  padding mask but *before* attention dropout: in training mode the HF model's own attention
  outputs are the dropped-out maps (zeros, rows not summing to 1) that TinyBERT's and MiniLM's losses
  must not see, so kdray's ``kdray_eager`` attention returns the clean map (recomputing attention
  once without dropout, only while an attention tap is hooked in training). Models that cannot use a
  custom attention function fall back to ``eager``, whose training-mode maps are post-dropout.
* ``value.{i}``: the output of layer i's value projection (B, T, H), found by name (``*.value``,
  ``*.v_lin``, ``*.v_proj``); absent where the model fuses q/k/v.
* ``pooled``: the sequence representation, (B, H): the first ([CLS]) token of the last hidden state
  (before BERT's tanh pooler); for convolutional image models the spatial mean of the last map.

Hidden states and attentions are only requested from the HF model while one of these taps is hooked,
so plain training pays nothing. Text inputs are masked with ``attention_mask = (x != pad_token_id)``,
the pad id from the HF config (0 where it has none; override with ``config: {pad_token_id: ...}``).

``init_from_teacher`` gives DistilBERT's student initialisation (every other layer of the teacher, or a list).
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
import logging
import os
import sys
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from kdray.models.zoo import MODELS, ModelSpec, set_layout

_INSTALL = "pip install transformers (or kdray[hub])"
_VALUE_SUFFIXES = ("value", "v_lin", "v_proj")
_CLEAN_ATTENTION_IMPL = "kdray_eager"
# True while an HFClassifier whose attention is tapped runs its forward: kdray_eager then returns clean maps.
CLEAN_ATTENTION: contextvars.ContextVar[bool] = contextvars.ContextVar("kdray_clean_attention", default=False)


# -- transformers, lazily ----------------------------------------------------------------------------
def transformers_module():
    try:
        import transformers
    except ImportError:
        raise ValueError(f"Hugging Face models need transformers: {_INSTALL}") from None
    return transformers


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports locally ("newly initialized weights" for the new head...)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _clean_eager(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 *args: Any, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """The model's own eager attention, but returning the attention map from before dropout.

    Attention is computed twice only in training, with dropout, while an attention tap is hooked.
    """
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    if not (dropout and module.training and CLEAN_ATTENTION.get()):
        return eager(module, query, key, value, attention_mask, *args, dropout=dropout, **kwargs)
    _, probs = eager(module, query, key, value, attention_mask, *args, dropout=0.0, **kwargs)
    out, _ = eager(module, query, key, value, attention_mask, *args, dropout=dropout, **kwargs)
    return out, probs


def attention_impl(auto_cls: Any, config: Any) -> str:
    """``kdray_eager`` where the model's attention dispatches through transformers' AttentionInterface
    with a module-level eager function (BERT, RoBERTa, DistilBERT, ViT... in transformers 5), else ``eager``."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask
    except ImportError:  # older transformers: no custom attention functions
        return "eager"
    if _CLEAN_ATTENTION_IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(_CLEAN_ATTENTION_IMPL, _clean_eager)
        AttentionMaskInterface.register(_CLEAN_ATTENTION_IMPL, eager_mask)  # the padding mask eager attention gets
    try:
        model_cls = auto_cls._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return "eager"
    module = sys.modules.get(model_cls.__module__)
    if not getattr(model_cls, "_supports_attention_backend", False) or not hasattr(module, "eager_attention_forward"):
        return "eager"
    return _CLEAN_ATTENTION_IMPL if _CLEAN_ATTENTION_IMPL in ALL_MASK_ATTENTION_FUNCTIONS else "eager"


# -- configs -----------------------------------------------------------------------------------------
def looks_local(rest: str) -> bool:
    return rest.startswith(("/", "./", "../", "~")) or os.path.exists(rest)


def load_config(rest: str) -> Any:
    """The HF config of a hub id or local folder, or a ``ValueError`` that says why not."""
    transformers = transformers_module()
    if looks_local(rest):
        path = os.path.expanduser(rest)
        if not os.path.isdir(path):
            raise ValueError(f"hf/{rest}: there is no folder {path} (a local Hugging Face model is a folder "
                             "written by save_pretrained, holding config.json)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"hf/{rest}: the folder {path} has no config.json (write it with save_pretrained)")
    else:
        path = rest
    try:
        with quiet_transformers():
            return transformers.AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, unknown model type: all say why
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = ("" if looks_local(rest) else
                 "; a hub id needs network access or the local Hugging Face cache, a local folder is "
                 "written hf/./relative/path or hf//absolute/path")
        raise ValueError(
            f"hf/{rest}: cannot load its Hugging Face config ({type(e).__name__}: {reason}){where}") from None


def config_dict(config: Any) -> dict[str, Any]:
    """The whole config as plain JSON values: what a weights-only record may hold."""
    return json.loads(config.to_json_string(use_diff=False))


def config_from_dict(d: dict[str, Any]) -> Any:
    transformers = transformers_module()
    d = dict(d)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise ValueError("hf_config has no model_type")
    return transformers.AutoConfig.for_model(model_type, **d)


def _kind(config: Any) -> str:
    """``text`` or ``image``: which auto class has a classification head for this config."""
    from transformers.models.auto import modeling_auto as auto

    if type(config) in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        return "text"
    if type(config) in auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
        return "image"
    raise ValueError(f"the Hugging Face model type {config.model_type!r} has no sequence or image classification head")


def _image_input(config: Any) -> tuple[int, int, int]:
    size = getattr(config, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return int(getattr(config, "num_channels", 3)), int(h), int(w)


# -- the registry source -----------------------------------------------------------------------------
def resolve(rest: str) -> ModelSpec:
    """``hf/<rest>`` -> a ModelSpec; text or image is read from the config."""
    config = load_config(rest)
    try:
        kind = _kind(config)
    except ValueError as e:
        raise ValueError(f"hf/{rest}: {e}") from None

    def factory(num_classes: int, input_shape: tuple[int, ...], **options: Any) -> nn.Module:
        return build(rest, num_classes, input_shape, **options)

    factory.__name__ = "hf_model"
    if kind == "text":
        return ModelSpec(f"hf/{rest}", factory, "transformers", (16,),
                         f"Hugging Face {config.model_type} sequence classifier", example_dtype="int64")
    return ModelSpec(f"hf/{rest}", factory, "transformers", _image_input(config),
                     f"Hugging Face {config.model_type} image classifier")


MODELS.add_source("hf", resolve, "Hugging Face transformers: hf/<hub id> or hf/./<folder from save_pretrained>; "
                  "options pretrained (default true), config (overrides, e.g. num_hidden_layers), "
                  "allow_reinit (accept overrides that re-initialise pretrained tensors)")


# -- building ----------------------------------------------------------------------------------------
def apply_overrides(config: Any, overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"the {config.model_type} config has no field {key!r}")
        setattr(config, key, value)


def build(source: str | None, num_classes: int, input_shape: tuple[int, ...], *, pretrained: bool = True,
          config: dict[str, Any] | None = None, hf_config: dict[str, Any] | None = None,
          allow_reinit: bool = False) -> "HFClassifier":
    """Build ``hf/<source>`` for ``num_classes`` classes and inputs of ``input_shape`` (``(T,)`` or ``(C, H, W)``).

    A ``config`` override that changes the shape of pretrained tensors (``hidden_size``, ``intermediate_size``...)
    makes transformers re-initialise them at random: refused, naming them, unless ``allow_reinit`` (then named in a
    warning). The classification head, made for ``num_classes``, is new by design and not counted."""
    transformers = transformers_module()
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) not in (1, 3):
        raise ValueError(
            f"a Hugging Face model takes token ids (T,) or images (C, H, W), not inputs of shape {input_shape}")
    text = len(input_shape) == 1
    if hf_config is not None:
        cfg, pretrained = config_from_dict(hf_config), False
    elif source is None:
        raise ValueError("a Hugging Face model needs a source or hf_config")
    else:
        cfg = load_config(source)
    apply_overrides(cfg, dict(config or {}))
    kind = _kind(cfg)
    if (kind == "text") != text:
        raise ValueError(f"{cfg.model_type} is {'a text' if kind == 'text' else 'an image'} model but the data set "
                         f"gives inputs of shape {input_shape} ({'token ids' if text else 'images'})")
    cfg.num_labels = int(num_classes)
    if text:
        max_pos = getattr(cfg, "max_position_embeddings", None)
        if max_pos is not None and input_shape[0] > max_pos:
            raise ValueError(f"sequences of {input_shape[0]} tokens exceed the model's {max_pos} positions")
    else:
        c = getattr(cfg, "num_channels", input_shape[0])
        if not pretrained:  # a new model is built for the data's image size
            for attr, value in (("num_channels", input_shape[0]), ("image_size", input_shape[1])):
                if hasattr(cfg, attr) and attr not in (config or {}) and input_shape[1] == input_shape[2]:
                    setattr(cfg, attr, value)
        elif c != input_shape[0]:
            raise ValueError(f"{cfg.model_type} takes {c}-channel images, the data set gives {input_shape[0]} channels")
    auto = transformers.AutoModelForSequenceClassification if text else transformers.AutoModelForImageClassification
    impl = attention_impl(auto, cfg)
    with quiet_transformers():
        if pretrained:
            model, info = auto.from_pretrained(os.path.expanduser(source) if looks_local(source) else source,
                                               config=cfg, ignore_mismatched_sizes=True, attn_implementation=impl,
                                               output_loading_info=True)
        else:
            model = auto.from_config(cfg, attn_implementation=impl)
    if pretrained:
        check_reinitialised(model, info, source, dict(config or {}), allow_reinit)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()  # fp32 master weights; kdray's autocast picks the compute precision
    return HFClassifier(model, input_shape)


def check_reinitialised(model: nn.Module, info: dict[str, Any], source: str, overrides: dict[str, Any],
                         allow: bool) -> None:
    """Refuse (or, with ``allow``, name in a warning) pretrained tensors of the base model that transformers had to
    re-initialise: their shapes changed (``mismatched_keys``) or they are missing. The new classification head
    lies outside the base model (``base_model_prefix``) and is expected."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = [k[0] if isinstance(k, (tuple, list)) else k
             for k in [*(info.get("mismatched_keys") or []), *(info.get("missing_keys") or [])]]
    body = sorted({n for n in names if prefix and (n == prefix or n.startswith(prefix + "."))})
    if not body:
        return
    shown = ", ".join(body[:6]) + (f" and {len(body) - 6} more" if len(body) > 6 else "")
    what = (f"hf/{source}: {len(body)} pretrained tensor{'s' if len(body) > 1 else ''} are re-initialised at random "
            f"because the model no longer matches the checkpoint" + (f" (config override {overrides})" if overrides
                                                                      else "") + f": {shown}")
    if not allow:
        raise ValueError(f"{what}. The student would not start from its pretrained weights there; set "
                         "`allow_reinit: true` in the model's options to accept it")
    logging.getLogger("kdray").warning("%s (allow_reinit: true)", what)


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The encoder's layers: the first ModuleList of ``num_hidden_layers`` modules of one class."""
    n = getattr(model.config, "num_hidden_layers", None)
    if not n:
        return None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n and len({type(x) for x in m}) == 1:
            return name, m
    return None


def _value_modules(layers: nn.ModuleList) -> list[nn.Module]:
    """Each layer's value projection, or none when one layer does not have exactly one."""
    found = []
    for layer in layers:
        hits = [m for n, m in layer.named_modules() if n.rsplit(".", 1)[-1] in _VALUE_SUFFIXES]
        if len(hits) != 1:
            return []
        found.append(hits[0])
    return found


def hooked(modules) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class _FeedValue:
    """Forward hook on a value projection: passes its output to the ``value.{i}`` tap when that is hooked.

    A picklable object (not a closure) so that a deepcopy of the wrapper feeds its own copy of the tap."""

    def __init__(self, tap: nn.Module) -> None:
        self.tap = tap

    def __call__(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if self.tap._forward_hooks or self.tap._forward_pre_hooks:
            self.tap(output if isinstance(output, Tensor) else output[0])


def _default_feature_layers(num_layers: int) -> list[str]:
    """Up to 4 hidden states spread evenly over depth, ending at the last layer."""
    n = min(4, num_layers)
    return [f"hidden.{i}" for i in sorted({round(num_layers * (k + 1) / n) for k in range(n)})] if n else ["hidden.0"]


class HFClassifier(nn.Module):
    """A Hugging Face classifier as a kdray network: ``forward(x)`` returns logits; taps as in the module doc."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.hf = model  # not `module`: kdray's unwrap() would take that for a DDP wrapper
        cfg = model.config
        self.text = len(input_shape) == 1
        pad = getattr(cfg, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0
        found = layer_list(model)
        layers = found[1] if found else None
        is_transformer = getattr(cfg, "num_attention_heads", None) is not None and layers is not None
        depth = len(layers) if layers is not None else int(
            getattr(cfg, "num_hidden_layers", None) or len(getattr(cfg, "depths", ())) or 0)
        self.hidden = nn.ModuleList(nn.Identity() for _ in range(depth + 1))
        self.attention = nn.ModuleList(nn.Identity() for _ in range(depth if is_transformer else 0))
        values = _value_modules(layers) if is_transformer else []
        self.value = nn.ModuleList(nn.Identity() for _ in values)
        for v, tap in zip(values, self.value):
            v.register_forward_hook(_FeedValue(tap))
        self.pooled = nn.Identity()
        self._interpolate = False
        if not self.text:
            size = _image_input(cfg)[1:]
            self._interpolate = (tuple(input_shape[1:]) != size
                                 and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters)
        set_layout(self, _default_feature_layers(depth), "pooled")
        self.kd_attention_layers = [f"attention.{i}" for i in range(len(self.attention))]
        self.kd_value_layers = [f"value.{i}" for i in range(len(self.value))]
        self.kd_record_options = {"hf_config": config_dict(cfg), "pretrained": False}

    def forward(self, x: Tensor) -> Tensor:
        want_hidden = hooked(self.hidden) or hooked([self.pooled])
        want_attention = hooked(self.attention)
        if self.text:
            if x.dtype not in (torch.int64, torch.int32):
                x = x.long()
            kwargs: dict[str, Any] = {"input_ids": x, "attention_mask": (x != self.pad_token_id).long()}
        else:
            kwargs = {"pixel_values": x}
            if self._interpolate:
                kwargs["interpolate_pos_encoding"] = True
        if want_hidden:
            kwargs["output_hidden_states"] = True
        if want_attention:
            kwargs["output_attentions"] = True
        token = CLEAN_ATTENTION.set(True) if want_attention else None
        try:
            out = self.hf(**kwargs)
        finally:
            if token is not None:
                CLEAN_ATTENTION.reset(token)
        if want_hidden:
            states = out.hidden_states
            for tap, h in zip(self.hidden, states):
                tap(h.transpose(1, 2) if h.dim() == 3 else h)
            last = states[-1]
            self.pooled(last[:, 0] if last.dim() == 3 else last.flatten(2).mean(2))
        if want_attention:
            for tap, a in zip(self.attention, out.attentions):
                tap(a)
        return out.logits


# -- DistilBERT's initialisation ---------------------------------------------------------------------
def teacher_layer_choice(mode: str | list[int], n: int) -> list[int]:
    """The teacher layers a student keeps: ``every_other_layer`` (0, 2, 4, ...: ceil(n/2) layers, DistilBERT's) or
    an explicit list of indices."""
    if isinstance(mode, str):
        if mode != "every_other_layer":
            raise ValueError(f"unknown init_from_teacher mode {mode!r}; known: 'every_other_layer' or a list of "
                             "teacher layer indices")
        return list(range(0, n, 2))
    layers = [int(i) for i in mode]
    if not layers or any(not 0 <= i < n for i in layers):
        raise ValueError(f"init_from_teacher layers {layers} must be indices of the teacher's {n} layers (0..{n - 1})")
    return layers


def init_from_teacher(teacher: nn.Module, mode: str | list[int] = "every_other_layer") -> HFClassifier:
    """A student with the teacher's config but only some of its layers (``every_other_layer``: ceil(L/2) layers,
    layer j copied from teacher layer 2j; or an explicit list of teacher layers), every other weight (embeddings,
    pooler, classifier) copied as is: DistilBERT's initialisation (Sanh et al., 2019, arXiv:1910.01108). ``teacher``
    is a kdray Classifier or an HFClassifier; :func:`kdray.models.hf_lm.init_from_teacher` takes causal LMs too."""
    from kdray.models.zoo import unwrap

    net = unwrap(teacher)
    net = getattr(net, "net", net)
    if not isinstance(net, HFClassifier):
        raise ValueError(f"init_from_teacher needs a Hugging Face teacher (hf/... or hf-lm/...), got "
                         f"{type(net).__name__}")
    t_model = net.hf
    prefix, t_layers = layer_list(t_model) or (None, None)
    if t_layers is None:
        raise ValueError(f"cannot find the layer list of this {t_model.config.model_type} teacher")
    layers = teacher_layer_choice(mode, len(t_layers))
    cfg = config_from_dict(config_dict(t_model.config))
    cfg.num_hidden_layers = len(layers)
    input_shape = (1,) if net.text else (getattr(cfg, "num_channels", 3), *_image_input(cfg)[1:])
    student = build(None, int(cfg.num_labels), input_shape, hf_config=config_dict(cfg))
    if not net.text:
        student._interpolate = net._interpolate
    copy_layers(student.hf, t_model, prefix, layers)
    student.kd_model_name = getattr(net, "kd_model_name", "hf")  # type: ignore[assignment]
    return student


def copy_layers(student: nn.Module, teacher: nn.Module, prefix: str, layers: list[int]) -> None:
    """Load ``student`` (a Hugging Face model with ``len(layers)`` layers under ``prefix``) from ``teacher``: student
    layer j from teacher layer ``layers[j]``, every other tensor (embeddings, norms, heads) as it is."""
    t_state = teacher.state_dict()
    mapped = {}
    for key in student.state_dict():
        src = key
        if key.startswith(prefix + "."):
            j, rest = key[len(prefix) + 1:].split(".", 1)
            src = f"{prefix}.{layers[int(j)]}.{rest}"
        mapped[key] = t_state[src]
    student.load_state_dict(mapped)
