"""A language-model teacher served by Ray actors of its own (``teacher.serve``): the actors hold the teacher (on their
GPUs where they have them) and answer each trial's batch with its top-k next-token log-probabilities, so no trial
loads the teacher, however many trials run and however large it is.

A trial sends a batch's token ids and receives, per position, the top ``cache.top_k`` log-probabilities at T = 1
(float32), their ids and the exact log of the remaining mass: what a live teacher cut to the same top-k gives
(:func:`~kdray.knowledge.divergences.top_k_of`), so a trial learns the same distribution served, cached or live.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdray.knowledge import TapOutputs
from kdray.knowledge.divergences import top_k_of
from kdray.knowledge.token import TopKTokens, chunk_tokens


class TeacherServer:
    """The actor: the teacher built once from its records; ``top_k`` answers a batch."""

    def __init__(self, records: list[Any], ensemble: dict[str, Any], use_gpu: bool) -> None:
        from kdray.models import Teacher
        from kdray.ray_setup import resolve_ref

        records = [resolve_ref(r) for r in records]  # object refs: the weights travel once, not per actor
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.teacher = Teacher.from_records(records, **ensemble).to(self.device)
        self.served = 0  # batches answered

    def vocab(self) -> int:
        return int(self.teacher.members[0].net.vocab)

    @torch.no_grad()
    def top_k(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, T) token ids -> per position the top-k log-probabilities (B, T, k), their ids and the log of the
        rest (B, T), computed a chunk of positions at a time (never B × T × V at once)."""
        x = np.require(x, np.int64, requirements="W")  # Ray's arguments are read-only views: torch takes a copy
        states = self.teacher(torch.from_numpy(x).to(self.device)).logits
        h = states.hidden.reshape(-1, states.hidden.shape[-1])
        size = chunk_tokens(states.head.vocab, None, self.device)
        parts = [top_k_of(torch.log_softmax(states.head.logits(h[a:a + size]), dim=-1), k)
                 for a in range(0, h.shape[0], size)]
        lp, idx, rest = (torch.cat([p[j] for p in parts]) for j in range(3))
        b, t = x.shape[:2]
        self.served += 1
        return (lp.reshape(b, t, -1).cpu().numpy(), idx.reshape(b, t, -1).cpu().numpy(),
                rest.reshape(b, t).cpu().numpy())

    def stats(self) -> dict[str, int]:
        return {"served_batches": self.served}


def start_servers(records: list[Any], ensemble: dict[str, Any], serve: Any) -> list[Any]:
    """``serve.actors`` actors holding the teacher, each with ``serve.cpus`` CPUs and ``serve.gpus`` GPUs; returns
    their handles once every one has built its teacher (a teacher that cannot be built fails here, not in a trial,
    and no actor is left behind). An actor that dies (its node pre-empted, out of memory) is restarted and its
    pending batches retried: answering a batch changes nothing on it."""
    import ray

    cls = ray.remote(num_cpus=serve.cpus, num_gpus=serve.gpus, max_restarts=-1, max_task_retries=-1)(TeacherServer)
    handles = [cls.remote(records, ensemble, serve.gpus > 0) for _ in range(serve.actors)]
    try:
        ray.get([h.vocab.remote() for h in handles])
    except BaseException:
        stop_servers(handles)
        raise
    return handles


def stop_servers(handles: list[Any]) -> None:
    import ray

    for h in handles or []:
        ray.kill(h)


class ServedOutputs:
    """What the training loop asks for teacher outputs, answered by the serving actors (a batch at a time, round
    them)."""

    source = "served"
    cross = False

    def __init__(self, handles: list[Any], top_k: int, device: torch.device, rank: int = 0) -> None:
        import ray

        self.handles, self.top_k, self.device = list(handles), int(top_k), device
        self.vocab = int(ray.get(self.handles[0].vocab.remote()))
        self.reason = f"served by {len(self.handles)} teacher actor(s), its top {self.top_k} tokens per position"
        self._next = int(rank)  # DDP ranks start at different actors: one step's batches spread over them

    def set_epoch(self, epoch: int) -> None:
        """The inputs do not change between epochs."""

    def epoch_stats(self) -> dict[str, float]:
        return {}

    def __call__(self, idx: Tensor, x: Tensor) -> TapOutputs:
        import ray

        handle = self.handles[self._next % len(self.handles)]
        self._next += 1
        lp, index, rest = ray.get(handle.top_k.remote(x.cpu().numpy(), self.top_k))
        # Ray hands back read-only views of its object store: one copy (torch does not support non-writable arrays)
        to = lambda a: torch.from_numpy(np.require(a, requirements="W")).to(self.device, non_blocking=True)  # noqa: E731,E501
        return TapOutputs(TopKTokens(to(lp), to(index), to(rest), self.vocab), {})


__all__ = ["ServedOutputs", "TeacherServer", "start_servers", "stop_servers"]
