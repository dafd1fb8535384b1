"""One command that proves kdray's GPU path: ``make gpu-proof`` (or ``python benchmarks/gpu_proof.py``).

Six parts, each in a process of its own with a time limit, so one failure still leaves the others' figures in
``benchmarks/results/gpu_proof.json``; the script prints a Markdown table for ``benchmarks/README.md`` and exits
non-zero naming the parts that failed. Nothing is installed or downloaded: data are made locally.

1. ``trial``: one KD trial (resnet32x4 -> resnet8x4, batch 256, bf16 autocast, channels-last, CIFAR-shaped images
   held on the GPU) through kdray's ``train_run`` against a textbook PyTorch loop doing the same work; and again with
   the teacher's outputs from the shared cache. Samples/s, target >= 0.9x.
2. ``saturation``: the same trial at batch 64 / 256 / 1024 (samples/s and the GPU's utilisation from nvidia-smi);
   and two one-worker trials sharing the GPU (``gpus_per_worker: 0.5``) against the same two one after another.
3. ``sweep``: 4 trials of 3 epochs on augmented CIFAR-shaped images with the per-(epoch, sample) cache and its GPU
   producer: completes, every teacher row computed once, champion registered; wall time against the same trials
   back to back in one process.
4. ``precision``: every registered knowledge type under bf16 and fp16 autocast on the device within 2 % of fp32.
5. ``determinism``: ``train.deterministic: true`` twice gives bit-identical weights.
6. ``token_loss``: the chunked language-model loss against the naive one at H = 4096, V = 128 256, B·T in {1024,
   8192}, bf16: peak ``torch.cuda.max_memory_allocated`` and ms per forward + backward.

``--device cpu --quick`` runs the same code paths on the CPU with small sizes in under 2 minutes (a test runs it so
in the normal suite).

    python benchmarks/gpu_proof.py [--device cuda|cpu] [--quick] [--parts trial,sweep,...] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARTS = ("trial", "saturation", "sweep", "precision", "determinism", "token_loss")
LIMIT_S = {"trial": 100, "saturation": 110, "sweep": 150, "precision": 40, "determinism": 60, "token_loss": 60}


# -- settings: a GPU's, or the CPU's quick ones --------------------------------------------------------------------
def setting(device: str, quick: bool) -> dict:
    if device == "cuda" and not quick:
        return {"device": "cuda", "samples": 12000, "classes": 100, "teacher": "resnet32x4", "student": "resnet8x4",
                "batch": 256, "batches": (64, 256, 1024), "epochs": 2, "precision": "bf16", "gpus": 1.0,
                "sweep_samples": 6000, "token": {"hidden": 4096, "vocab": 128256, "tokens": (1024, 8192)}}
    return {"device": device, "samples": 600, "classes": 10, "teacher": "resnet8", "student": "small_cnn",
            "batch": 64, "batches": (32, 64, 128), "epochs": 2, "precision": "bf16" if device == "cuda" else "fp32",
            "gpus": 1.0 if device == "cuda" else 0.0, "sweep_samples": 400,
            "token": {"hidden": 64, "vocab": 4096, "tokens": (128, 512)}}


def data_cfg(s: dict, samples: int | None = None, augment: bool | None = False) -> dict:
    return {"name": "test_images", "samples": samples or s["samples"], "classes": s["classes"], "augment": augment}


def teacher_record(s: dict) -> dict:
    import torch

    from kdray.config import DatasetConfig
    from kdray.data import describe_dataset
    from kdray.models import build_model, model_record

    d = DatasetConfig.model_validate(data_cfg(s))
    info = describe_dataset(d)
    torch.manual_seed(0)
    t = build_model(s["teacher"], info.num_classes, info.preprocess())
    return model_record(t, model_name=s["teacher"], model_options={}, num_classes=info.num_classes,
                        dataset=d.model_dump(mode="json"), raw_input={"shape": [3, 32, 32], "dtype": "uint8"})


def run_cfg(s: dict, batch: int, **over) -> dict:
    from kdray.config import RunConfig

    cfg = {"dataset": data_cfg(s), "teacher": {"checkpoint": "unused.pt"}, "student": {"name": s["student"]},
           "knowledge": [{"type": "kd", "temperature": 4.0}],
           "train": {"epochs": s["epochs"], "batch_size": batch, "optimizer": "sgd", "lr": 0.05, "scheduler": "none",
                     "precision": s["precision"]},
           "resources": {"gpus_per_worker": s["gpus"]}}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return RunConfig.model_validate(cfg).model_dump(mode="json")


def kdray_rate(s: dict, record: dict, batch: int, cache=None) -> float:
    """Training samples/s of kdray's trial (the last epoch; the first warms up)."""
    from kdray.train.loop import train_run
    from kdray.train.session import Session

    session = Session(checkpoint_root=tempfile.mkdtemp())
    train_run({"run": run_cfg(s, batch), "teacher_records": [record], "teacher_cache": cache}, session)
    return session.reports[-1]["samples_per_s"]


def plain_rate(s: dict, record: dict, batch: int) -> float:
    """The textbook loop on the same data, models, autocast and memory format: samples/s of its last epoch."""
    import torch
    import torch.nn.functional as F

    from kdray.config import DatasetConfig
    from kdray.data import load_dataset
    from kdray.models import build_model, model_from_record

    dev = torch.device(s["device"])
    torch.set_num_threads(1)  # as kdray's trial (cpus_per_worker 1)
    data = load_dataset(DatasetConfig.model_validate(data_cfg(s)))
    x, y = data.train.x.to(dev), data.train.y.to(dev)
    teacher = model_from_record(record).to(dev).eval().requires_grad_(False)
    torch.manual_seed(0)
    student = build_model(s["student"], data.info.num_classes, data.info.preprocess()).to(dev)
    cl = dev.type == "cuda"
    if cl:
        teacher, student = teacher.to(memory_format=torch.channels_last), student.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, fused=True)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if s["precision"] == "bf16" else torch.autocast(
        dev.type, enabled=False)
    rate = 0.0
    for epoch in range(s["epochs"]):
        perm = torch.randperm(len(y), device=dev, generator=torch.Generator(device=dev).manual_seed(epoch))
        sync(dev)
        t0 = time.perf_counter()
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            xb = x[idx].float().div_(255)
            if cl:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = y[idx]
            with amp:
                with torch.no_grad():
                    zt = teacher(xb)
                zs = student(xb)
            zs, zt = zs.float(), zt.float()
            loss = F.cross_entropy(zs, yb) + 16 * F.kl_div(F.log_softmax(zs / 4, 1), F.log_softmax(zt / 4, 1),
                                                          reduction="batchmean", log_target=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(dev)
        rate = len(y) / (time.perf_counter() - t0)
    return rate


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


# -- the parts -----------------------------------------------------------------------------------------------------
def part_trial(s: dict) -> dict:
    from kdray.cache import build_cache
    from kdray.config import DatasetConfig
    from kdray.data import load_dataset

    record = teacher_record(s)
    plain = plain_rate(s, record, s["batch"])
    ours = kdray_rate(s, record, s["batch"])
    cache = build_cache([record], load_dataset(DatasetConfig.model_validate(data_cfg(s))), [], 2**31, "float32",
                        s["device"])
    cached = kdray_rate(s, record, s["batch"], cache)
    out = {"plain_samples_per_s": plain, "kdray_samples_per_s": ours, "ratio": ours / plain,
           "kdray_cached_samples_per_s": cached, "ratio_cached": cached / plain}
    out["ok"] = out["ratio"] >= 0.9 or s["device"] == "cpu"  # the target is the GPU's; on CPU the path is what counts
    return out


class Utilisation:
    """nvidia-smi sampled every 200 ms while inside (None without a GPU or nvidia-smi)."""

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except (FileNotFoundError, OSError):
            self.proc = None
        return self

    def __exit__(self, *exc) -> None:
        self.values = []
        if self.proc is not None:
            self.proc.terminate()
            out = self.proc.communicate(timeout=5)[0]
            self.values = [float(v) for v in out.split() if v.replace(".", "").isdigit()]

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None


def two_trials(s: dict, shared: bool) -> float:
    """Wall seconds of two one-worker trials of a FIFO sweep: at once sharing the device, or one after the other."""
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sweep import sweep_once

    gpus = (0.5 if shared else 1.0) if s["device"] == "cuda" else 0.0
    base = run_cfg(s, s["batch"], resources={"gpus_per_worker": gpus, "num_workers": 1, "cpus_per_worker": 1})
    base.pop("knowledge")
    base["teacher"] = {"train": {"model": {"name": s["teacher"]}, "train": {"epochs": 1, "batch_size": s["batch"]}}}
    space = {"name": "gpu-share", "num_samples": 2, "seed": 0, "max_concurrent": 2 if shared else 1,
             "base": base, "scheduler": {"type": "fifo"}, "searcher": {"type": "grid"},
             "space": {"knowledge": {"kd": {"kd.temperature": {"type": "categorical", "choices": [2.0, 4.0]}}}}}
    yaml.safe_dump(space)
    result, wall, *_ = sweep_once(space, tempfile.mkdtemp(), f"share-{int(shared)}")
    assert all(o.status == "completed" for o in result.outcomes), [o.status for o in result.outcomes]
    return result.timings["trials_s"]


def part_saturation(s: dict) -> dict:
    record = teacher_record(s)
    out: dict = {"batches": {}}
    for b in s["batches"]:
        with Utilisation() as u:
            rate = kdray_rate(s, record, b)
        out["batches"][str(b)] = {"samples_per_s": rate, "gpu_utilisation_pct": u.median}
    alone, shared = two_trials(s, False), two_trials(s, True)
    out.update(two_trials_one_after_another_s=alone, two_trials_sharing_s=shared, sharing_speedup=alone / shared)
    out["ok"] = True
    return out


def part_sweep(s: dict) -> dict:
    """4 trials on augmented images, the per-(epoch, sample) cache with its producer on the device."""
    import mlflow

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sweep import sweep_once

    from kdray.config import RunConfig
    from kdray.train.loop import train_run
    from kdray.train.session import Session

    gpu = s["device"] == "cuda"
    base = run_cfg(s, s["batch"], dataset=data_cfg(s, s["sweep_samples"], augment=None),
                   train={"epochs": 3}, resources={"gpus_per_worker": 0.25 if gpu else 0.0, "cpus_per_worker": 1})
    base.pop("knowledge")
    base["teacher"] = {"train": {"model": {"name": s["teacher"]}, "train": {"epochs": 1, "batch_size": s["batch"]}}}
    base["cache"] = {"producer_gpus": 0.5 if gpu else 0.0}
    space = {"name": "gpu-sweep", "num_samples": 4, "seed": 0, "base": base, "scheduler": {"type": "fifo"},
             "searcher": {"type": "grid"},
             "space": {"knowledge": {"none": {}, "kd": {"kd.temperature": {"type": "categorical",
                                                                             "choices": [2.0, 4.0, 8.0]}}}}}
    storage = tempfile.mkdtemp()
    result, wall, tmp, sp, shared = sweep_once(space, storage, "gpu-sweep")
    run = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(result.parent_run_id).data
    m = run.metrics
    computed = m.get("teacher_cache.rows_by_producer", 0) + m.get("teacher_cache.rows_by_trials", 0)
    import torch

    from kdray.models import load_record

    record = load_record(shared)
    t0 = time.perf_counter()
    for o in result.outcomes:  # the same trials back to back in this process, teacher live
        cfg = RunConfig.model_validate(sp.resolved_dict(o.params))
        train_run({"run": cfg.model_dump(mode="json"), "teacher_records": [record] if cfg.knowledge else []},
                  Session(checkpoint_root=tempfile.mkdtemp()))
    back_to_back = time.perf_counter() - t0
    n_train = len(__import__("kdray.data", fromlist=["load_dataset"]).load_dataset(
        RunConfig.model_validate(sp.resolved_dict(result.outcomes[0].params)).dataset).train)
    out = {"trials": len(result.outcomes), "statuses": sorted({o.status for o in result.outcomes}),
           "sweep_wall_s": wall, "sweep_trials_s": result.timings["trials_s"], "back_to_back_s": back_to_back,
           "teacher_rows_computed": computed, "teacher_rows_needed": 3 * n_train,
           "champion": result.champion.model_uri if result.champion else None, "device_cuda": torch.cuda.is_available()}
    out["ok"] = (out["statuses"] == ["completed"] and computed == out["teacher_rows_needed"]
                 and out["champion"] is not None)
    return out


def part_precision(s: dict) -> dict:
    """Every knowledge type's terms under bf16 and fp16 autocast on the device against fp32 (the CPU test's check)."""
    import copy

    import torch

    from kdray.knowledge import KNOWLEDGE, DistillObjective, ModelLayout, TapOutputs

    dev = torch.device(s["device"])
    g = torch.Generator().manual_seed(1)
    b = 32
    t_feat = 3 * torch.relu(torch.randn(b, 32, 8, 8, generator=g))
    s_feat = torch.relu(t_feat + 1.5 * torch.randn(b, 32, 8, 8, generator=g))
    t_logits = 3 * torch.randn(b, 10, generator=g)
    s_logits = t_logits + torch.randn(b, 10, generator=g)
    t_att = (2 * torch.randn(b, 4, 16, 16, generator=g)).softmax(-1)
    s_att = (t_att.log() + torch.randn(b, 4, 16, 16, generator=g)).softmax(-1)
    t_val, s_val = 3 * torch.randn(b, 16, 32, generator=g), None
    s_val = t_val + torch.randn(b, 16, 32, generator=g)
    y = torch.randint(0, 10, (b,), generator=g)
    mv = lambda d: {k: v.to(dev) for k, v in d.items()}  # noqa: E731
    s_out = TapOutputs(s_logits.to(dev), mv({"f": s_feat, "a": s_att, "v": s_val}))
    t_out = TapOutputs(t_logits.to(dev), mv({"f": t_feat, "a": t_att, "v": t_val}))
    layout = ModelLayout(("f",), "f", ("a",), ("v",))
    worst: dict[str, float] = {}
    failed = []
    for kind in sorted(KNOWLEDGE.names()):
        torch.manual_seed(0)
        obj = DistillObjective.from_specs([{"type": kind}], layout, layout).to(dev)
        obj.bind_data(b)
        obj.bind(t_out.features, s_out.features)
        obj.to(dev)
        obj.set_epoch(100)
        idx = torch.arange(b, device=dev)
        twin = copy.deepcopy(obj)
        torch.manual_seed(2)
        ref = obj(s_out, t_out, y.to(dev), index=idx)
        for dtype in ((torch.bfloat16, torch.float16) if dev.type == "cuda" else (torch.bfloat16,)):
            low_in = TapOutputs(s_out.logits.to(dtype), {k: v.to(dtype) for k, v in s_out.features.items()})
            other = copy.deepcopy(twin)
            torch.manual_seed(2)
            with torch.autocast(dev.type, dtype=dtype):
                low = other(low_in, t_out, y.to(dev), index=idx)
            for name, v in ref.items():
                a, r = float(low[name]), float(v)
                err = abs(a - r) / max(abs(r), 1e-12)
                worst[f"{kind}.{name}.{str(dtype).removeprefix('torch.')}"] = err
                if low[name].dtype != torch.float32 or not math.isfinite(a) or err > 0.02:
                    failed.append(f"{kind}/{name}/{dtype}: {a} vs {r}")
    return {"types": len(KNOWLEDGE.names()), "max_relative_error": max(worst.values()), "failed": failed,
            "ok": not failed}


def part_determinism(s: dict) -> dict:
    import torch

    from kdray.train.loop import train_run
    from kdray.train.session import Session

    record = teacher_record(s)
    weights = []
    for _ in range(2):
        session = Session(checkpoint_root=tempfile.mkdtemp())
        cfg = run_cfg(s, s["batch"], dataset=data_cfg(s, augment=None), train={"deterministic": True, "epochs": 2})
        train_run({"run": cfg, "teacher_records": [record]}, session)
        weights.append(torch.load(session.last_checkpoint / "student.pt", weights_only=True)["state_dict"])
    same = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    return {"bit_identical": same, "tensors": len(weights[0]), "ok": same}


def part_token_loss(s: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from kdray.knowledge.token import TKD, LMHead, TokenStates, token_sums

    dev = torch.device(s["device"])
    p = s["token"]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = {}
    for n in p["tokens"]:
        g = torch.Generator(device=dev).manual_seed(0)
        w = (0.02 * torch.randn(p["vocab"], p["hidden"], device=dev, generator=g, dtype=dtype)).requires_grad_()
        wt = 0.02 * torch.randn(p["vocab"], p["hidden"], device=dev, generator=g, dtype=dtype)
        h = torch.randn(1, n, p["hidden"], device=dev, generator=g, dtype=dtype).requires_grad_()
        ht = torch.randn(1, n, p["hidden"], device=dev, generator=g, dtype=dtype)
        y = torch.randint(0, p["vocab"], (1, n), device=dev, generator=g)
        term = TKD("fkl", 1.0)
        out = {}
        for mode in ("naive", "chunked"):
            w.grad = h.grad = None
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            if mode == "naive":
                zs = (h[0] @ w.T).float()
                with torch.no_grad():
                    zt = (ht[0] @ wt.T).float()
                loss = F.cross_entropy(zs, y[0], reduction="sum") + term.per_token(zs, zt).sum()
            else:
                sums, _, _ = token_sums(TokenStates(h, LMHead(w)), TokenStates(ht, LMHead(wt)), y, [term])
                loss = sums.sum()
            loss.backward()
            sync(dev)
            ms = 1000 * (time.perf_counter() - t0)
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if dev.type == "cuda" else None
            out[mode] = {"ms": ms, "peak_mib": peak, "loss": float(loss)}
            del loss
        same = abs(out["naive"]["loss"] - out["chunked"]["loss"]) <= 1e-2 * abs(out["naive"]["loss"])
        rows[str(n)] = {**out, "same_loss": same}
    ok = all(r["same_loss"] for r in rows.values())
    return {"hidden": p["hidden"], "vocab": p["vocab"], "dtype": str(dtype), "rows": rows, "ok": ok}


# -- the driver ----------------------------------------------------------------------------------------------------
def run_part(name: str, device: str, quick: bool) -> dict:
    import torch

    from kdray.ray_setup import quiet_ray_loggers

    quiet_ray_loggers()
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")
    t0 = time.perf_counter()
    out = globals()[f"part_{name}"](setting(device, quick))
    out["seconds"] = time.perf_counter() - t0
    return out


def table(results: dict) -> str:
    r = results["parts"]
    lines = [f"GPU proof on {results['device_name']} ({results['date']}, `{results['command']}`)", "",
             "| part | what was measured | result |", "|---|---|---|"]

    def row(part: str, what: str, text) -> None:
        p = r.get(part, {})
        res = text(p) if p.get("ok") is not None and "error" not in p else f"FAILED: {p.get('error', 'not run')}"
        lines.append(f"| {part} | {what} | {res}{'' if p.get('ok', False) else ' (not met)'} |")

    row("trial", "kdray trial / textbook loop, samples/s (bf16, channels-last); with the teacher cache",
        lambda p: f"{p['kdray_samples_per_s']:,.0f} / {p['plain_samples_per_s']:,.0f} = **{p['ratio']:.2f}x**; "
                  f"cached {p['ratio_cached']:.2f}x")
    row("saturation", "samples/s (GPU utilisation) by batch; two trials sharing the GPU vs one after another",
        lambda p: "; ".join(f"{b}: {v['samples_per_s']:,.0f}/s ({v['gpu_utilisation_pct'] or '-'} %)"
                            for b, v in p["batches"].items()) + f"; sharing {p['sharing_speedup']:.2f}x faster")
    row("sweep", "4 trials, augmented images, view cache with its GPU producer",
        lambda p: f"{p['statuses']}, rows {p['teacher_rows_computed']}/{p['teacher_rows_needed']} computed once, "
                  f"champion {p['champion']}; {p['sweep_trials_s']:.0f} s vs {p['back_to_back_s']:.0f} s back to back")
    row("precision", "every knowledge type under bf16/fp16 autocast vs fp32",
        lambda p: f"{p['types']} types, worst relative error {p['max_relative_error']:.2%}")
    row("determinism", "train.deterministic twice", lambda p: f"bit-identical: {p['bit_identical']}")
    row("token_loss", "chunked vs naive LM loss, forward + backward",
        lambda p: "; ".join(f"B·T {n}: naive {v['naive']['ms']:.0f} ms"
                            + (f" / {v['naive']['peak_mib']:,.0f} MiB" if v['naive']['peak_mib'] is not None else "")
                            + f", chunked {v['chunked']['ms']:.0f} ms"
                            + (f" / {v['chunked']['peak_mib']:,.0f} MiB" if v['chunked']['peak_mib'] is not None
                               else "") for n, v in p["rows"].items()) + f" (H {p['hidden']}, V {p['vocab']:,})")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes (the CPU check of the code paths)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "gpu_proof.json"))
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:  # one part, in this process: its result as the last line
        print(json.dumps(run_part(args.part, args.device, args.quick), default=str))
        return 0
    try:
        import torch

        name = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else "CPU"
    except Exception:  # noqa: BLE001
        name = "unknown"
    results = {"device": args.device, "device_name": name, "quick": args.quick,
               "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python benchmarks/gpu_proof.py"]
                                                                      + sys.argv[1:]), "parts": {}}
    scale = 1.0 if args.device == "cuda" else 2.0
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        print(f"[gpu-proof] {part} ...", flush=True)
        try:
            p = subprocess.run([sys.executable, __file__, "--part", part, "--device", args.device]
                               + (["--quick"] if args.quick else []), capture_output=True, text=True,
                               timeout=LIMIT_S[part] * scale, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if p.returncode != 0:
                tail = (p.stderr or p.stdout).strip().splitlines()
                out = {"ok": False, "error": tail[-1] if tail else f"exit {p.returncode}", "log": "\n".join(tail[-30:])}
            else:
                out = json.loads(p.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            out = {"ok": False, "error": f"ran past its limit of {LIMIT_S[part] * scale:.0f} s"}
        out.setdefault("seconds", time.perf_counter() - t0)
        results["parts"][part] = out
        print(f"[gpu-proof] {part}: {'ok' if out.get('ok') else 'FAILED ' + str(out.get('error', ''))} "
              f"({out['seconds']:.0f} s)", flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))  # after every part: nothing lost
    print(table(results))
    failed = [k for k, v in results["parts"].items() if not v.get("ok")]
    if failed:
        print(f"[gpu-proof] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
