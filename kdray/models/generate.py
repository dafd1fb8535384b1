"""Completions from a causal LM: greedy (``val_exact_match``) or sampled at a temperature with nucleus truncation
(on-policy distillation), a fixed number of new tokens for a batch of prompts of one length.

A Hugging Face model (:class:`~kdray.models.hf_lm.HFCausalLM`) decodes with its key-value cache, one forward per
new token; any other causal LM (a plugin) recomputes the whole prefix per token. Tokens are drawn from the model's
logits over the tokenizer's ids only (a padded vocabulary's extra rows are never sampled), with a seeded
``torch.Generator``, so a rank's completions are reproducible from (seed, rank, epoch, step). Decoding never stops
early: stopping when every row has ended would wait for the device each token; the tokens after a row's end token
are replaced by ``pad`` and reported as not generated.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from kdray.models.zoo import unwrap


def _causal_lm(model: nn.Module) -> Any:
    net = unwrap(model)
    return getattr(net, "net", net)


def pick(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """(B, V) logits -> (B,) token ids: the argmax at ``temperature`` 0, else a draw from softmax(z / temperature)
    cut to its smallest set of tokens whose mass reaches ``top_p`` (the most likely token always kept)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
        choice = torch.multinomial(sorted_p * keep, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def complete(model: nn.Module, prompts: Tensor, new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, eos: int | None = None, pad: int = 0
             ) -> tuple[Tensor, Tensor]:
    """(B, P) prompt ids -> ((B, new_tokens) completion ids, (B, new_tokens) bool: generated, i.e. up to and including
    each row's first ``eos``). The model runs in eval mode (dropout off) and is put back as it was."""
    net = _causal_lm(model)
    was = model.training
    model.eval()
    try:
        hf = getattr(net, "hf", None)
        vocab = int(getattr(net, "vocab", 0) or 0)
        out = []
        if hf is not None:
            # transformers 5 names the key-value cache `cache` (`past_key_values` before, deprecated since)
            name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
            step = hf(input_ids=prompts.long(), use_cache=True, logits_to_keep=1)
            for i in range(new_tokens):
                token = pick(step.logits[:, -1, :vocab].float(), temperature, top_p, generator)
                out.append(token)
                if i + 1 < new_tokens:
                    step = hf(input_ids=token[:, None], use_cache=True, logits_to_keep=1,
                              **{name: getattr(step, name)})
        else:
            seq = prompts
            for _ in range(new_tokens):
                z = model(seq)[:, -1].float()
                token = pick(z[:, :vocab] if vocab else z, temperature, top_p, generator)
                out.append(token)
                seq = torch.cat([seq, token[:, None].to(seq.dtype)], dim=1)
    finally:
        model.train(was)
    tokens = torch.stack(out, dim=1) if out else prompts.new_zeros((prompts.shape[0], 0))
    if eos is None:
        return tokens, torch.ones_like(tokens, dtype=torch.bool)
    ended_before = (tokens == eos).long().cumsum(1) - (tokens == eos).long() > 0
    return torch.where(ended_before, torch.full_like(tokens, pad), tokens), ~ended_before


def completion_rows(prompts: Tensor, tokens: Tensor, generated: Tensor, ignore: int = -100) -> tuple[Tensor, Tensor]:
    """Prompts (B, P) and their completions (B, n) with :func:`complete`'s ``generated`` mask -> training rows: inputs
    (B, P + n - 1) and next-token targets, ``ignore`` on the prompt and after each row's end token."""
    p = prompts.shape[1]
    row = torch.cat([prompts, tokens.to(prompts.dtype)], dim=1)
    y = row[:, 1:].clone()
    y[:, :p - 1] = ignore
    y[:, p - 1:] = torch.where(generated, tokens, torch.full_like(tokens, ignore))
    return row[:, :-1], y


__all__ = ["complete", "completion_rows", "pick"]
