"""``resources.strategy: fsdp``: the student's parameters, gradients and optimizer state sharded across the run's
workers by PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), for students whose training
state (weights, gradients, optimizer moments) is larger than one device (each worker still builds the whole student
once, before sharding it).

How kdray uses it, and why:

* one FSDP group per decoder layer (its parameters are gathered just before the layer runs and freed after it), and
  the training step (:class:`~kdray.train.setup.DistillStep`: student + objective) as the root group, which holds the
  embeddings, the final norm, the output head and any connector. kdray's token losses read the head's weight outside
  the model's forward (a chunk of positions at a time, never B × T × V logits): in the root group, the head is whole
  for the step's whole forward and backward, and its gradient is reduce-scattered with the rest.
* gradients are averaged over the ranks as DDP averages them, so a run ends at DDP's weights (``tests/e2e/test_fsdp``).
* what calls the student outside the step's forward (validation, greedy and sampled generation) runs through
  :func:`outside`, which FSDP treats as a forward of the root (``register_fsdp_forward_method``): the root's
  parameters are gathered for it and sharded again after it (FSDP keeps a root's parameters whole after its forward,
  for the backward that follows; none follows here). Every rank must run the same number of sharded forwards, since
  each gathers parameters from all ranks: validation pads the shorter shards
  (:func:`kdray.data.evaluate.evaluate_lm`'s ``lockstep``), and generation runs a fixed number of steps on every rank.
* checkpoints hold whole tensors (``torch.distributed.checkpoint.state_dict``'s full state dicts, gathered by every
  rank and kept by rank 0), so a checkpoint or champion loads in one process without FSDP, and a run resumes from it
  on any number of ranks.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def shard(step: nn.Module, student: nn.Module, device: torch.device, world: int) -> nn.Module:
    """``step`` (whose ``student`` is a causal LM with a layer list) sharded across the ``world`` ranks of the
    default process group: one group per decoder layer, ``step`` as the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    layers = decoder_layers(student)
    if layers is None:
        raise ValueError("resources.strategy: fsdp shards a causal language model's decoder layers; this student "
                         "has no layer list")
    mesh = init_device_mesh(device.type, (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(step, mesh=mesh)
    register_fsdp_forward_method(step, "outside")
    return step


def decoder_layers(student: nn.Module) -> nn.ModuleList | None:
    """A Hugging Face causal LM student's decoder layers (None for any other model)."""
    from kdray.models.hf import layer_list

    hf = getattr(getattr(student, "net", student), "hf", None)
    found = layer_list(hf) if hf is not None and getattr(student, "causal_lm", False) else None
    return found[1] if found else None


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def outside(step: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, which calls the student outside the step's forward: under FSDP, as a forward of the
    root (its parameters gathered first); otherwise just the call."""
    if is_sharded(step):
        try:
            return step.outside(fn, *args, **kwargs)
        finally:  # the root keeps its parameters whole after a forward (backward would gather them again): free them
            step.reshard()
    return fn(*args, **kwargs)


def full_state(step: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sharded step's whole state dict and the optimizer's (keyed by parameter name), on the CPU. Every rank
    must call it (the gathers are collective); rank 0 gets them, the others empty dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(step, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(step: nn.Module, optimizer: torch.optim.Optimizer, model: dict[str, Any],
                    optim: dict[str, Any]) -> None:
    """Shard whole state dicts (every rank read them from the checkpoint) into the step and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(step, optimizer, model_state_dict=model, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True))


def split_state(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of a step's state dict under ``prefix`` (``student.``, ``objective.``), the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
