"""The README's results table, from one command: `make results` (or `python benchmarks/results_table.py`).

For each shipped space (MNIST-1D's default, digits, the language model's tiny_lm and tasks_lm, off- against on-policy
on tasks with exact answers, and digits_transfer, a transfer set): run the sweep (`kdray
sweep`), then `kdray final --per-type --seeds 5` on it (tiny_lm: `--by tkd.divergence`, every divergence its own row):
the best configuration of every knowledge type retrained over the same seeds, each compared with labels only (`none`)
seed by seed, p-values Holm-corrected. Writes one markdown table per space, with the sweep's per-type budget, next to
the MNIST-1D paper's reference numbers (Greydanus 2020: CNN 94 %, MLP 68 %). ~40 minutes on 2 CPUs for the five.

    python benchmarks/results_table.py [--seeds 5] [--spaces default digits tiny_lm tasks_lm digits_transfer]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPER = {"mnist1d": {"teacher": "94 (CNN)", "student": "68 (MLP)"}, "digits": {"teacher": "-", "student": "-"},
         "python_docs": {"teacher": "-", "student": "-"}, "lm_tasks": {"teacher": "-", "student": "-"}}
DATASET = {"default": "mnist1d", "tiny_lm": "python_docs", "tasks_lm": "lm_tasks", "digits_transfer": "digits"}
BY = {"tiny_lm": "tkd.divergence"}  # final --per-type --by: a language model's divergences each get a row


def kdray(*args: str, cwd: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "kdray", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"kdray {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--spaces", nargs="+", default=["default", "digits", "tiny_lm", "tasks_lm", "digits_transfer"])
    ap.add_argument("--workdir", default=str(REPO / "kdray_runs" / "results"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    rows, lines = [], []
    for name in args.spaces:
        space = REPO / "search_spaces" / f"{name}.yaml"
        sweep = f"results-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        t0 = time.time()
        kdray("sweep", str(space), "--name", sweep, "--tracking-uri", uri, "--quiet", cwd=work)
        minutes = (time.time() - t0) / 60
        board = kdray("compare", "--sweep", sweep, "--json", "--tracking-uri", uri, cwd=work)
        budget = {b["knowledge"]: b for b in json.loads(board)["by_knowledge"]}
        t0 = time.time()
        by = ["--by", BY[name]] if name in BY else []
        final = json.loads(kdray("final", "--sweep", sweep, "--per-type", "--seeds", str(args.seeds), "--json",
                                 "--tracking-uri", uri, *by, cwd=work))
        dataset = DATASET.get(name, name)
        rows.append({"space": name, "dataset": dataset, "sweep": sweep, "sweep_minutes": minutes,
                     "final_minutes": (time.time() - t0) / 60, "budget": budget, **final})
        print(json.dumps(rows[-1], default=str), flush=True)
        paper = PAPER[dataset]
        nll, exact = final.get("metric") == "test_nll", final.get("metric") == "test_exact_match"
        teacher = (f"{final['teacher_test']:.4f} nats/token" if nll else
                   f"{final['teacher_test'] * 100:.1f} % exact match" if exact else
                   f"{final['teacher_test_accuracy'] * 100:.1f}")
        lines += [f"**{dataset}** (space `{name}`): teacher {teacher} "
                  f"(paper: {paper['teacher']}; student alone in the paper: {paper['student']}). Sweep in "
                  f"{minutes:.1f} min; trials per type: " + ", ".join(
                      f"{k} {b['trials']} ({b['epochs']} epochs)" for k, b in budget.items()) + ".", "",
                  final["markdown"].strip(), ""]
    lines = [f"Test accuracy (%) (a language model: test NLL, nats per token, lower is better; tasks: test exact "
             f"match, %), mean ± std over "
             f"{args.seeds} seeds, the same seeds for every knowledge type. "
             "Produced by `make results` (benchmarks/results_table.py): the shipped search space, then "
             "`kdray final --per-type`. * marks a difference to `none` significant at 5 % after Holm's correction.",
             ""] + lines
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results_table.md").write_text(table + "\n")
    (out / "results_table.json").write_text(json.dumps(rows, indent=2))
    print(table)


if __name__ == "__main__":
    main()
