"""Data sets: splits, determinism, sharding, augmentation, and clear errors when absent."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdray.config import DatasetConfig
from kdray.data import (
    Batches,
    DatasetUnavailable,
    ShardSampler,
    carve_validation,
    crop_flip,
    describe_dataset,
    load_dataset,
)


def make_image_folder(root, counts: dict[str, int], size=(20, 24), seed: int = 0) -> None:
    """Tiny random PNGs under ``root/<split>/<class>/``; ``counts`` maps "split/class" to a number of images.

    Images are not square, so two different resize/crop pipelines give different tensors.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for where, n in counts.items():
        (root / where).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / where / f"{i}.png")


def test_mnist1d_is_the_published_split_with_validation_carved_from_train():
    from mnist1d.data import get_dataset_args, make_dataset

    data = load_dataset(DatasetConfig(name="mnist1d"))
    assert (len(data.train), len(data.val), len(data.test)) == (3600, 400, 1000)
    ref = make_dataset(get_dataset_args())
    np.testing.assert_allclose(data.test.x.numpy(), ref["x_test"].astype(np.float32))
    train_rows = {r.tobytes() for r in data.train.x.numpy()}
    assert not any(r.tobytes() in train_rows for r in data.val.x.numpy()), "validation overlaps train"
    again = load_dataset(DatasetConfig(name="mnist1d"))
    assert torch.equal(again.val.x, data.val.x) and again.fingerprint == data.fingerprint
    other = load_dataset(DatasetConfig(name="mnist1d", split_seed=1))
    assert other.fingerprint != data.fingerprint
    assert data.deterministic


@pytest.mark.parametrize("name,sizes,shape", [("digits", (1293, 144, 360), (64,)), ("test_blobs", (432, 48, 120), (16,
                                                                                                                   ))])
def test_offline_sets(name, sizes, shape):
    data = load_dataset(DatasetConfig(name=name))
    assert (len(data.train), len(data.val), len(data.test)) == sizes
    assert tuple(data.train.x.shape[1:]) == shape
    assert set(data.train.y.unique().tolist()) == set(range(describe_dataset(DatasetConfig(name=name)).num_classes))


def test_torchvision_sets_fail_clearly_when_absent_and_download_is_off(tmp_path):
    with pytest.raises(DatasetUnavailable, match=r"cifar10 is not in .*dataset.download: true"):
        load_dataset(DatasetConfig(name="cifar10", data_dir=str(tmp_path)))
    with pytest.raises(DatasetUnavailable, match="download"):
        describe_dataset(DatasetConfig(name="fashion_mnist", data_dir=str(tmp_path)))


def test_imagefolder_reads_a_users_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 3)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3),
                                             dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    cfg = DatasetConfig(name="imagefolder", options={"root": str(tmp_path), "image_size": 16})
    data = load_dataset(cfg)
    assert describe_dataset(cfg).num_classes == 2
    assert len(data.train) + len(data.val) == 24 and len(data.test) == 6
    assert not data.deterministic  # random crops and flips
    batch = next(iter(Batches(data.val, 4, train=False)))
    assert batch[1].shape == (len(data.val), 3, 16, 16) and 0.0 <= batch[1].min() and batch[1].max() <= 1.0


def test_val_shards_cover_every_sample_once_and_train_shards_are_equal():
    from kdray.data.loaders import train_sampler

    n, world = 103, 3
    val = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(sum(val, [])) == list(range(n))  # no padding: summed metrics count each sample once
    train = [train_sampler(n, r, world, seed=1) for r in range(world)]
    for s in train:
        s.set_epoch(2)
    shards = [list(s) for s in train]
    assert {len(s) for s in train} == {len(x) for x in shards} == {35}  # equal step counts for DDP
    assert set(sum(shards, [])) == set(range(n))
    assert shards == [list(s) for s in train_sampler_set(n, world, seed=1, epoch=2)], "same seed, same order"
    assert shards != [list(s) for s in train_sampler_set(n, world, seed=1, epoch=3)], "set_epoch reshuffles"
    assert shards != [list(s) for s in train_sampler_set(n, world, seed=2, epoch=2)], "the seed matters"


def train_sampler_set(n: int, world: int, seed: int, epoch: int):
    from kdray.data.loaders import train_sampler

    samplers = [train_sampler(n, r, world, seed=seed) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers


def test_file_backed_training_never_yields_a_one_sample_batch(tmp_path):
    make_image_folder(tmp_path, {"train/cat": 14, "train/dog": 10, "test/cat": 1, "test/dog": 1})
    data = load_dataset(DatasetConfig(name="imagefolder", options={"root": str(tmp_path), "image_size": 8}))
    n = len(data.train)
    assert not data.train.in_memory and n == 22  # 24 minus 2 for validation
    batches = Batches(data.train, 7, train=True, seed=0)  # 22 = 3 * 7 + 1
    batches.set_epoch(1)
    sizes, seen = [], []
    for idx, x, y in batches:
        sizes.append(len(idx))
        seen += idx.tolist()
        assert x.shape[0] == y.shape[0] == len(idx)
    assert 1 not in sizes and sum(sizes) == n and len(sizes) == len(batches) == 3
    assert sorted(seen) == list(range(n))


def test_imagefolder_without_augmentation_trains_on_the_eval_preprocessing(tmp_path):
    # test/ holds copies of train/, so the test split is the eval transform of the very same files.
    make_image_folder(tmp_path, {"train/cat": 5, "train/dog": 5})
    make_image_folder(tmp_path, {"test/cat": 5, "test/dog": 5})
    for cls in ("cat", "dog"):
        for f in (tmp_path / "train" / cls).iterdir():
            (tmp_path / "test" / cls / f.name).write_bytes(f.read_bytes())
    cfg = DatasetConfig(name="imagefolder", augment=False, options={"root": str(tmp_path), "image_size": 16})
    data = load_dataset(cfg)
    assert data.deterministic
    for i in range(len(data.train)):
        x_train, y = data.train.dataset[i]
        x_eval, y_eval = data.test.dataset[int(data.train.dataset.indices[i])]
        assert y == y_eval and x_train.shape == (3, 16, 16)
        assert torch.equal(x_train, x_eval), f"train sample {i} is preprocessed differently from eval"
    augmented = load_dataset(DatasetConfig(name="imagefolder", options={"root": str(tmp_path), "image_size": 16}))
    assert augmented.fingerprint != data.fingerprint


def test_torchvision_loaders_wait_for_the_data_set_lock(tmp_path):
    import time
    from concurrent.futures import ThreadPoolExecutor

    import torchvision.datasets  # noqa: F401  (imported here, so the thread below only waits for the lock)
    from filelock import FileLock

    (tmp_path / "cifar-10-batches-py").mkdir()  # present but empty: loading fails once the lock is free
    cfg = DatasetConfig(name="cifar10", data_dir=str(tmp_path))
    with ThreadPoolExecutor(1) as pool:
        with FileLock(tmp_path / ".cifar10.lock"):
            loading = pool.submit(load_dataset, cfg)
            time.sleep(1.0)
            assert not loading.done(), "the loader did not wait for another process's download"
        with pytest.raises(DatasetUnavailable, match="could not load cifar10"):
            loading.result(timeout=60)


def test_batches_yield_sample_indices_not_batch_positions():
    data = load_dataset(DatasetConfig(name="test_blobs"))
    b = Batches(data.train, 50, train=True, seed=3)
    b.set_epoch(1)
    for idx, x, y in b:
        assert torch.equal(x, data.train.x[idx]) and torch.equal(y, data.train.y[idx])


def test_crop_flip_keeps_shape_and_content():
    from kdray.data import ViewKey

    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    out = crop_flip(x, torch.arange(2), ViewKey(0, 1), pad=0, flip=True)
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))
    out = crop_flip(x, torch.arange(2), ViewKey(1, 1), pad=2, flip=False)
    assert out.shape == x.shape


def test_carve_validation_is_fixed_by_its_seed():
    labels = np.arange(100) % 4
    a = carve_validation(labels, 0.2, 7)
    b = carve_validation(labels, 0.2, 7)
    c = carve_validation(labels, 0.2, 8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])
    assert len(a[1]) == 20 and sorted(np.concatenate(a).tolist()) == list(range(100))


@pytest.mark.parametrize("seed", range(5))
def test_carve_validation_is_stratified(seed):
    labels = np.repeat([0, 1, 2, 3], [140, 40, 14, 6])
    np.random.default_rng(99).shuffle(labels)
    tr, va = carve_validation(labels, 0.25, seed)
    assert len(va) == 50 and sorted(np.concatenate([tr, va]).tolist()) == list(range(200))
    val_counts = np.bincount(labels[va], minlength=4)
    train_counts = np.bincount(labels[tr], minlength=4)
    # val / train = 50 / 150: each class is in val one third as often as in train, to within one sample.
    assert np.all(np.abs(val_counts - train_counts / 3) <= 1), (val_counts, train_counts)


def test_carve_validation_falls_back_when_a_class_has_one_sample():
    labels = np.array([0] * 10 + [1] * 9 + [2])
    tr, va = carve_validation(labels, 0.2, 0)
    assert len(va) == 4 and sorted(np.concatenate([tr, va]).tolist()) == list(range(20))
