"""The sweep driver's side of the caches: start the per-(epoch, sample) store and its producer, and stop them."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kdray.cache.codec import plan_codec
from kdray.cache.keys import ViewCacheHandle, view_cache_key
from kdray.cache.producer import ViewProducer, producer_node
from kdray.cache.store import ViewStore


@dataclass
class ViewCache:
    """The sweep's side: the handle trials get, the actors to stop, and where spilled blocks go."""

    handle: ViewCacheHandle
    actors: list
    spill_dir: str | None
    producer_run: Any = None
    producer_gpus: float = 0.0  # what the producer holds, for the sweep's concurrency plan
    _stopped: bool = False
    _lock: Any = field(default_factory=lambda: __import__("threading").Lock())

    def start_producer(self, make: Any, poll_s: float = 2.0) -> None:
        """Start the producer (``make(node_id)`` creates the actor) on a node with CPUs: now if one is there,
        else from a background thread as soon as one joins (a cluster's 0-CPU head runs no producer)."""
        import threading

        import ray

        def start(node: str) -> None:
            with self._lock:
                if self._stopped:
                    return
                producer = make(node)
                self.actors.append(producer)
                self.producer_run = producer.run.remote()

        node = producer_node(ray.nodes(), self.producer_gpus)
        if node is not None:
            start(node)
            return

        def wait_for_a_node() -> None:
            while not self._stopped:
                node = producer_node(ray.nodes(), self.producer_gpus)
                if node is not None:
                    start(node)
                    return
                time.sleep(poll_s)

        threading.Thread(target=wait_for_a_node, daemon=True, name="kdray-view-producer-start").start()

    def summary(self) -> dict[str, Any]:
        import ray

        return ray.get(self.handle.store.summary.remote())

    def producer_error(self) -> str | None:
        """Why the producer stopped, if it did (it only stops by failing); trials then computed live."""
        import ray

        if self.producer_run is None:
            return None
        done, _ = ray.wait([self.producer_run], timeout=0)
        if not done:
            return None
        try:
            ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - reported, the trials did not depend on it
            return f"{type(e).__name__}: {e}"
        return None

    def stop(self) -> None:
        import ray

        from kdray.storage import remove_tree

        with self._lock:
            self._stopped = True
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
        if self.spill_dir:
            remove_tree(self.spill_dir)


def start_view_cache(records: list[dict[str, Any]], refs: list, data: Any, dataset: dict[str, Any], seed: int,
                     layers: list[str], cache_cfg: Any, max_epochs: int, spill_dir: str | None,
                     trials_use_gpu: bool, trial_gpus: float = 0.0) -> ViewCache:
    """Start the store and (unless ``cache.producer`` is off) the producer for a sweep over augmented data.

    The store lives on the driver's node (hard affinity): it owns every block, and only the driver's node lives
    as long as the sweep; should it die anyway, trials run their teacher live (``ViewCacheOutputs``). The producer
    runs on a node with CPUs (with a GPU when ``producer_gpus``); on a cluster whose workers have not joined yet
    it starts when the first one does."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    codec, note = plan_codec(records, data, layers, cache_cfg, max_epochs)
    here = ray.get_runtime_context().get_node_id()
    store = ray.remote(ViewStore).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(
        len(data.train), codec, cache_cfg.max_bytes, spill_dir, cache_cfg.prefetch_epochs, max_epochs)
    key = view_cache_key(records, data, seed)
    handle = ViewCacheHandle(store, codec, len(data.train), key, seed, note=note)
    cache = ViewCache(handle, [store], spill_dir)
    gpus = cache_cfg.producer_gpus
    if gpus is None:  # a GPU of its own only where one trial still fits beside it (no sweep can wait on it)
        gpus = 1.0 if trials_use_gpu and ray.cluster_resources().get("GPU", 0) >= trial_gpus + 1 else 0.0
    if cache_cfg.producer and trials_use_gpu and not gpus:
        handle.note = note + ("; no producer: trials on GPUs would wait for a CPU one, so they share what they "
                              "compute (cache.producer_gpus gives it a GPU)")
    elif cache_cfg.producer:
        cache.producer_gpus = float(gpus)
        cache.start_producer(lambda node: ray.remote(ViewProducer).options(
            num_cpus=0, num_gpus=gpus, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            store, refs, dataset, seed, codec, use_gpu=gpus > 0, key=key))
        handle.note = note + (f"; producer on {gpus:g} GPU" if gpus else "; producer on CPU")
    else:
        handle.note = note + "; no producer: trials share what they compute"
    return cache
