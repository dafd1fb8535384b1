"""``student.quantize: int8``: a student trained with fake quantisation and delivered as an int8 model.

PyTorch's FX graph-mode quantisation-aware training (``torch.ao.quantization.quantize_fx``): :func:`prepare_int8`
traces the student's network and inserts fake-quantise modules after its weights and activations (8-bit, per-channel
weights, the x86 backend's default QAT configuration; Conv+BatchNorm fused into one QAT module), so the network
trains, and is distilled, against the rounding it will have; :func:`convert_int8` turns a copy into the int8 network
(quantised kernels: fbgemm / oneDNN on x86, qnnpack on ARM) that a run validates, measures and delivers, so the
accuracy kdray reports is the int8 model's, not the fake-quantised one's (they differ: x86's QAT configuration
fake-quantises activations to 7 bits, where its int8 kernels requantise each output to 8).

Deliberate limits (``kdray check`` refuses them): FX inlines the network's containers, so knowledge that taps an
intermediate layer by name has no layer to tap (logit knowledge only); int8 kernels run on the CPU, so the delivered
model is measured there (``latency.device: cpu``); classifiers only (a causal LM's token loss reads its head's weight
outside the forward, which the traced graph does not expose). PyTorch marks these APIs as moving to torchao; its
deprecation warnings are silenced where kdray calls them (and the int8 forward's one message, everywhere).
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

# An int8 model's every forward creates quantised tensors, which PyTorch 2.10+ warns about on each new call site (the
# tensors move to torchao): kdray delivers exactly these models on purpose, so this one message is not shown.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other "
                        r"quantized tensor creation functions", category=UserWarning)


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\..*")
        yield


def backend() -> str:
    """The quantised kernels this machine has: x86 (fbgemm + oneDNN), else qnnpack (ARM)."""
    engines = torch.backends.quantized.supported_engines
    return "x86" if "x86" in engines else "fbgemm" if "fbgemm" in engines else "qnnpack"


def prepare_int8(net: nn.Module, example: Tensor, engine: str | None = None) -> nn.Module:
    """``net`` traced with fake quantisation inserted (a ``GraphModule`` in train mode); ``example`` a batch of its
    (preprocessed) inputs, for the trace; ``engine`` the quantised kernels' backend (this machine's by default). Its
    options in a record say ``quantize: int8`` and the backend (what rebuilds it: per-channel weights on x86,
    per-tensor on qnnpack, so a record rebuilds with the configuration it trained with, on any machine)."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    options = dict(getattr(net, "kd_record_options", None) or {})
    engine = engine or backend()
    with _quiet():
        prepared = prepare_qat_fx(net.train(), get_default_qat_qconfig_mapping(engine), (example,))
    prepared.kd_record_options = {**options, "quantize": "int8", "quantize_backend": engine}  # type: ignore[assignment]
    prepared.kd_quantize = "int8"  # type: ignore[assignment]
    return prepared


def is_quantized(model: nn.Module) -> bool:
    """A student trained with fake quantisation (its ``net``), or the int8 model converted from one."""
    net = getattr(model, "net", model)
    return getattr(net, "kd_quantize", None) is not None


def convert_int8(model: nn.Module, samples: Tensor | None = None) -> nn.Module:
    """The int8 model of a fake-quantised student (a :class:`~kdray.models.Classifier` whose ``net`` came from
    :func:`prepare_int8`), on the CPU, in eval mode; ``model`` is untouched. ``samples``: raw inputs run through the
    copy first, so a student that has not trained yet has observed ranges to convert with (its cost at the start)."""
    torch.backends.quantized.engine = backend()
    twin = copy.deepcopy(model).cpu()
    if samples is not None:
        with torch.no_grad():
            twin.train()(samples.cpu())
    twin.eval()
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet():
        net = convert_fx(twin.net)
    net.kd_quantize = "int8"  # type: ignore[assignment]
    net.kd_int8 = True  # type: ignore[assignment]
    twin.net = net
    return twin


def is_int8(model: nn.Module) -> bool:
    """The converted int8 model (CPU kernels only)."""
    return bool(getattr(getattr(model, "net", model), "kd_int8", False))


def serving_device(model: nn.Module, device: torch.device) -> torch.device:
    """Where ``model`` runs: an int8 model's packed weights are CPU objects (``.to("cuda")`` moves only its scales),
    so it runs on the CPU whatever ``device`` the caller has."""
    return torch.device("cpu") if is_int8(model) else device


def example_input(preprocess: Any) -> Tensor:
    """A batch of two zero inputs in the shape the network reads (after preprocessing): what the FX trace runs."""
    return torch.zeros((2, *tuple(preprocess.shape)))
