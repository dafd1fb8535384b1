"""Samples per second of one KD epoch: kdray's training loop against a plain PyTorch loop doing the same work.

Both run in this process, alternately (plain, kdray, plain, kdray, ...), with the same models, data, batch
size, optimizer (Adam: torch's default implementation, and a second plain side with the fused kernel that
kdray uses, so that kdray's loop overhead shows apart from its faster optimizer) and thread count;
throughput is training samples per second of an epoch, validation excluded on both sides, median over the
measured epochs (the first epoch of each is a warm-up). kdray's side is ``train_run`` with an in-process
session: exactly what an inline sweep trial runs (taps, loss dict, per-term sums, one metric sync and one
checkpoint per epoch). A further column shows kdray reading the teacher outputs from the shared cache
instead of running the teacher (what a sweep does by default).

    python benchmarks/bench_epoch.py [--epochs 8] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdray.cache import build_cache  # noqa: E402
from kdray.config import DatasetConfig, RunConfig  # noqa: E402
from kdray.data import load_dataset  # noqa: E402
from kdray.models import Teacher, build_model, model_from_record  # noqa: E402
from kdray.train.loop import STUDENT_FILE, train_run  # noqa: E402
from kdray.train.session import Session  # noqa: E402

PAIRS = {
    "mnist1d cnn -> mlp (kd)": ("mnist1d", "mnist1d_cnn", "mnist1d_mlp", [{"type": "kd", "temperature": 4.0}], 100),
    "mnist1d cnn_wide -> mlp (kd)": ("mnist1d", "mnist1d_cnn_wide", "mnist1d_mlp", [{"type": "kd",
                                                                                     "temperature": 4.0}], 100),
    "digits cnn -> mlp (kd)": ("digits", "digits_cnn", "digits_mlp", [{"type": "kd", "temperature": 4.0}], 64),
}


def make_teacher(dataset: str, model: str) -> dict:
    cfg = RunConfig.model_validate({"dataset": {"name": dataset}, "student": {"name": model},
                                    "train": {"epochs": 1, "batch_size": 128}})
    s = Session(checkpoint_root=tempfile.mkdtemp())
    train_run({"run": cfg.model_dump(mode="json")}, s)
    return torch.load(s.last_checkpoint / STUDENT_FILE, weights_only=True)


def plain_epochs(record: dict, dataset: str, student_name: str, batch: int, epochs: int, t: float = 4.0,
                 fused: bool = False) -> list[float]:
    """The textbook KD loop: frozen teacher under no_grad, student forward, CE + T^2 KL, Adam step (torch's
    default Adam, or ``fused``: the fused kernel kdray uses, so the loop's own overhead shows apart)."""
    data = load_dataset(DatasetConfig(name=dataset))
    x, y = data.train.x, data.train.y
    teacher = model_from_record(record).eval()
    teacher.requires_grad_(False)
    torch.manual_seed(0)
    student = build_model(student_name, data.info.num_classes, data.info.preprocess())
    opt = torch.optim.Adam(student.parameters(), lr=1e-3, fused=fused or None)
    rates = []
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        t0 = time.perf_counter()
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            xb, yb = x[idx], y[idx]
            with torch.no_grad():
                zt = teacher(xb)
            zs = student(xb)
            loss = F.cross_entropy(zs, yb) + F.kl_div(F.log_softmax(zs / t, 1), F.log_softmax(zt / t, 1),
                                                     reduction="batchmean", log_target=True) * t * t
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(len(y) / (time.perf_counter() - t0))
    return rates[1:]


def kdray_epochs(record: dict, dataset: str, student_name: str, knowledge: list, batch: int, epochs: int,
                 threads: int, cache=None) -> list[float]:
    cfg = RunConfig.model_validate({"dataset": {"name": dataset}, "student": {"name": student_name},
                                    "teacher": {"checkpoint": "unused"}, "knowledge": knowledge,
                                    "train": {"epochs": epochs, "batch_size": batch, "lr": 1e-3, "scheduler": "none"},
                                    "resources": {"cpus_per_worker": threads}})
    s = Session(checkpoint_root=tempfile.mkdtemp())
    train_run({"run": cfg.model_dump(mode="json"), "teacher_records": [record], "teacher_cache": cache}, s)
    n = len(load_dataset(cfg.dataset).train)
    return [(r["samples_per_s"], n / r["epoch_time_s"]) for r in s.reports[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of plain and kdray")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, (dataset, teacher, student, knowledge, batch) in PAIRS.items():
        record = make_teacher(dataset, teacher)
        data = load_dataset(DatasetConfig(name=dataset))
        tap = Teacher.from_records([record])
        cache = build_cache([record], data, [], max_bytes=2**30)
        plain, plain_fused, ours, cached = [], [], [], []
        for _ in range(args.rounds):
            plain += plain_epochs(record, dataset, student, batch, args.epochs)
            plain_fused += plain_epochs(record, dataset, student, batch, args.epochs, fused=True)
            ours += kdray_epochs(record, dataset, student, knowledge, batch, args.epochs, args.threads)
            cached += kdray_epochs(record, dataset, student, knowledge, batch, args.epochs, args.threads, cache)
            torch.set_num_threads(args.threads)
        p, pf = statistics.median(plain), statistics.median(plain_fused)
        k, c = statistics.median(r[0] for r in ours), statistics.median(r[0] for r in cached)
        whole = statistics.median(r[1] for r in ours)
        t_params = sum(q.numel() for q in tap.parameters())
        rows.append({"pair": name, "teacher_params": t_params, "plain_samples_per_s": p,
                     "plain_fused_samples_per_s": pf,
                     "kdray_samples_per_s": k, "ratio_to_plain_fused": k / pf,
                     "kdray_cached_samples_per_s": c, "ratio": k / p, "ratio_cached": c / p,
                     "kdray_whole_epoch_samples_per_s": whole})
        print(f"{name:<32} plain {p:9.0f}/s  plain, fused Adam {pf:9.0f}/s  kdray {k:9.0f}/s ({k / p:.2f}x; "
              f"{k / pf:.2f}x of fused)  kdray+cache {c:9.0f}/s ({c / p:.2f}x)"
              f"  [kdray incl. validation {whole:8.0f}/s]", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"threads": args.threads, "epochs": args.epochs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
