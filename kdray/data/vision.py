"""Image data sets from torchvision (CIFAR-10/100, MNIST, Fashion-MNIST) and a user's own image folder.

torchvision's sets are downloaded into the data directory only when ``dataset.download: true``; when
they are absent and downloading is off (or there is no internet), loading fails with a message that
says where they were looked for and what to do. The in-memory sets keep uint8 images and augment
whole batches on the training device (random crop with padding, horizontal flip), which is several
times faster than per-sample PIL transforms.
"""
from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from filelock import FileLock

from kdray.data.base import (
    DataBundle,
    DatasetInfo,
    Split,
    carve_validation,
    data_dir,
    in_memory_bundle,
    register_dataset,
)
from kdray.data.views import crop_flip
from kdray.errors import DatasetUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from kdray.data.base import DatasetSpec

# name: (torchvision class, folder torchvision uses, shape, classes, mean, std, augment(pad, flip))
TV_SETS: dict[str, tuple[str, str, tuple[int, ...], int, tuple[float, ...], tuple[float, ...], tuple[int,
                                                                                                     bool] | None]] = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", (3, 32, 32), 10,
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), (4, True)),
    "cifar100": ("CIFAR100", "cifar-100-python", (3, 32, 32), 100,
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), (4, True)),
    "mnist": ("MNIST", "MNIST", (1, 28, 28), 10, (0.1307,), (0.3081,), None),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST", (1, 28, 28), 10, (0.2860,), (0.3530,), (2, True)),
}


def _describe_tv(name: str, cfg: "DatasetSpec") -> DatasetInfo:
    cls_name, folder, shape, classes, mean, std, _ = TV_SETS[name]
    root = data_dir(cfg)
    if not (root / folder).exists() and not cfg.download:
        raise DatasetUnavailable(
            f"{name} is not in {root / folder}. Set `dataset.download: true` to download it (needs internet), "
            f"or put torchvision's copy of {cls_name} under `dataset.data_dir` ({root})."
        )
    return DatasetInfo(shape, classes, shape, mean, std)


def _load_tv(name: str, cfg: "DatasetSpec") -> DataBundle:
    import torchvision.datasets as tvd

    info = _describe_tv(name, cfg)
    cls_name, _, shape, _, _, _, aug = TV_SETS[name]
    cls = getattr(tvd, cls_name)
    root = data_dir(cfg)
    try:
        # Several trials on one node may start at once: one downloads, the others wait for it.
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(root / f".{name}.lock"):
            train = cls(str(root), train=True, download=cfg.download)
            test = cls(str(root), train=False, download=cfg.download)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a corrupt copy is a RuntimeError
        raise DatasetUnavailable(f"could not load {name} from {root}: {e}") from e

    def as_tensor(ds) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(np.asarray(ds.data))
        x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x.unsqueeze(1)  # NHWC -> NCHW, NHW -> N1HW
        return x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)

    x_tr, y_tr = as_tensor(train)
    x_te, y_te = as_tensor(test)
    augment = None
    if aug is not None and cfg.augment is not False:
        augment = partial(crop_flip, pad=aug[0], flip=aug[1])
    return in_memory_bundle(name, info, x_tr, y_tr, x_te, y_te, cfg, augment=augment)


for _name in TV_SETS:
    register_dataset(
        _name, partial(_describe_tv, _name), offline=False,
        description=f"torchvision {TV_SETS[_name][0]} (downloaded into the data directory with dataset.download: true)",
    )(partial(_load_tv, _name))


# -- a user's own images ------------------------------------------------------------------------------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGEFOLDER_KEYS = ("root", "image_size", "test_fraction")


def _folder_root(cfg: "DatasetSpec") -> Path:
    root = cfg.options.get("root")
    if not root:
        raise DatasetUnavailable("imagefolder needs `dataset.options.root`: a folder with train/<class>/*.jpg")
    root = Path(root).expanduser()
    if not (root / "train").is_dir():
        raise DatasetUnavailable(f"imagefolder root {root} has no train/ folder (expected train/<class>/<image>)")
    return root


def describe_imagefolder(cfg: "DatasetSpec") -> DatasetInfo:
    root = _folder_root(cfg)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DatasetUnavailable(f"imagefolder {root / 'train'} needs at least two class folders, found {classes}")
    size = int(cfg.options.get("image_size", 64))
    return DatasetInfo((3, size, size), len(classes), (3, size, size), IMAGENET_MEAN, IMAGENET_STD)


class _Indexed(torch.utils.data.Dataset):
    """A subset of an ImageFolder read through its own transform; yields (image, label)."""

    def __init__(self, folder: Any, indices: np.ndarray) -> None:
        self.folder, self.indices = folder, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.folder[int(self.indices[i])]


@register_dataset(
    "imagefolder", describe_imagefolder, offline=True, option_keys=IMAGEFOLDER_KEYS,
    description="your own images: options.root with train/<class>/ (and optionally test/<class>/)",
)
def load_imagefolder(cfg: "DatasetSpec") -> DataBundle:
    """Images read from disk; random-resized-crop + flip for training, resize + centre crop otherwise
    (for training too with ``dataset.augment: false``).

    Validation is carved from ``train/``; ``test/`` is the test split when present, otherwise a fixed
    ``test_fraction`` (default 0.1, seed 0) of ``train/`` is held out first.
    """
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    info = describe_imagefolder(cfg)
    root, size = _folder_root(cfg), info.input_shape[1]
    augment = cfg.augment is not False
    eval_tf = T.Compose([T.Resize(int(round(size * 1.14))), T.CenterCrop(size), T.ToTensor()])
    train_eval = tvd.ImageFolder(str(root / "train"), transform=eval_tf)
    # Without augmentation, training sees exactly what validation and test see (one preprocessing).
    train_tf = T.Compose([T.RandomResizedCrop(size, scale=(0.35, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()]
                         ) if augment else eval_tf
    train_aug = tvd.ImageFolder(str(root / "train"), transform=train_tf) if augment else train_eval
    labels = np.asarray(train_aug.targets, dtype=np.int64)
    pool = np.arange(len(labels))
    if (root / "test").is_dir():
        test_folder = tvd.ImageFolder(str(root / "test"), transform=eval_tf)
        if test_folder.classes != train_aug.classes:
            raise DatasetUnavailable(f"{root}/test has classes {test_folder.classes}, train has {train_aug.classes}")
        test = Split(torch.as_tensor(test_folder.targets, dtype=torch.int64), dataset=test_folder)
    else:
        keep, held = carve_validation(labels, float(cfg.options.get("test_fraction", 0.1)), 0)
        pool = keep
        test = Split(torch.from_numpy(labels[held]), dataset=_Indexed(train_eval, held))
    tr, va = carve_validation(labels[pool], cfg.val_fraction, cfg.split_seed)
    tr, va = pool[tr], pool[va]
    # The teacher cache is keyed by this: it covers the files, the preprocessing and the split itself.
    h = hashlib.sha256(repr((str(root), size, augment, repr(train_tf), repr(eval_tf))).encode())
    for part in (pool, tr, va):
        h.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
    for path, _ in train_aug.samples:
        p = Path(path)
        h.update(f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    return DataBundle(
        "imagefolder", info,
        Split(torch.from_numpy(labels[tr]), dataset=_Indexed(train_aug, tr)),
        Split(torch.from_numpy(labels[va]), dataset=_Indexed(train_eval, va)),
        test, file_augment=augment, fingerprint=h.hexdigest()[:16],
        details={"classes": train_aug.classes, "train": len(tr), "val": len(va), "test": len(test)},
    )
