"""The producer of a sweep's per-(epoch, sample) teacher outputs: a Ray actor that computes epochs ahead of the
trials, block by block, on a node with CPUs (or a GPU)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from kdray.cache.codec import Codec
from kdray.cache.keys import view_cache_key


class ViewProducer:
    """A Ray actor computing the teacher's outputs block by block for the store's demanded epochs."""

    def __init__(self, store: Any, records: list, dataset: dict[str, Any], seed: int, codec: Codec,
                 use_gpu: bool = False, threads: int = 1, batch_size: int = 256, key: str | None = None) -> None:
        self.store, self.records, self.dataset, self.seed, self.codec = store, records, dataset, seed, codec
        self.use_gpu, self.threads, self.batch_size, self.key = use_gpu, threads, batch_size, key

    def run(self, poll_s: float = 0.05) -> None:
        """Work until killed: take a block, compute its missing rows, publish them."""
        import ray

        from kdray.config import DatasetConfig
        from kdray.data import load_dataset
        from kdray.data.loaders import train_views
        from kdray.data.views import ViewKey
        from kdray.models import Teacher
        from kdray.ray_setup import resolve_ref

        torch.set_num_threads(max(1, self.threads))
        device = torch.device("cuda" if self.use_gpu and torch.cuda.is_available() else "cpu")
        data = load_dataset(DatasetConfig.model_validate(self.dataset))
        records = [resolve_ref(r) for r in self.records]
        mine = view_cache_key(records, data, self.seed)
        if self.key is not None and mine != self.key:  # its node's copy of the data differs from the driver's
            raise RuntimeError(f"the producer's teacher or data on node {ray.get_runtime_context().get_node_id()} "
                               f"give cache key {mine}, not the sweep's {self.key}: it publishes nothing, and "
                               "trials compute their teacher outputs themselves")
        teacher = Teacher.from_records(records).to(device)
        teacher.tap(self.codec.layers)
        while True:
            job = ray.get(self.store.next_job.remote())
            if job is None:
                time.sleep(poll_s)
                continue
            epoch, missing = job
            key = ViewKey(self.seed, epoch)
            idx_all = torch.as_tensor(missing, dtype=torch.int64)
            parts, kl = [], 0.0
            with torch.no_grad():
                for s in range(0, len(idx_all), self.batch_size):
                    idx = idx_all[s:s + self.batch_size]
                    rows, k = self.codec.encode(teacher(train_views(data.train, idx, key, data.augment, device)))
                    parts.append(rows)
                    kl += k
            rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            ray.get(self.store.publish.remote(epoch, idx_all.numpy(), rows, "producer", kl))


def producer_node(nodes: list[dict[str, Any]], gpus: float) -> str | None:
    """The node a producer runs on: one that offers CPUs (and a GPU when it needs one), never a 0-CPU head, whose
    cores it would not have (it computes); None while no such node has joined."""
    for n in nodes:
        res = n.get("Resources", {})
        if n.get("Alive") and res.get("CPU", 0) > 0 and res.get("GPU", 0) >= gpus:
            return n["NodeID"]
    return None
