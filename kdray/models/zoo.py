"""The model registry and the wrapper that carries a data set's preprocessing inside every model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from kdray.registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture: a factory ``(num_classes, input_shape, **options) -> nn.Module``.

    ``example_input`` is an input shape (without batch) the model accepts; tests use it to run every
    registered model. The built module carries ``kd_feature_layers`` (stage outputs, the default hint
    layers) and ``kd_embedding_layer`` (the penultimate representation, the default for relational
    knowledge) as attributes. A module may also carry ``kd_record_options``: options that replace the
    configured ones in its saved record, so that it is rebuilt without what built it (a Hugging Face
    model's config instead of its hub id, no download of pretrained weights that the record holds).
    """

    name: str
    factory: Callable[..., nn.Module]
    family: str
    example_input: tuple[int, ...]
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    example_dtype: str = "float32"  # "int64" for models that take token ids

    def build(self, num_classes: int, input_shape: tuple[int, ...], **options: Any) -> nn.Module:
        net = self.factory(num_classes=num_classes, input_shape=tuple(input_shape), **{**self.defaults, **options})
        net.kd_model_name = self.name  # type: ignore[assignment]
        return net


MODELS: Registry[ModelSpec] = Registry("model")


def register_model(
    name: str, family: str, example_input: tuple[int, ...], description: str = "", *, example_dtype: str = "float32",
    **defaults: Any
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a model factory; ``defaults`` are bound options (e.g. a depth); ``example_dtype`` is
    ``int64`` for models that take token ids."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.register(name, ModelSpec(name, factory, family, tuple(example_input), description, dict(defaults),
                                        example_dtype))
        return factory

    return decorator


def set_layout(net: nn.Module, feature_layers: list[str], embedding_layer: str) -> nn.Module:
    net.kd_feature_layers = list(feature_layers)  # type: ignore[assignment]
    net.kd_embedding_layer = embedding_layer  # type: ignore[assignment]
    return net


class Preprocess(nn.Module):
    """Turn a data set's raw inputs into what the network expects: reshape, then standardise.

    It is part of every model kdray builds (teacher, student, exported champion), so a registered
    model takes the data set's raw rows or images and nobody has to re-implement the normalisation.
    """

    def __init__(self, shape: tuple[int, ...], mean: list[float] | float = 0.0, std: list[float] | float = 1.0,
                 passthrough: bool = False):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        # Token ids (text) and a foreign model's own inputs (an MLflow teacher) go to the network unchanged.
        self.passthrough = bool(passthrough)
        stat_shape = (1, -1) + (1,) * (len(self.shape) - 1) if isinstance(mean, (list, tuple)) else (1,)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(stat_shape))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(stat_shape))

    def forward(self, x: Tensor) -> Tensor:
        if self.passthrough:
            return x
        x = x.reshape(x.shape[0], *self.shape)
        if x.dtype == torch.uint8:  # raw 8-bit images, as stored on disk: to [0, 1] as training sees them
            x = x.float() / 255.0
        elif not torch.is_floating_point(x):
            x = x.float()
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"shape={self.shape}" + (", passthrough" if self.passthrough else "")


class Classifier(nn.Module):
    """``net(preprocess(x))``: a registered network with its data set's preprocessing in front.

    Layer names for taps are relative to ``net`` (``layer2``, not ``net.layer2``).
    """

    def __init__(self, preprocess: Preprocess, net: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.preprocess(x))

    @property
    def causal_lm(self) -> bool:
        """A causal language model (``states`` gives its hidden states and head; ``forward`` its logits (B, T, V))."""
        return bool(getattr(self.net, "kd_causal_lm", False))

    def states(self, x: Tensor) -> Any:
        """A causal LM's last hidden states and output head (:class:`~kdray.knowledge.token.TokenStates`)."""
        return self.net.states(self.preprocess(x))


def build_model(
    name: str, num_classes: int, preprocess: Preprocess, options: dict[str, Any] | None = None
) -> Classifier:
    """Build the registered model ``name`` for a data set (its class count and preprocessing)."""
    spec = MODELS.get(name)
    return Classifier(preprocess, spec.build(num_classes, preprocess.shape, **(options or {})))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / compiled wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)
