"""The README's results table, from one command: `make results` (or `python benchmarks/results_table.py`).

For MNIST-1D and digits: run the shipped search space (`kdray sweep`), then `kdray final --seeds 5` on it,
and write a markdown table of the teacher's test accuracy, the student trained on labels alone and the
distilled champion (mean ± std over the seeds, test split), the gain and Welch's p-value, next to the
MNIST-1D paper's reference numbers (Greydanus 2020: CNN 94 %, MLP 68 %). ~15 minutes on 2 CPUs.

    python benchmarks/results_table.py [--seeds 5] [--spaces default digits]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPER = {"mnist1d": {"teacher": "94 (CNN)", "student": "68 (MLP)"}, "digits": {"teacher": "-", "student": "-"}}


def kdray(*args: str, cwd: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "kdray", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"kdray {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--spaces", nargs="+", default=["default", "digits"])
    ap.add_argument("--workdir", default=str(REPO / "kdray_runs" / "results"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    rows = []
    for name in args.spaces:
        space = REPO / "search_spaces" / f"{name}.yaml"
        sweep = f"results-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        t0 = time.time()
        kdray("sweep", str(space), "--name", sweep, "--tracking-uri", uri, "--quiet", cwd=work)
        best = json.loads(kdray("best", "--sweep", sweep, "--json", "--tracking-uri", uri, cwd=work))
        final = json.loads(kdray("final", "--sweep", sweep, "--seeds", str(args.seeds), "--json", "--tracking-uri",
                                 uri, cwd=work))
        import numpy as np

        c, n = np.array(final["champion"]) * 100, np.array(final["none"]) * 100
        dataset = "mnist1d" if name == "default" else name
        rows.append({
            "space": name, "dataset": dataset, "sweep": sweep, "minutes": (time.time() - t0) / 60,
            "teacher": final["teacher_test_accuracy"] * 100, "none_mean": n.mean(), "none_std": n.std(ddof=1),
            "champion": best["knowledge"], "champion_mean": c.mean(), "champion_std": c.std(ddof=1),
            "gain": final["gain"] * 100, "p_value": final["p_value"], "seeds": args.seeds,
            "sweep_val": best["val_accuracy"] * 100, "sweep_test": best["test_accuracy"] * 100,
            "baseline": final["baseline"],
        })
        print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"Test accuracy (%), mean ± std over {args.seeds} seeds (the teacher: one run). Produced by "
        "`make results` (benchmarks/results_table.py): the shipped search space, then `kdray final`.",
        "",
        "| data set | teacher | paper's teacher | student alone (none) | paper's student | distilled champion |"
        " gain | Welch p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['teacher']:.1f} | {PAPER[r['dataset']]['teacher']} | "
            f"{r['none_mean']:.1f} ± {r['none_std']:.1f} | {PAPER[r['dataset']]['student']} | "
            f"{r['champion_mean']:.1f} ± {r['champion_std']:.1f} ({r['champion']}) | {r['gain']:+.1f} | "
            f"{r['p_value']:.2g} |")
    lines.append("")
    lines += [f"{r['dataset']}: sweep `{r['space']}` in {r['minutes']:.1f} min; its champion scored {r['sweep_val']:.1f} "
              f"(validation) / {r['sweep_test']:.1f} (test, one seed); the labels-only baseline retrained by "
              f"`kdray final` is {r['baseline']}." for r in rows]
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results_table.md").write_text(table + "\n")
    (out / "results_table.json").write_text(json.dumps(rows, indent=2))
    print(table)


if __name__ == "__main__":
    main()
