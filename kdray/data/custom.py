"""Your own data: what the Hugging Face data sets (:mod:`~kdray.data.hub`) and tables (:mod:`~kdray.data.tables`)
share: a label mapping both splits agree on, a held-out test split carved once with a fixed seed, statistics of the
training part only, and cache file names."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from kdray.data.base import (
    carve_validation,
)
from kdray.errors import DatasetUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from kdray.data.base import DatasetSpec

TEST_SEED = 0  # the held-out test split's seed: fixed, never split_seed, so test samples never move
CACHE_VERSION = "1"  # bump when the cached arrays' layout or meaning changes


def need_package(package: str) -> Any:
    """Import an optional package, or say how to install it (kdray's own sets need none of them)."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise DatasetUnavailable(
            f"this data set needs the `{package}` package: pip install {package} (or pip install 'kdray[hub]')"
        ) from e


def column_list(names: Sequence[str]) -> str:
    return ", ".join(str(n) for n in names)


def sorted_values(values: set) -> list:
    try:
        return sorted(values)
    except TypeError:  # mixed types (1 and "1"): any fixed order will do, as long as it is deterministic
        return sorted(values, key=lambda v: (type(v).__name__, str(v)))


def label_mapping(train: list, test: list, what: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One sorted mapping of label values to 0..C-1 for train and test (strings, floats, 1-based ints ...)."""
    for part, values in (("train", train), ("test", test)):
        missing = sum(v is None or (isinstance(v, float) and v != v) for v in values)
        if missing:
            raise ValueError(f"{what} has {missing} missing value(s) in the {part} split")
    classes = sorted_values(set(train))
    unseen = sorted_values(set(test) - set(classes))
    if unseen:
        raise ValueError(f"{what}: test label(s) {unseen[:10]} never occur in the training split")
    if len(classes) < 2:
        raise ValueError(f"{what} has a single class ({classes}) in the training split: nothing to classify")
    index = {v: i for i, v in enumerate(classes)}
    to_ids = lambda vs: np.fromiter((index[v] for v in vs), dtype=np.int64, count=len(vs))  # noqa: E731
    return to_ids(train), to_ids(test), [str(v) for v in classes]


def hold_out_test(labels: np.ndarray, fraction: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, test) of a fixed, stratified test split carved from train."""
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"test_fraction must be a number between 0 and 1, got {fraction!r}") from None
    if not 0 < f < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {f}")
    try:
        return carve_validation(labels, f, TEST_SEED)
    except ValueError as e:
        raise ValueError(f"cannot hold out a test split from {where}: {e}") from None


def feature_stats(x: np.ndarray, axis: tuple[int, ...], scale: float = 1.0,
           chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std over ``axis`` (which includes the sample axis 0), in float64 and in chunks
    of samples, so uint8 images are never copied whole as floats; two passes, exact for large offsets."""
    count = int(np.prod([x.shape[a] for a in axis]))
    if count == 0:
        raise ValueError("no training samples to compute the normalisation from")
    parts = lambda: (x[i:i + chunk].astype(np.float64) / scale for i in range(0, len(x), chunk))  # noqa: E731
    mean = sum(p.sum(axis=axis) for p in parts()) / count
    shape = [1 if a in axis else n for a, n in enumerate(x.shape)]
    var = sum(np.square(p - mean.reshape(shape)).sum(axis=axis) for p in parts()) / count
    return mean, np.sqrt(var)


def train_part(y: np.ndarray, cfg: "DatasetSpec") -> np.ndarray:
    """The samples that train (train minus validation): normalisation statistics come from these only."""
    tr, _ = carve_validation(y, cfg.val_fraction, cfg.split_seed)
    return tr


def slug(path: Any) -> str:
    """A readable file-name part for the cache: the (first) source's name."""
    while isinstance(path, (list, tuple, dict)) and path:
        path = next(iter(path.values())) if isinstance(path, dict) else path[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(path)).name)[:40] or "data"


