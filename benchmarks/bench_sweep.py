"""Wall time of a kdray sweep against the same trials trained back to back in one plain process.

The sweep: ``run_sweep`` on the default MNIST-1D space with N trials, FIFO (no early stopping, so both sides
do the same training), 2 trials at a time with 1 thread each on this 2-CPU machine, MLflow on SQLite.
The baseline: the same N resolved trial configs, one after another in one fresh Python process with no Ray,
no Tune and no MLflow, calling the training loop directly with 2 torch threads ("using both CPUs").
The teacher is trained once beforehand and shared by both sides. With ``--cache off`` both sides run the
teacher live (same work); ``--cache auto`` lets the sweep use its shared teacher-output cache.

Also reported, from the sweep's own MLflow records: per-trial start-up (trial start to its first report,
minus that epoch's compute), per-report latency (``ray.tune.report``) and checkpoint write time.

    python benchmarks/bench_sweep.py --trials 8 --epochs 30 --cache off --json results/sweep8.json
    python benchmarks/bench_sweep.py --plain CONFIGS.json   (the baseline; started by the line above)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def plain(configs_path: str, threads: int) -> None:
    """Baseline: train each config back to back in this process (no Ray, Tune or MLflow)."""
    import torch

    from kdray.config import RunConfig
    from kdray.models import load_record
    from kdray.train.loop import train_run
    from kdray.train.session import Session

    spec = json.loads(Path(configs_path).read_text())
    records = [load_record(p) for p in spec["teacher"]]
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    accs = []
    for run in spec["configs"]:
        cfg = RunConfig.model_validate(run)
        cfg = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"cpus_per_worker": threads})})
        last = train_run({"run": cfg.model_dump(mode="json"), "teacher_records": records}, Session())
        accs.append(last["val_accuracy"])
    print(json.dumps({"wall_s": time.perf_counter() - t0, "val_accuracy": accs}))


def emit(out: dict, path: str | None) -> None:
    """Print a benchmark's results and, when asked, write them as JSON (for the README's table)."""
    print(json.dumps(out, indent=2))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=2))


def cost_ratio(teacher, student, optimizer, x, y, reps: int, warmup: int) -> float:
    """Seconds of a teacher forward pass / of a student training step (forward + backward + step) on the same
    batch, each timed over ``reps`` calls after ``warmup``, on one thread."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)

    def timed(fn) -> float:
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    def teach():
        with torch.no_grad():
            teacher(x)

    def step():
        loss = F.cross_entropy(student(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return timed(teach) / timed(step)


def sweep_once(space_data: dict, shared_storage: str, name: str):
    """Run one sweep in a fresh folder (MLflow on SQLite there), reusing a teacher trained once in
    ``shared_storage``. Returns (result, sweep wall s including Ray start, folder, space, teacher path)."""
    import ray
    import yaml

    from kdray.sweep.runner import SweepRequest, run_sweep
    from kdray.sweep.space import load_space
    from kdray.teachers import teacher_records, trained_teacher_path

    tmp = Path(tempfile.mkdtemp(prefix="kdray-bench-"))
    space_path = tmp / "space.yaml"
    space_path.write_text(yaml.safe_dump(space_data, sort_keys=False))
    space = load_space(space_path)
    base = space.resolve({"knowledge": "none"})
    # trained once (in this process, before Ray: not part of the measurement) and shared by later runs
    teacher_records(base, shared_storage, progress=False, inline=True,
                    log=lambda m: print(f"[bench] {m}", flush=True))
    from kdray.data import load_dataset

    fingerprint = load_dataset(base.dataset).fingerprint
    shared = Path(trained_teacher_path(base, shared_storage, fingerprint))
    local = Path(trained_teacher_path(base, str(tmp / "runs"), fingerprint))  # the sweep finds it here
    local.parent.mkdir(parents=True, exist_ok=True)
    local.symlink_to(shared)
    req = SweepRequest(space=space, space_path=str(space_path), space_yaml=space_path.read_text(), name=name,
                       storage=str(tmp / "runs"), tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", quiet=True)
    t1 = time.perf_counter()
    result = run_sweep(req)  # what `kdray sweep` does after its checks: Ray start ... champion registered
    wall = time.perf_counter() - t1
    ray.shutdown()
    return result, wall, tmp, space, shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--cache", choices=["off", "auto"], default="off")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the baseline process")
    ap.add_argument("--storage", default=str(REPO / "kdray_runs" / "bench"), help="where the shared teacher lives")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plain", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain:
        return plain(args.plain, args.threads)

    import yaml
    from mlflow import MlflowClient

    from kdray.tracking.store import find_sweep, sweep_children

    data = yaml.safe_load((REPO / "search_spaces" / "default.yaml").read_text())
    data.update(num_samples=args.trials, scheduler={"type": "fifo"})
    data["base"]["train"]["epochs"] = args.epochs
    data["base"]["cache"] = {"teacher_outputs": args.cache}
    result, sweep_wall, tmp, space, shared = sweep_once(data, args.storage, "bench")

    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    startup, latency, ckpt = [], [], []
    for run in sweep_children(c, find_sweep(c, "bench"), kind="trial"):
        hist = {k: sorted(c.get_metric_history(run.info.run_id, k), key=lambda m: m.step)
                for k in ("val_accuracy", "epoch_time_s", "report_latency_s", "checkpoint_write_s")}
        first = hist["val_accuracy"][0]
        startup.append((first.timestamp - run.info.start_time) / 1000 - hist["epoch_time_s"][0].value)
        latency += [m.value for m in hist["report_latency_s"][1:]]
        ckpt += [m.value for m in hist["checkpoint_write_s"]]
    configs = [space.resolved_dict(o.params) for o in result.outcomes]
    spec = tmp / "configs.json"
    spec.write_text(json.dumps({"teacher": [str(shared)], "configs": configs}))
    r = subprocess.run([sys.executable, __file__, "--plain", str(spec), "--threads", str(args.threads)],
                       capture_output=True, text=True, check=True)
    base_out = json.loads(r.stdout.strip().splitlines()[-1])
    out = {
        "trials": args.trials, "epochs": args.epochs, "cache": args.cache,
        "sweep_wall_s": sweep_wall, "sweep_trials_s": result.timings.get("trials_s"),
        "sweep_phases_s": result.timings, "plain_wall_s": base_out["wall_s"],
        "ratio_trials": result.timings["trials_s"] / base_out["wall_s"],
        "ratio_sweep_wall": sweep_wall / base_out["wall_s"],
        "trial_startup_s_median": statistics.median(startup), "report_latency_s_median": statistics.median(latency),
        "checkpoint_write_s_median": statistics.median(ckpt),
        # 1-thread trials (sweep) and 2-thread trials (baseline) sum floats in different orders
        "max_val_accuracy_difference": max(abs(a - b) for a, b in zip(
            [o.val_accuracy for o in result.outcomes], base_out["val_accuracy"])),
        "knowledge": [o.knowledge for o in result.outcomes],
    }
    emit(out, args.json)


if __name__ == "__main__":
    main()
