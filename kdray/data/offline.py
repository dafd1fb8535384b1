"""Data sets that need no download: MNIST-1D (generated), scikit-learn's digits, and a tiny test set."""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdray.data.base import DataBundle, DatasetInfo, cached_arrays, data_dir, in_memory_bundle, register_dataset

if TYPE_CHECKING:  # pragma: no cover
    from kdray.data.base import DatasetSpec


# -- MNIST-1D ---------------------------------------------------------------------------------------
MNIST1D_ARGS = (
    "num_samples", "train_split", "template_len", "padding", "scale_coeff", "max_translation",
    "corr_noise_scale", "iid_noise_scale", "shear_scale", "shuffle_seq", "final_seq_length", "seed",
)


def _mnist1d_args(cfg: "DatasetSpec"):
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    unknown = sorted(set(cfg.options) - set(MNIST1D_ARGS))
    if unknown:
        raise ValueError(f"unknown MNIST-1D option(s) {unknown}; valid: {', '.join(MNIST1D_ARGS)}")
    args.update(cfg.options)
    return args


def describe_mnist1d(cfg: "DatasetSpec") -> DatasetInfo:
    length = int(_mnist1d_args(cfg)["final_seq_length"])
    return DatasetInfo((length,), 10, (1, length))


@register_dataset(
    "mnist1d", describe_mnist1d, offline=True, option_keys=MNIST1D_ARGS,
    description="MNIST-1D (Greydanus 2020): 4000/1000 procedurally generated 1-D digits, 40 floats each",
)
def load_mnist1d(cfg: "DatasetSpec") -> DataBundle:
    """Generated with the package's default arguments: the published 4000/1000 split.

    The generator takes ~1.5 s; the arrays are cached under the data directory keyed by the arguments
    (never fetched: ``mnist1d.data.get_dataset`` would download).
    """
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    args = _mnist1d_args(cfg)
    key = hashlib.sha256(json.dumps({k: args[k] for k in MNIST1D_ARGS}, sort_keys=True).encode()).hexdigest()[:12]

    def make():
        d = make_dataset(ObjectView(dict(args)))
        return {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}

    arrays = cached_arrays(data_dir(cfg) / "mnist1d" / f"mnist1d-{key}.npz", make)
    info = describe_mnist1d(cfg)
    return in_memory_bundle(
        "mnist1d", info,
        torch.from_numpy(arrays["x"].astype(np.float32)), torch.from_numpy(arrays["y"].astype(np.int64)),
        torch.from_numpy(arrays["x_test"].astype(np.float32)), torch.from_numpy(arrays["y_test"].astype(np.int64)),
        cfg,
    )


# -- scikit-learn digits ----------------------------------------------------------------------------
# Mean and std of all 1797x64 pixel values (0..16), fixed so the preprocessing is known before loading.
DIGITS_MEAN, DIGITS_STD = 4.8842, 6.0168


def describe_digits(cfg: "DatasetSpec") -> DatasetInfo:
    return DatasetInfo((64,), 10, (1, 8, 8), DIGITS_MEAN, DIGITS_STD)


def _fixed_test_split(x: np.ndarray, y: np.ndarray, test_fraction: float = 0.2, seed: int = 0):
    """Data sets without an official test split get a fixed, stratified one (seed 0, 20 %)."""
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)


@register_dataset(
    "digits", describe_digits, offline=True,
    description="scikit-learn's 1797 real 8x8 handwritten digits; fixed stratified 80/20 train/test split",
)
def load_digits(cfg: "DatasetSpec") -> DataBundle:
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    x_tr, x_te, y_tr, y_te = _fixed_test_split(d.data.astype(np.float32), d.target.astype(np.int64))
    t = torch.from_numpy
    return in_memory_bundle("digits", describe_digits(cfg), t(x_tr), t(y_tr), t(x_te), t(y_te), cfg)


# -- a tiny synthetic set for tests ------------------------------------------------------------------
def describe_tiny(cfg: "DatasetSpec") -> DatasetInfo:
    return DatasetInfo((16,), 3, (1, 16))


@register_dataset(
    "test_blobs", describe_tiny, offline=True,
    description="tiny synthetic 3-class set (scikit-learn make_classification, 600 x 16) for tests",
)
def load_test_blobs(cfg: "DatasetSpec") -> DataBundle:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=600, n_features=16, n_informative=8, n_redundant=2, n_classes=3, class_sep=1.5, random_state=0
    )
    x_tr, x_te, y_tr, y_te = _fixed_test_split(x.astype(np.float32), y.astype(np.int64))
    t = torch.from_numpy
    return in_memory_bundle("test_blobs", describe_tiny(cfg), t(x_tr), t(y_tr), t(x_te), t(y_te), cfg)


def describe_test_images(cfg: "DatasetSpec") -> DatasetInfo:
    classes = int(cfg.options.get("classes", 3))
    return DatasetInfo((3, 32, 32), classes, (3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@register_dataset(
    "test_images", describe_test_images, offline=True, option_keys=("samples", "classes"),
    description="synthetic CIFAR-shaped set (uint8 3x32x32 images, crop+flip; default 600 images of 3 classes; "
                "options samples, classes) for tests and benchmarks",
)
def load_test_images(cfg: "DatasetSpec") -> DataBundle:
    """Stored and augmented like CIFAR (uint8 NCHW, random crop with 4-pixel padding + flip), so the code
    paths real image sets take run in tests: each class is a noisy colour gradient in its own direction
    (3 classes: down, right, up; C classes: C directions around the circle)."""
    from functools import partial

    from kdray.data.views import crop_flip

    rng = np.random.default_rng(0)
    n, classes = int(cfg.options.get("samples", 600)), int(cfg.options.get("classes", 3))
    y = np.arange(n) % classes
    ramp = np.linspace(-1.0, 1.0, 32, dtype=np.float32)
    down, right = np.broadcast_to(ramp[None, :, None], (3, 32, 32)), np.broadcast_to(ramp[None, None, :], (3, 32, 32))
    if classes == 3:
        patterns = np.stack([down, right, -down])
    else:
        angles = 2 * np.pi * np.arange(classes) / classes
        patterns = np.stack([np.cos(a) * down + np.sin(a) * right for a in angles])
    x = 128 + 60 * patterns[y] + rng.normal(0, 40, (n, 3, 32, 32))
    x = np.clip(x, 0, 255).astype(np.uint8)
    x_tr, x_te, y_tr, y_te = _fixed_test_split(x, y.astype(np.int64))
    t = torch.from_numpy
    augment = None if cfg.augment is False else partial(crop_flip, pad=4, flip=True)
    return in_memory_bundle("test_images", describe_test_images(cfg), t(x_tr), t(y_tr), t(x_te), t(y_te), cfg,
                            augment=augment)
