"""Teacher outputs per (epoch, sample) on augmented data: the same views in every trial, a compact codec that is
exact at k = C, and a store + producer on a real Ray that computes only reached epochs and spills to storage."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from kdray.cache import Codec, ViewCacheHandle, ViewCacheOutputs, ViewProducer, ViewStore
from kdray.config import DatasetConfig
from kdray.data import Batches, load_dataset
from kdray.data.views import CROP_COL, CROP_ROW, FLIP, ViewKey, crop_flip, strong_view
from kdray.knowledge import DistillObjective, ModelLayout, TapOutputs


@pytest.fixture(scope="module")
def images():
    return load_dataset(DatasetConfig(name="test_images"))


def views_by_index(data, batch_size: int, world: int, seed: int, epoch: int) -> dict[int, torch.Tensor]:
    out = {}
    for rank in range(world):
        b = Batches(data.train, batch_size, train=True, rank=rank, world=world, seed=seed, augment=data.augment)
        b.set_epoch(epoch)
        for idx, x, _ in b:
            for i, xi in zip(idx.tolist(), x):
                out.setdefault(i, xi)
    return out


def test_a_sample_has_one_view_per_epoch_whatever_the_batch_size_and_worker_count(images):
    one = views_by_index(images, 7, 1, seed=3, epoch=2)
    two = views_by_index(images, 64, 2, seed=3, epoch=2)
    assert len(one) == len(images.train) == len(two)
    assert all(torch.equal(one[i], two[i]) for i in one)
    # Another epoch or another seed: other views (a 4-pixel crop + flip has 162 outcomes per sample).
    later = views_by_index(images, 64, 1, seed=3, epoch=3)
    other_seed = views_by_index(images, 64, 1, seed=4, epoch=2)
    assert sum(torch.equal(one[i], later[i]) for i in one) < len(one) * 0.05
    assert sum(torch.equal(one[i], other_seed[i]) for i in one) < len(one) * 0.05


def test_a_file_backed_sets_random_transforms_are_keyed_too(tmp_path):
    """imagefolder's RandomResizedCrop + flip run inside its Dataset (in loader workers): each item carries its
    key, so the view is the same whatever the batching, and the producer's train_views reads the same view."""
    import random

    from PIL import Image

    from kdray.data.loaders import train_views

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / split / cls / f"{i}.png")
    data = load_dataset(DatasetConfig(name="imagefolder", options={"root": str(tmp_path), "image_size": 16}))
    assert not data.train.in_memory and not data.deterministic
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    produced = train_views(data.train, torch.arange(len(data.train)), ViewKey(2, 1), None, torch.device("cpu"))
    # Drawing the views leaves both global generators where they were.
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)
    one = views_by_index(data, 3, 1, seed=2, epoch=1)
    two = views_by_index(data, 5, 2, seed=2, epoch=1)
    assert len(one) == len(data.train) and all(torch.equal(one[i], two[i]) for i in one)
    assert all(torch.equal(produced[i], one[i]) for i in one)
    other = views_by_index(data, 3, 1, seed=2, epoch=2)
    assert sum(torch.equal(one[i], other[i]) for i in one) <= 1


def test_crop_flip_is_the_crop_at_the_keyed_offsets():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1
    idx, key = torch.tensor([11, 5]), ViewKey(7, 1)
    out = crop_flip(x, idx, key, pad=2, flip=True)
    for b in range(2):
        r = int((key.uniform(idx[b:b + 1], CROP_ROW) * 5).floor())
        c = int((key.uniform(idx[b:b + 1], CROP_COL) * 5).floor())
        padded = np.zeros((3, 10, 10), np.float32)
        padded[:, 2:8, 2:8] = x[b].numpy()
        want = padded[:, r:r + 6, c:c + 6]
        if float(key.uniform(idx[b:b + 1], FLIP)) < 0.5:
            want = want[:, :, ::-1]
        np.testing.assert_array_equal(out[b].numpy(), want)


def test_keyed_draws_are_uniform_and_the_streams_independent():
    idx, key = torch.arange(40_000), ViewKey(123, 9)
    rows, cols = key.integers(idx, CROP_ROW, 9), key.integers(idx, CROP_COL, 9)
    counts = np.bincount(rows.numpy(), minlength=9)
    assert counts.min() > 40_000 / 9 * 0.93 and counts.max() < 40_000 / 9 * 1.07
    joint = np.bincount((rows * 9 + cols).numpy(), minlength=81) / 40_000
    assert np.abs(joint - 1 / 81).max() < 0.004  # independent: the joint is the product of two uniforms
    flips = (key.uniform(idx, FLIP) < 0.5).float().mean().item()
    assert abs(flips - 0.5) < 0.01
    # The hash gives the same numbers whatever the batch: the draws of 5 samples alone equal theirs in the lot.
    assert torch.equal(key.bits(idx[100:105], FLIP), key.bits(idx, FLIP)[100:105])


def test_the_strong_view_of_a_sample_does_not_depend_on_its_batch():
    x = torch.rand(6, 3, 16, 16)
    key = ViewKey(1, 4)
    full = strong_view(x, torch.arange(6), key)
    part = strong_view(x[2:4], torch.arange(2, 4), key)
    torch.testing.assert_close(full[2:4], part)
    state = torch.get_rng_state()
    strong_view(x, torch.arange(6), key)
    assert torch.equal(state, torch.get_rng_state())  # torch's own generator is left where it was
    assert not torch.equal(strong_view(x, torch.arange(6), ViewKey(1, 5)), full)


# ---------------------------------------------------------------------------------------------- the codec
def _losses(specs, t_logits, s_logits, y):
    obj = DistillObjective.from_specs(specs, ModelLayout((), ""), ModelLayout((), ""))
    return obj(TapOutputs(s_logits, {}), TapOutputs(t_logits, {}), y)


SPECS = [{"type": "kd", "temperature": 4.0}, {"type": "dkd", "temperature": 4.0},
         {"type": "dist"}, {"type": "kd", "temperature": 2.0, "standardize": True}]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 5e-3)])
def test_with_every_class_kept_losses_from_stored_rows_equal_the_live_teachers(dtype, tol):
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(32, 10, generator=g) * 3, torch.randn(32, 10, generator=g) * 2
    y = torch.randint(0, 10, (32,), generator=g)
    codec = Codec(10, 10, (), dtype)
    rows, kl = codec.encode(TapOutputs(t, {}))
    assert kl == 0.0 and set(rows) == {"logp"} and rows["logp"].dtype == np.dtype(dtype)
    decoded = codec.decode({k: torch.from_numpy(v) for k, v in rows.items()}).logits
    for specs in ([SPECS[0]], [SPECS[1]], [SPECS[2]], [SPECS[3]]):
        live, cached = _losses(specs, t, s, y), _losses(specs, decoded, s, y)
        for k in live:
            torch.testing.assert_close(cached[k], live[k], rtol=tol, atol=tol)


def test_top_k_keeps_the_likeliest_classes_and_spreads_the_remaining_mass_evenly():
    # One sample, 5 classes: p = (0.5, 0.25, 0.15, 0.06, 0.04); k = 2 keeps 0.5 and 0.25; the other three
    # classes get (1 - 0.75) / 3 each.
    p = torch.tensor([[0.15, 0.5, 0.04, 0.25, 0.06]])
    codec = Codec(5, 2, (), "float32")
    rows, kl = codec.encode(TapOutputs(p.log() + 1.7, {}))  # logits up to a constant
    assert sorted(rows["index"][0].tolist()) == [1, 3]
    np.testing.assert_allclose(rows["tail"], [0.25], rtol=1e-6)
    q = codec.decode({k: torch.from_numpy(v) for k, v in rows.items()}).logits.exp()
    torch.testing.assert_close(q, torch.tensor([[0.25 / 3, 0.5, 0.25 / 3, 0.25, 0.25 / 3]]))
    want_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p[0].tolist(), q[0].tolist()))
    assert kl == pytest.approx(want_kl, rel=1e-5)
    assert codec.bytes_per_sample() == 2 * 4 + 2 * 2 + 4  # values, int16 indices, the remaining mass


# ------------------------------------------------------------------------------------ store and producer
@pytest.fixture(scope="module")
def image_teacher(tmp_path_factory):
    from conftest import train_record

    return train_record({"dataset": {"name": "test_images"},
                         "student": {"name": "small_cnn", "options": {"widths": [8, 16]}},
                         "train": {"epochs": 1, "batch_size": 64}}, tmp_path_factory.mktemp("vt"))


def _live_rows(teacher, data, codec, epoch: int, seed: int, idx: torch.Tensor) -> torch.Tensor:
    from kdray.data.loaders import train_views

    teacher.tap(codec.layers)
    with torch.no_grad():
        out = teacher(train_views(data.train, idx, ViewKey(seed, epoch), data.augment, torch.device("cpu")))
    rows, _ = codec.encode(out)
    return codec.decode({k: torch.from_numpy(v) for k, v in rows.items()}).logits


def _trial(store, codec, data, teacher, seed=0):
    handle = ViewCacheHandle(store, codec, len(data.train), "key", seed, block=100)
    return ViewCacheOutputs(handle, teacher, torch.device("cpu"), refresh_every=2)


def _run_epoch(out: ViewCacheOutputs, data, epoch: int, seed=0, batch_size=50):
    out.set_epoch(epoch)
    b = Batches(data.train, batch_size, train=True, seed=seed, augment=data.augment)
    b.set_epoch(epoch)
    got = {}
    for idx, x, _ in b:
        t = out(idx, x)
        for i, row in zip(idx.tolist(), t.logits):
            got[i] = row
    return got


def test_a_trial_ahead_publishes_and_the_next_one_reads_the_same_outputs(ray_cluster, images, image_teacher):
    import ray

    from kdray.models import Teacher

    teacher = Teacher.from_records([image_teacher])
    codec = Codec(3, 3, (), "float32")
    store = ray.remote(ViewStore).remote(len(images.train), codec, 2**30, None, 0, 5, 100)
    first = _trial(store, codec, images, teacher)
    a = _run_epoch(first, images, epoch=2)
    assert first.epoch_stats()["teacher_cached_fraction"] == 0.0  # nothing there: all computed live
    second = _trial(store, codec, images, Teacher.from_records([image_teacher]))
    b = _run_epoch(second, images, epoch=2, batch_size=33)  # another batch size: same rows by sample index
    assert second.epoch_stats()["teacher_cached_fraction"] == 1.0
    idx = torch.arange(len(images.train))
    want = _live_rows(teacher, images, codec, 2, 0, idx)
    for i in range(len(images.train)):
        torch.testing.assert_close(a[i], want[i]), torch.testing.assert_close(b[i], want[i])
    s = ray.get(store.summary.remote())
    assert s["rows_by_trials"] == len(images.train) and s["rows_by_producer"] == 0 and s["epochs_computed"] == [2]
    ray.kill(store)


@pytest.fixture(params=["local", "s3"])
def spill_dir(request, tmp_path, monkeypatch):
    """Where the store spills: a folder, or a bucket of a real S3-compatible server (moto) on 127.0.0.1."""
    if request.param == "local":
        yield str(tmp_path / "spill"), lambda: len(list((tmp_path / "spill").iterdir())), {}
        return
    from cluster_driver import BUCKET, bucket_keys, start_s3

    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in creds.items():  # boto3 in this process; the store actor gets them through its runtime_env
        monkeypatch.setenv(k, v)
    proc, endpoint = start_s3(tmp_path)
    port = endpoint.rsplit(":", 1)[1]
    try:
        yield (f"s3://{BUCKET}/sweep-teacher-outputs?endpoint_override=127.0.0.1:{port}&scheme=http",
               lambda: len([k for k in bucket_keys(endpoint) if k.startswith("sweep-teacher-outputs/")]), creds)
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_producer_computes_only_epochs_trials_reach_and_the_store_spills_beyond_its_budget(
        ray_cluster, images, image_teacher, spill_dir):
    import ray

    from kdray.models import Teacher

    where, spilled_files, env = spill_dir
    codec = Codec(3, 2, (("stage1", (8, 16, 16)),), "float16")  # top-2 of 3 classes, and a feature map
    n = len(images.train)
    block_bytes = 100 * codec.bytes_per_sample()
    # Room for two blocks: everything else goes to the spill folder and comes back when read.
    store = ray.remote(ViewStore).options(runtime_env={"env_vars": env}).remote(
        n, codec, 2 * block_bytes, where, 1, 10, 100)
    producer = ray.remote(ViewProducer).options(num_cpus=0).remote(
        store, [image_teacher], {"name": "test_images"}, 0, codec)
    run = producer.run.remote()
    ray.get(store.reach.remote(1))
    blocks = math.ceil(n / 100)
    deadline = time.time() + 60
    while time.time() < deadline:  # epoch 1 and the prefetched epoch 2
        if ray.get(store.summary.remote())["blocks_finished"] == 2 * blocks:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # had it wanted more, it would have started on epoch 3 by now
    s = ray.get(store.summary.remote())
    assert s["epochs_computed"] == [1, 2] and s["rows_by_producer"] == 2 * n and s["rows_by_trials"] == 0
    assert s["blocks_spilled"] >= 2 * blocks - 2 and spilled_files() >= 2 * blocks - 2
    assert s["peak_bytes"] <= 3 * block_bytes
    trial = _trial(store, codec, images, Teacher.from_records([image_teacher]))
    got = _run_epoch(trial, images, epoch=2)
    assert trial.epoch_stats()["teacher_cached_fraction"] == 1.0
    assert ray.get(store.summary.remote())["blocks_reloaded"] >= blocks - 2
    want = _live_rows(Teacher.from_records([image_teacher]), images, codec, 2, 0, torch.arange(n))
    torch.testing.assert_close(torch.stack([got[i] for i in range(n)]), want)
    assert abs(ray.get(store.summary.remote())["mean_truncation_kl"]) < 1e-4  # one class in the tail: exact
    ray.kill(producer)
    ray.kill(store)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(run, timeout=10)


def test_a_trial_uses_the_sweeps_outputs_only_for_its_own_teacher_seed_and_cached_layers(images, image_teacher):
    import copy

    from kdray.cache import TeacherOutputs, view_cache_key
    from kdray.models import Teacher

    codec = Codec(3, 3, (("stage1", (8, 16, 16)),), "float16")
    handle = ViewCacheHandle(None, codec, len(images.train), view_cache_key([image_teacher], images, 0), 0)
    teacher, dev = Teacher.from_records([image_teacher]), torch.device("cpu")
    assert TeacherOutputs.create(teacher, handle, [image_teacher], images, ["stage1"], dev).source == "view_cache"
    other = copy.deepcopy(image_teacher)
    name = next(iter(other["state_dict"]))
    other["state_dict"][name] = other["state_dict"][name] + 0.01
    for records, layers, seed, why in (([other], ["stage1"], 0, "another teacher"),
                                       ([image_teacher], ["stage1"], 1, "seed"),
                                       ([image_teacher], ["stage2"], 0, "not cached")):
        out = TeacherOutputs.create(teacher, handle, records, images, layers, dev, seed=seed)
        assert out.source == "live" and why in out.reason


def test_feature_maps_are_cached_only_when_every_epoch_of_them_fits_the_budget(images, image_teacher):
    from kdray.cache import plan_codec
    from kdray.config import CacheConfig

    n = len(images.train)
    logits_only = n * 3 * 2  # 3 classes in float16
    features = n * (8 * 16 * 16) * 2  # stage1 of small_cnn(8, 16) on 32x32 images, in float16
    fits = CacheConfig(max_bytes=(logits_only + features) * 4)
    codec, note = plan_codec([image_teacher], images, ["stage1"], fits, max_epochs=4)
    assert codec.layers == ["stage1"] and codec.exact and codec.bytes_per_sample() * n == logits_only + features
    codec, note = plan_codec([image_teacher], images, ["stage1"], fits, max_epochs=5)
    assert codec.layers == [] and "feature maps not cached" in note
    codec, _ = plan_codec([image_teacher], images, [], CacheConfig(top_k=2), max_epochs=5)
    assert not codec.exact and codec.bytes_per_sample() == 2 * 2 + 2 * 2 + 4


def test_a_run_trains_the_same_from_the_sweeps_outputs_as_from_the_live_teacher(ray_cluster, images, image_teacher):
    """The equality the cache promises, at the level of a whole run: with every class kept (float32 here, so
    only the order of float operations differs), a KD + FitNets run on augmented images reads the teacher's
    rows (logits and a feature map) from the store and ends where the run with the live teacher ends."""
    import ray

    from kdray.cache import view_cache_key
    from kdray.config import RunConfig
    from kdray.train.loop import train_run
    from kdray.train.session import Session

    cfg = RunConfig.model_validate({
        "dataset": {"name": "test_images"}, "teacher": {"checkpoint": "unused.pt"},
        "student": {"name": "small_cnn", "options": {"widths": [8, 16], "dropout": 0.2}},
        "knowledge": [{"type": "kd", "temperature": 4.0},
                      {"type": "fitnet", "teacher_layer": "stage1", "student_layer": "stage1"}],
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.01}, "seed": 5})

    def run(cache) -> list[dict]:
        session = Session()
        train_run({"run": cfg.model_dump(mode="json"), "teacher_records": [image_teacher], "teacher_cache": cache},
                  session)
        return session.reports

    codec = Codec(3, 3, (("stage1", (8, 16, 16)),), "float32")
    store = ray.remote(ViewStore).remote(len(images.train), codec, 2**30, None, 0, 2)
    handle = ViewCacheHandle(store, codec, len(images.train), view_cache_key([image_teacher], images, 5), 5)
    first, second, live = run(handle), run(handle), run(None)
    assert [r["teacher_source"] for r in first + second + live] == ["view_cache"] * 4 + ["live"] * 2
    assert [r["teacher_cached_fraction"] for r in first + second] == [0.0, 0.0, 1.0, 1.0]
    for cached in (first, second):
        for a, b in zip(cached, live):
            for k in ("loss_kd", "loss_fitnet", "loss_ce", "val_loss"):
                assert a[k] == pytest.approx(b[k], rel=1e-4), k
            assert a["val_accuracy"] == b["val_accuracy"]
    ray.kill(store)


def test_a_store_without_a_spill_folder_drops_old_blocks_and_stays_within_its_budget(ray_cluster):
    """No spill folder: blocks beyond the budget are dropped (a trial needing them again computes them), and what
    the store counts is what it holds."""
    import ray

    codec = Codec(3, 3, (), "float32")
    block_bytes = 4 * codec.bytes_per_sample()
    store = ray.remote(ViewStore).remote(16, codec, 2 * block_bytes, None, 0, 1, 4)
    rows = {"logp": np.zeros((4, 3), np.float32)}
    for b in range(4):
        ray.get(store.publish.remote(1, np.arange(4 * b, 4 * b + 4), rows))
    s = ray.get(store.summary.remote())
    assert s["blocks_dropped"] == 2 and s["blocks_finished"] == 2 and s["bytes_in_memory"] == 2 * block_bytes
    assert sorted(ray.get(store.ready.remote(1, []))) == [2, 3]  # the two most recent blocks are kept
    assert ray.get(store.claim.remote(1, np.arange(8))).all()  # dropped rows: free to compute again
    ray.kill(store)


def test_the_producer_refuses_data_or_a_teacher_that_do_not_match_the_sweeps_key(ray_cluster, image_teacher):
    """A node whose copy of the data (or teacher) differs from the driver's would publish wrong rows under the
    sweep's key: the producer checks its own key first and publishes nothing."""
    import ray

    from kdray.cache import ViewProducer

    codec = Codec(3, 3, (), "float32")
    store = ray.remote(ViewStore).remote(10, codec, 2**20, None, 0, 1)
    producer = ray.remote(ViewProducer).remote(store, [image_teacher], {"name": "test_images"}, 0, codec,
                                               key="the-drivers-key")
    with pytest.raises(Exception, match="not the sweep's the-drivers-key"):
        ray.get(producer.run.remote(), timeout=120)
    assert ray.get(store.summary.remote())["rows_by_producer"] == 0
    ray.kill(store)


def test_the_producer_goes_to_a_node_with_cpus_never_to_a_0_cpu_head():
    from kdray.cache import producer_node

    head = {"NodeID": "head", "Alive": True, "Resources": {"kdray_driver": 64.0}}
    cpu = {"NodeID": "cpu", "Alive": True, "Resources": {"CPU": 8.0}}
    gpu = {"NodeID": "gpu", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}
    assert producer_node([head], 0.0) is None  # waits for a worker to join
    assert producer_node([head, {**cpu, "Alive": False}], 0.0) is None
    assert producer_node([head, cpu, gpu], 0.0) == "cpu"
    assert producer_node([head, cpu, gpu], 1.0) == "gpu"


@pytest.mark.slow
def test_a_sweep_survives_losing_its_teacher_output_store_and_the_trials_after_run_live(ray_cluster, tmp_path):
    """The store owns every block; when it dies (its node lost, here its process killed mid-sweep), the trial
    running then and every later one (including Tune's retries, whose handle is the dead one) run the teacher
    live, say so, and the sweep completes."""
    import os
    import signal
    import threading
    import time

    from ray.util.state import list_actors
    from sweep_helpers import request

    from kdray.sweep.runner import run_sweep
    from kdray.tracking.store import TAG_STATUS, sweep_children

    space = {
        "name": "lost-store", "seed": 0, "max_concurrent": 1,
        "base": {"dataset": {"name": "test_images"},
                 "teacher": {"train": {"model": {"name": "small_cnn", "options": {"widths": [8, 16]}},
                                       "train": {"epochs": 1, "batch_size": 64}}},
                 "student": {"name": "small_cnn", "options": {"widths": [8, 16], "dropout": 0.1}},
                 "train": {"epochs": 4, "batch_size": 16, "lr": 0.003},
                 "resources": {"num_workers": 1, "cpus_per_worker": 1}},
        # In order: none, then kd at two temperatures (one trial at a time).
        "scheduler": {"type": "fifo"}, "searcher": {"type": "grid", "grid_points": 2},
        "space": {"knowledge": {"kd": {"kd.temperature": {"type": "float", "low": 2.0, "high": 8.0}}}},
    }
    path = tmp_path / "lost.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    box: dict = {}
    sweep = threading.Thread(target=lambda: box.update(result=run_sweep(request(tmp_path, path, "lost-store"))))
    sweep.start()
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    killed = None
    deadline = time.time() + 240
    while sweep.is_alive() and killed is None and time.time() < deadline:
        time.sleep(0.5)
        try:
            parent = c.search_runs([e.experiment_id for e in c.search_experiments()],
                                   filter_string="tags.`kdray.kind` = 'sweep'")
            runs = sweep_children(c, parent[0], kind="trial") if parent else []
        except Exception:  # noqa: BLE001 - the store is being created or written
            continue
        if any(c.get_metric_history(r.info.run_id, "val_accuracy") for r in runs
               if r.data.tags["kdray.knowledge"] == "kd"):  # the first kd trial is under way
            stores = list_actors(filters=[("class_name", "=", "ViewStore"), ("state", "=", "ALIVE")])
            if stores:
                os.kill(stores[0].pid, signal.SIGKILL)
                killed = time.time()
    sweep.join(timeout=300)
    assert killed is not None, "the store was never killed"
    result = box["result"]
    assert not result.interrupted and result.champion is not None
    runs = sorted(sweep_children(c, c.get_run(result.parent_run_id), kind="trial"),
                  key=lambda r: int(r.data.tags["kdray.trial_number"]))
    assert [(r.data.tags["kdray.knowledge"], r.data.tags[TAG_STATUS]) for r in runs] == [
        ("none", "completed"), ("kd", "completed"), ("kd", "completed")]
    assert runs[1].data.tags["kdray.teacher_source"] in ("view_cache", "live")  # running when the store died
    for later in runs[2:]:  # started after the store died
        assert later.data.tags["kdray.teacher_source"] == "live", later.data.tags
        assert "teacher-output store is gone" in later.data.tags["kdray.teacher_reason"]
