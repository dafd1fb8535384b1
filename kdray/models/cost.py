"""What a student costs to serve: its parameter count and its inference latency.

Latency is measured the way the student would be served: the whole module (preprocessing included) on
raw inputs, in eval mode under ``torch.inference_mode()``, on the serving device (CPU by default, with
``threads`` intra-op threads), at batch 1 and at batch 64. Each is the smallest of three medians of repeated
forwards after warm-up: interference from other processes only adds time, and on a sweep's shared machine it
comes in bursts (a neighbouring trial starting up made one median 75x too slow here), which one round of the
three escapes.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

BATCHES = (1, 64)
WARMUP = 1
ROUNDS = 3
MIN_REPEATS, MAX_REPEATS = 2, 20  # per round
BUDGET_S = 0.05  # per round, after MIN_REPEATS: a CIFAR CNN at batch 64 costs ~0.25 s in all, an MLP ~10 ms


def parameter_count(model: nn.Module) -> int:
    """Every weight: an int8 model's are packed inside its quantised layers (``weight()``, ``bias()``), not
    parameters, and count as much as the float ones they replace."""
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if type(m).__module__.startswith("torch.ao.nn") and callable(getattr(m, "weight", None)):
            bias = m.bias() if callable(getattr(m, "bias", None)) else None
            n += m.weight().numel() + (bias.numel() if bias is not None else 0)
    return n


def latency_ms(model: nn.Module, example: torch.Tensor, *, rounds: int = ROUNDS, repeats: int = MAX_REPEATS,
               budget_s: float = BUDGET_S) -> float:
    """Wall time of one forward of ``example`` in milliseconds: the smallest of ``rounds`` medians (``model`` in
    eval mode already)."""
    sync = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    medians = []
    with torch.inference_mode():
        for _ in range(WARMUP):
            model(example)
        sync()
        for r in range(rounds):
            if r:
                time.sleep(0.02)  # let a burst of interference pass
            times: list[float] = []
            start = time.perf_counter()
            while len(times) < repeats and (len(times) < MIN_REPEATS or time.perf_counter() - start < budget_s):
                t0 = time.perf_counter()
                model(example)
                sync()
                times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times))
    return min(medians) * 1000.0


def student_cost(model: nn.Module, samples: torch.Tensor, device: str = "cpu", threads: int = 1) -> dict[str, Any]:
    """``student_params``, ``latency_ms`` (batch 1) and ``latency_b64_ms`` of a copy of ``model`` on ``device``.

    ``samples``: real raw samples of the data set (as stored: uint8 images, token ids, float rows), cycled to
    fill a batch of 64. Random inputs would not do: token ids must lie in the vocabulary.
    The copy leaves the training model, its device and its mode untouched; torch's thread count is restored.
    """
    dev = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
    net = copy.deepcopy(model).to(dev).eval()
    samples = samples.detach().to(dev)
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        out: dict[str, Any] = {"student_params": parameter_count(net)}
        for b in BATCHES:
            x = samples[torch.arange(b, device=dev) % len(samples)]
            key = "latency_ms" if b == 1 else f"latency_b{b}_ms"
            out[key] = latency_ms(net, x)
        out["latency_device"] = dev.type
        return out
    finally:
        torch.set_num_threads(before)
