"""``scheme: on_policy``: batches whose completions are the student's own samples, scored by the live teacher.

With probability λ (``scheme.lmbda``) a batch's rows are replaced by the batch's prompts (the first ``prompt_len``
tokens of each row) followed by ``max_new_tokens`` tokens the student samples from them (``scheme.sampling``: its
temperature and top_p, apart from the loss temperature); its targets are the sampled tokens up to and including
the end token. The teacher scores those rows live (a cache holds only the data's rows), and the batch trains on the
token-level terms alone (GKD: no cross-entropy on the student's own samples).

The λ draw is seeded by (seed, epoch, step) only, so every DDP rank takes the same branch at the same step (ranks
that took different branches would generate for different times, and the slow one would hold the others at the
gradient all-reduce); the samples are seeded by (seed, rank, epoch, step), so a rerun draws the same tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kdray.config import RunConfig
from kdray.data import DatasetInfo
from kdray.knowledge.token import IGNORE
from kdray.models.generate import complete, completion_rows

_DRAW, _SAMPLE = 0x0D1, 0x5A3  # stream tags: the λ draw and the samples never share a seed


def seeded(device: torch.device, *key: int) -> torch.Generator:
    """A generator on ``device`` seeded from a tuple of integers (numpy's SeedSequence mixes them)."""
    import numpy as np

    seed = int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(seed)


class OnPolicyBatches:
    """Decides which batches are on-policy and makes their rows; counts what it generated this epoch."""

    def __init__(self, lmbda: float, new_tokens: int, temperature: float, top_p: float, prompt_len: int,
                 eos: int | None, pad: int, seed: int, rank: int, device: torch.device) -> None:
        self.lmbda, self.new_tokens = float(lmbda), int(new_tokens)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.prompt_len, self.eos, self.pad = int(prompt_len), eos, int(pad)
        self.seed, self.rank, self.device = int(seed), int(rank), device
        self.reset()

    def reset(self) -> None:
        """A new epoch: nothing generated yet."""
        self.batches = 0
        self.tokens = torch.zeros((), dtype=torch.float64, device=self.device)

    def draw(self, epoch: int, step: int) -> bool:
        """Is the batch at (epoch, step) on-policy? The same answer on every rank (no rank in the seed)."""
        if self.lmbda >= 1.0:
            return True
        if self.lmbda <= 0.0:
            return False
        u = torch.rand((), generator=seeded(torch.device("cpu"), _DRAW, self.seed, epoch, step))
        return bool(u < self.lmbda)

    def rows(self, student: nn.Module, x: Tensor, epoch: int, step: int) -> tuple[Tensor, Tensor]:
        """(B, T) data rows -> the student's rows: inputs (B, P + n - 1) and targets (the sampled tokens, -100 on
        the prompt and after each row's end token)."""
        prompts = x[:, :self.prompt_len]
        g = seeded(x.device, _SAMPLE, self.seed, self.rank, epoch, step)
        tokens, generated = complete(student, prompts, self.new_tokens, temperature=self.temperature,
                                     top_p=self.top_p, generator=g, eos=self.eos, pad=self.pad)
        self.batches += 1
        self.tokens += generated.sum()
        return completion_rows(prompts, tokens, generated, IGNORE)


def prompt_rows_error(cfg: RunConfig, info: DatasetInfo) -> str | None:
    """Why this run's data cannot serve ``scheme: on_policy`` or ``seq_kd`` (None: it can): both complete the data's
    prompts, so they need rows of prompt + answer."""
    if cfg.scheme.type in ("on_policy", "seq_kd") and (not info.causal_lm or not info.prompt_len):
        return (f"{cfg.scheme.type} completes the data's prompts, but data set {cfg.dataset.name!r} has no "
                "prompt/answer rows (a fixed prompt length); use lm_tasks")
    return None


def on_policy_batches(cfg: RunConfig, info: DatasetInfo, device: torch.device, rank: int) -> OnPolicyBatches | None:
    """The run's on-policy batches (``scheme: on_policy``), or None."""
    if cfg.scheme.type != "on_policy":
        return None
    why = prompt_rows_error(cfg, info)
    if why:
        raise ValueError(f"scheme.type: {why}")
    scheme = cfg.scheme
    new = scheme.max_new_tokens or (info.input_shape[0] - info.prompt_len + 1)
    return OnPolicyBatches(scheme.lmbda, new, scheme.sampling.temperature, scheme.sampling.top_p, info.prompt_len,
                           info.eos_token_id, info.pad_token_id or 0, cfg.seed, rank, device)


__all__ = ["OnPolicyBatches", "on_policy_batches", "prompt_rows_error", "seeded"]
