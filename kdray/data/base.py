"""Data sets: the registry, what a loaded data set looks like, and the fixed-seed validation split.

Every data set yields *raw* inputs (MNIST-1D's float rows, images as uint8 or [0, 1] floats); the
normalisation is a ``Preprocess`` module that travels inside every model kdray builds. Validation is
always carved from the training split, stratified by class, with a fixed seed (``split_seed``), so
selecting a student never touches the test split; the test split is read only for the final evaluation
of a champion.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from kdray.models.zoo import Preprocess
from kdray.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from kdray.data.views import ViewKey


class DatasetSpec(Protocol):
    """What a loader reads of a data-set config (kdray's ``DatasetConfig`` is one). The data layer sits below the
    config: it names the fields it needs instead of importing the config."""

    name: str
    val_fraction: float
    split_seed: int
    data_dir: str | None
    download: bool
    augment: bool | None
    options: dict[str, Any]

# A batch-level training augmentation: (x, sample indices, the epoch's view key) -> x, every draw keyed per sample.
Augment = Callable[[Tensor, Tensor, "ViewKey"], Tensor]


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a data set without loading it: enough to build and dry-run models."""

    input_shape: tuple[int, ...]  # the raw sample shape as stored (e.g. (40,) or (3, 32, 32))
    num_classes: int
    model_input: tuple[int, ...]  # what the network sees after Preprocess (e.g. (1, 40))
    mean: tuple[float, ...] | float = 0.0
    std: tuple[float, ...] | float = 1.0
    input_dtype: str = "float32"  # "uint8" images, "int64" token ids (text: passed to the model unchanged)
    pad_token_id: int | None = None  # text: the tokenizer's padding id (the model masks these positions)
    task: str = "classification"  # or "causal_lm": blocks of tokens, num_classes the vocabulary, y the next tokens
    tokenizer: str | None = None  # causal_lm: the tokenizer (a folder or hub id) whose ids the blocks hold
    eos_token_id: int | None = None  # causal_lm: the token that ends a document (what generation stops at)
    prompt_len: int | None = None  # causal_lm rows of prompt + answer (lm_tasks): every prompt's length in tokens

    @property
    def tokens(self) -> bool:
        return self.input_dtype == "int64"

    @property
    def causal_lm(self) -> bool:
        return self.task == "causal_lm"

    def preprocess(self) -> Preprocess:
        m = list(self.mean) if isinstance(self.mean, tuple) else self.mean
        s = list(self.std) if isinstance(self.std, tuple) else self.std
        return Preprocess(self.model_input, m, s, passthrough=self.tokens)

    def example_input(self, n: int = 2) -> Tensor:
        """``n`` inputs of the stored shape and dtype, for dry runs (token ids: 1, never the padding id)."""
        if self.tokens:
            fill = 1 if self.pad_token_id != 1 else 2
            return torch.full((n, *self.input_shape), fill, dtype=torch.int64)
        return torch.zeros(n, *self.input_shape, dtype=getattr(torch, self.input_dtype))


@dataclass
class Split:
    """One split. In-memory sets hold stacked tensors ``x``/``y``; file-backed sets hold a Dataset."""

    y: Tensor
    x: Tensor | None = None
    dataset: torch.utils.data.Dataset | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)  # per-sample extras (synthetic_lm: the true log-probs)
    prompt_len: int | None = None  # rows of prompt + answer: x[:, :prompt_len] is each row's prompt

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def in_memory(self) -> bool:
        return self.x is not None

    def head(self, n: int) -> Tensor:
        """The first ``n`` raw samples as stored, stacked (read from the Dataset when the split is file-backed)."""
        if self.in_memory:
            return self.x[:n]
        return torch.stack([self.dataset[i][0] for i in range(min(n, len(self)))])


@dataclass
class DataBundle:
    name: str
    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    augment: Augment | None = None  # batch-level, train only: (x, idx, ViewKey) -> x
    file_augment: bool = False  # file-backed sets that augment inside their Dataset
    fingerprint: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def deterministic(self) -> bool:
        """True when a training sample is the same tensor every epoch (teacher outputs can be cached)."""
        return self.augment is None and not self.file_augment


@dataclass(frozen=True)
class DatasetEntry:
    """A registered data set: its loader, its description function and the options it takes."""

    name: str
    load: Callable[["DatasetSpec"], DataBundle]
    describe: Callable[["DatasetSpec"], DatasetInfo]
    offline: bool
    description: str
    option_keys: tuple[str, ...] = ()


DATASETS: Registry[DatasetEntry] = Registry("data set")


def register_dataset(
    name: str, describe: Callable[["DatasetSpec"], DatasetInfo], *, offline: bool, description: str,
    option_keys: tuple[str, ...] = (),
):
    """Decorator: register a loader ``(DatasetSpec) -> DataBundle`` under ``name``."""

    def decorator(load: Callable[["DatasetSpec"], DataBundle]):
        DATASETS.register(name, DatasetEntry(name, load, describe, offline, description, tuple(option_keys)))
        return load

    return decorator


def data_dir(cfg: "DatasetSpec") -> Path:
    """Where data sets live: ``dataset.data_dir``, else ``$KDRAY_DATA_DIR``, else ``~/.cache/kdray/data``."""
    root = cfg.data_dir or os.environ.get("KDRAY_DATA_DIR") or Path.home() / ".cache" / "kdray" / "data"
    return Path(root).expanduser()


def carve_validation(labels: np.ndarray, val_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (train, val) of a training split with these ``labels``, fixed by ``split_seed``.

    Stratified (scikit-learn's ``train_test_split``), so that validation accuracy weighs the classes as
    training does, even on imbalanced data; unstratified only when stratification is impossible (a class
    with a single sample, or fewer validation or training samples than classes).
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    n = len(labels)
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise ValueError(f"val_fraction {val_fraction} leaves no training samples out of {n}")
    classes, counts = np.unique(labels, return_counts=True)
    stratify = labels if counts.min() >= 2 and min(n_val, n - n_val) >= len(classes) else None
    tr, va = train_test_split(np.arange(n), test_size=n_val, stratify=stratify, random_state=split_seed)
    return np.sort(tr), np.sort(va)


def in_memory_bundle(
    name: str,
    info: DatasetInfo,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    cfg: "DatasetSpec",
    augment: Augment | None = None,
) -> DataBundle:
    """Carve validation from train and fingerprint the data (the teacher-cache key uses it)."""
    tr, va = carve_validation(y_train.numpy(), cfg.val_fraction, cfg.split_seed)
    tr_t, va_t = torch.from_numpy(tr), torch.from_numpy(va)
    train = Split(y_train[tr_t].contiguous(), x_train[tr_t].contiguous())
    val = Split(y_train[va_t].contiguous(), x_train[va_t].contiguous())
    test = Split(y_test.contiguous(), x_test.contiguous())
    h = hashlib.sha256()
    for part in (train, val):
        h.update(part.x.numpy().tobytes())
        h.update(part.y.numpy().tobytes())
    h.update(repr((name, info, cfg.val_fraction, cfg.split_seed, sorted(cfg.options.items()))).encode())
    return DataBundle(name, info, train, val, test, augment=augment, fingerprint=h.hexdigest()[:16],
                      details={"train": len(train), "val": len(val), "test": len(test)})


def cached_arrays(path: Path, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load ``path`` (.npz) or make the arrays and write them atomically (safe with concurrent trials)."""
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    arrays = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return arrays


def load_dataset(cfg: "DatasetSpec") -> DataBundle:
    """The data set of ``cfg``, with its unlabelled training samples (``labelled_fraction``, ``transfer``) if any."""
    from kdray.data.transfer import with_transfer

    return with_transfer(DATASETS.get(cfg.name).load(cfg), cfg, load_dataset)


def describe_dataset(cfg: "DatasetSpec") -> DatasetInfo:
    return DATASETS.get(cfg.name).describe(cfg)
