"""Teacher outputs computed once per sweep and shared by every trial on every node.

Every trial of a sweep runs the same frozen teacher over the same training inputs:

* **fixed inputs** (no random augmentation, :mod:`~kdray.cache.fixed`): the teacher runs once over the training
  split; its logits and the tapped feature maps the sweep needs go to every trial through Ray's object store;
* **augmented inputs**: views are a pure function of (seed, epoch, sample) (:mod:`kdray.data.views`), so every
  trial needs the teacher's outputs on *the same* views. A **producer** actor (:mod:`~kdray.cache.producer`, on a
  GPU when asked) computes epoch e's outputs ahead of the trials, in blocks of consecutive sample indices, only
  for epochs some trial has reached (plus ``prefetch``); a **store** actor (:mod:`~kdray.cache.store`, on the
  driver's node) keeps finished blocks in Ray's object store within ``cache.max_bytes`` and spills the least
  recently read to the sweep's storage; a **trial** (:mod:`~kdray.cache.outputs`) reads its batch's rows by
  (epoch, sample index), computes and publishes the rows nobody has taken on, and waits for rows being computed
  elsewhere, so no row is computed twice. Should the store die, trials run their teacher live.

Trials look outputs up **by sample index** (never by batch position), so any shuffling or sharding reads the
right rows. Every trial recomputes the key (:mod:`~kdray.cache.keys`: teacher weights, data content, split, view
seed) from its own teacher and data before use: a stale cache is never used. Storage is compact
(:mod:`~kdray.cache.codec`): top-k log-probabilities in float16 (exact up to rounding when k covers every class)
and feature maps only when every epoch of them fits the budget. A trial that taps a layer that was not cached runs
the teacher live and says why in its ``teacher_reason`` (its ``teacher_source`` says ``live``).
:mod:`~kdray.cache.driver` is what the sweep starts and stops.
"""
from __future__ import annotations

from kdray.cache.codec import Codec, plan_codec
from kdray.cache.driver import ViewCache, start_view_cache
from kdray.cache.fixed import TeacherCache, build_cache, plan_cache
from kdray.cache.keys import ViewCacheHandle, cache_key, view_cache_key
from kdray.cache.outputs import TeacherOutputs, ViewCacheOutputs
from kdray.cache.producer import ViewProducer, producer_node
from kdray.cache.store import ViewStore

__all__ = ["Codec", "TeacherCache", "TeacherOutputs", "ViewCache", "ViewCacheHandle", "ViewCacheOutputs",
           "ViewProducer", "ViewStore", "build_cache", "cache_key", "plan_cache", "plan_codec", "producer_node",
           "start_view_cache", "view_cache_key"]
