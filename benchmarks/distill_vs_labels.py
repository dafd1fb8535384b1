"""`kdray teacher` then `kdray distill` (KD) against the same MLP on labels alone, MNIST-1D, 3 seeds.

Runs the shipped configs through the real command line (Ray Train, 2 gloo workers per run):

    kdray teacher configs/mnist1d_teacher.yaml
    kdray distill configs/mnist1d_kd.yaml --seed S --test            (S = 0, 1, 2)
    kdray distill configs/mnist1d_labels_only.yaml --seed S --test

and writes benchmarks/results/distill_vs_labels.{json,md}. ~6 minutes on 2 CPUs.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "results"


def kdray(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "kdray", *args], cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"kdray {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def main() -> None:
    out = kdray("teacher", "configs/mnist1d_teacher.yaml")
    line = [ln for ln in out.splitlines() if "test accuracy" in ln][-1]
    teacher_test = float(line.rsplit("test accuracy", 1)[1].strip().split()[0].rstrip(","))
    rows = []
    for seed in (0, 1, 2):
        for name, cfg in (("kd", "configs/mnist1d_kd.yaml"), ("labels only", "configs/mnist1d_labels_only.yaml")):
            res = json.loads(kdray("distill", cfg, "--seed", str(seed), "--test", "--json").strip().splitlines()[-1])
            rows.append({"run": name, "seed": seed, **res})
            print(rows[-1], flush=True)
    summary = {"teacher_test_accuracy": teacher_test, "runs": rows}
    for name in ("kd", "labels only"):
        t = np.array([r["test_accuracy"] for r in rows if r["run"] == name]) * 100
        v = np.array([r["val_accuracy"] for r in rows if r["run"] == name]) * 100
        summary[name] = {"test_mean": t.mean(), "test_std": t.std(ddof=1), "val_mean": v.mean(),
                         "val_std": v.std(ddof=1)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "distill_vs_labels.json").write_text(json.dumps(summary, indent=2))
    md = [f"MNIST-1D, `kdray teacher` CNN: **{teacher_test * 100:.1f} %** test accuracy (paper: 94 %).", "",
          "| 2x100 MLP student, 150 epochs, 2 gloo workers | test accuracy, mean ± std (3 seeds) | validation |",
          "|---|---|---|"]
    for name in ("labels only", "kd"):
        s = summary[name]
        md.append(f"| {name} | {s['test_mean']:.1f} ± {s['test_std']:.1f} | {s['val_mean']:.1f} ± {s['val_std']:.1f} |")
    (OUT / "distill_vs_labels.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
