"""LoRA students (``student.peft``): low-rank adapters on a Hugging Face student's linear layers, trained while every
other weight stays frozen (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022), with the
``peft`` library's own layers.

The adapters are injected into the model in place (``peft.inject_adapter_in_model``): the model keeps its class and
its module tree, so kdray's taps, chunked head and generation see the same model with or without them. What a run
delivers (``student.pt``, the registered champion) is the merged model, W + (α/r)·BA per adapted layer, under the
plain model's parameter names: it loads without peft. Resuming needs the adapters themselves, so a checkpoint's
state also holds the unmerged weights (:func:`trainable_state`).
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn

ADAPTER = "default"


class LoraUnavailable(ValueError):
    """``student.peft`` on a model that has no Hugging Face model inside, or peft is not installed."""


def _hf_model(net: nn.Module) -> nn.Module:
    hf = getattr(net, "hf", None)
    if hf is None:
        raise LoraUnavailable(f"LoRA adapters go on a Hugging Face student (hf/..., hf-lm/..., tiny_llama, tiny_qwen3, "
                              f"tiny_gpt2); {type(net).__name__} is not one")
    return hf


def apply_lora(net: nn.Module, r: int, alpha: float, dropout: float, target_modules: Any) -> nn.Module:
    """Inject LoRA adapters of rank ``r`` into ``net``'s Hugging Face model (``target_modules``: module names or
    ``all-linear``) and freeze everything else. The adapters' random initialisation draws from torch's global
    generator: seed it (every rank the same) before calling."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise LoraUnavailable("student.peft needs peft: pip install peft") from None
    hf = _hf_model(net)
    if not getattr(net, "kd_causal_lm", False):  # a classifier's head is new: frozen, it would stay random
        raise LoraUnavailable("LoRA students are causal language models here (hf-lm/..., tiny_llama, tiny_qwen3, "
                              "tiny_gpt2): a classifier's new head would stay frozen at its random start")
    config = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout),
                        target_modules=target_modules, bias="none")
    for p in hf.parameters():
        p.requires_grad_(False)
    embeddings = {id(m) for m in (hf.get_input_embeddings(), hf.get_output_embeddings()) if m is not None}
    try:
        with warnings.catch_warnings():  # peft warns of a tied layer among the targets: refused just below
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            inject_adapter_in_model(config, hf, adapter_name=ADAPTER)
    except ValueError as e:  # no module of that name
        raise LoraUnavailable(str(e).strip().splitlines()[0]) from None
    on_embeddings = [n for n, m in _lora_layers(hf).items() if id(m.get_base_layer()) in embeddings]
    if on_embeddings:  # kdray's chunked loss reads the head's weight itself: an adapter there would never train
        raise LoraUnavailable(f"target_modules reach the embeddings or the output head ({', '.join(on_embeddings)}): "
                              "adapt the transformer layers' linear maps (q_proj, v_proj, ... or all-linear)")
    for name, p in hf.named_parameters():
        p.requires_grad_(".lora_" in name)
    net.kd_lora = True
    return net


def has_lora(model: nn.Module) -> bool:
    return any(getattr(m, "kd_lora", False) for m in model.modules())


def _lora_layers(model: nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of ``model`` with every adapter merged into its layer's weight, under the names the plain model
    has (``x.base_layer.weight`` -> ``x.weight``, the ``lora_`` entries gone)."""
    layers = _lora_layers(model)
    delta = {f"{name}.base_layer.weight": m.get_delta_weight(ADAPTER) for name, m in layers.items()}
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        if key in delta:
            value = value + delta[key].to(value.dtype)
        out[key.replace(".base_layer.", ".")] = value
    return out


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the adapters merged and removed: the plain model (for latency, exports)."""
    plain = copy.deepcopy(model)
    for name, m in _lora_layers(plain).items():
        m.merge(adapter_names=[ADAPTER])
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, child, m.get_base_layer())
    for m in plain.modules():
        if getattr(m, "kd_lora", False):
            m.kd_lora = False
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """What resuming a LoRA run needs: the unmerged weights (the adapters and the frozen base)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


__all__ = ["LoraUnavailable", "apply_lora", "has_lora", "merged_copy", "merged_state_dict", "trainable_state"]
