"""Tap intermediate layers by module name, without editing the model: forward hooks.

Hooks (rather than torchvision's FX feature extraction) work on any module, traceable or not, cost
nothing when no layer is tapped, and keep working when the model is wrapped in DDP.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable

from torch import Tensor, nn

from kdray.errors import KdrayError
from kdray.knowledge.base import TapOutputs


class LayerNotFound(KdrayError, ValueError):
    """A tapped layer name that the model does not have; the message lists the valid ones."""

    def __init__(self, model_name: str, missing: list[str], valid: list[str]) -> None:
        self.missing, self.valid = missing, valid
        close = sorted({c for m in missing for c in difflib.get_close_matches(m, valid, n=3)})
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        super().__init__(
            f"layer {', '.join(map(repr, missing))} does not exist in {model_name}.{hint} "
            f"Valid layer names ({len(valid)}): {', '.join(valid)}"
        )


def layer_names(net: nn.Module) -> list[str]:
    """Every tappable module name of ``net`` (the root module itself excluded)."""
    return [n for n, _ in net.named_modules() if n]


def check_layers(net: nn.Module, names: Iterable[str], model_name: str | None = None) -> None:
    valid = layer_names(net)
    missing = [n for n in names if n not in set(valid)]
    if missing:
        raise LayerNotFound(model_name or getattr(net, "kd_model_name", type(net).__name__), missing, valid)


def _first_tensor(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"a tapped layer returned {type(out).__name__}, not a tensor")


class FeatureTaps:
    """Record the outputs of named submodules of ``net`` during its forward pass.

    ``taps = FeatureTaps(model.net, ["layer1", "layer3"])``, then ``taps.run(model, x)`` returns
    ``TapOutputs(logits, {"layer1": ..., "layer3": ...})``. ``remove()`` detaches the hooks.
    """

    def __init__(self, net: nn.Module, names: Iterable[str]) -> None:
        self.names = list(dict.fromkeys(names))
        check_layers(net, self.names)
        self._store: dict[str, Tensor] = {}
        modules = dict(net.named_modules())
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            # Record a copy: the model may modify this output in place later in its forward (a ReLU(inplace)
            # after a BatchNorm, torchvision's BasicBlock `out += identity`). Only tapped outputs are copied,
            # so the rest of the network keeps its in-place ops; clone() is differentiable.
            self._store[name] = _first_tensor(output).clone()

        return hook

    def run(self, model: nn.Module, x: Tensor, states: bool = False) -> TapOutputs:
        """``model(x)`` and the tapped outputs; with ``states``, a causal LM's ``model.states(x)`` (hidden states and
        head, :class:`~kdray.knowledge.token.TokenStates`) in place of the logits."""
        forward = model.states if states else model
        if not self._handles:  # nothing tapped (logit-only knowledge): no store to swap, every step
            return TapOutputs(forward(x), {})
        self._store = {}
        logits = forward(x)
        feats, self._store = self._store, {}
        return TapOutputs(logits, feats)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
