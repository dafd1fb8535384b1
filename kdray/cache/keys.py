"""What makes a shared teacher output valid for a trial: a key of (teacher weights, data content, split) and, for
augmented data, the seed of the views; and the handle a trial receives for the per-(epoch, sample) store."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from kdray.cache.codec import BLOCK, Codec
from kdray.data import DataBundle
from kdray.models import weights_digest


def cache_key(records: list[dict[str, Any]], data: DataBundle, split: str = "train") -> str:
    h = hashlib.sha256()
    h.update(weights_digest(records).encode())
    h.update(data.fingerprint.encode())
    h.update(split.encode())
    return h.hexdigest()[:20]


def view_cache_key(records: list[dict[str, Any]], data: Any, seed: int) -> str:
    """Teacher weights, data (fingerprint), whether it is augmented, and the seed of the views."""
    return f"{cache_key(records, data)}-aug{int(data.augment is not None)}-seed{seed}"


@dataclass
class ViewCacheHandle:
    """What a trial receives: the store actor, the codec, and the key its own teacher and data must match."""

    store: Any
    codec: Codec
    num_samples: int
    key: str
    seed: int
    block: int = BLOCK
    note: str = ""
