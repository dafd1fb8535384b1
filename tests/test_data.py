"""Data sets: splits, determinism, sharding, augmentation, and clear errors when absent."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdray.config import DatasetConfig
from kdray.data import Batches, DatasetUnavailable, ShardSampler, carve_validation, crop_flip, describe_dataset, load_dataset


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


@pytest.mark.parametrize("name,sizes,shape", [("digits", (1293, 144, 360), (64,)), ("test_blobs", (432, 48, 120), (16,))])
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
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    cfg = DatasetConfig(name="imagefolder", options={"root": str(tmp_path), "image_size": 16})
    data = load_dataset(cfg)
    assert describe_dataset(cfg).num_classes == 2
    assert len(data.train) + len(data.val) == 24 and len(data.test) == 6
    assert not data.deterministic  # random crops and flips
    batch = next(iter(Batches(data.val, 4, train=False)))
    assert batch[1].shape == (len(data.val), 3, 16, 16) and 0.0 <= batch[1].min() and batch[1].max() <= 1.0


def test_val_shards_cover_every_sample_once_and_train_shards_are_equal():
    n, world = 103, 3
    val = [ShardSampler(n, r, world, shuffle=False, pad=False).indices() for r in range(world)]
    assert sorted(torch.cat(val).tolist()) == list(range(n))
    train = [ShardSampler(n, r, world, shuffle=True, seed=1, pad=True) for r in range(world)]
    for s in train:
        s.set_epoch(2)
    sizes = {len(s.indices()) for s in train}
    assert sizes == {35}
    assert set(torch.cat([s.indices() for s in train]).tolist()) == set(range(n))


def test_batches_yield_sample_indices_not_batch_positions():
    data = load_dataset(DatasetConfig(name="test_blobs"))
    b = Batches(data.train, 50, train=True, seed=3)
    b.set_epoch(1)
    for idx, x, y in b:
        assert torch.equal(x, data.train.x[idx]) and torch.equal(y, data.train.y[idx])


def test_crop_flip_keeps_shape_and_content():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = crop_flip(x, g, pad=0, flip=True)
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))
    out = crop_flip(x, torch.Generator().manual_seed(1), pad=2, flip=False)
    assert out.shape == x.shape


def test_carve_validation_is_fixed_by_its_seed():
    a = carve_validation(100, 0.2, 7)
    b = carve_validation(100, 0.2, 7)
    assert np.array_equal(a[1], b[1]) and len(a[1]) == 20 and not set(a[0]) & set(a[1])
