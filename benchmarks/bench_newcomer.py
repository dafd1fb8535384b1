"""The newcomer path, timed as a newcomer takes it: a fresh clone, ``make demo``, then the query commands.

    python benchmarks/bench_newcomer.py [--repo .] [--json results/newcomer.json] [--keep DIR]

Clones the repository's committed HEAD into a temporary folder (nothing of this checkout's ``.venv`` or
outputs is reused), then times, one after another: ``make install`` (the virtual environment and every
dependency), ``make demo`` once installed (the default sweep: teacher, trials, champion), ``import kdray``,
and ``kdray best --json`` / ``kdray compare --json`` on the demo's sweep, each its first call and the
median of three more. Installer caches (pip's, uv's) are whatever this machine has: say which when you
quote the numbers. Run nothing else meanwhile.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str], cwd: Path, log: Path) -> tuple[float, str]:
    """Run ``cmd`` in ``cwd``; its output goes to ``log`` (appended). Returns (seconds, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": ""})
    dt = time.perf_counter() - t0
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}   ({dt:.1f} s, rc {p.returncode})\n{p.stdout}{p.stderr}\n")
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (rc {p.returncode}); see {log}\n{p.stderr[-2000:]}")
    return dt, p.stdout


def first_and_median(cmd: list[str], cwd: Path, log: Path, repeats: int = 3) -> tuple[float, float, str]:
    first, out = timed(cmd, cwd, log)
    return first, statistics.median(timed(cmd, cwd, log)[0] for _ in range(repeats)), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(HERE.parent), help="the repository to clone (its committed HEAD)")
    ap.add_argument("--json", help="write the measurements here (relative to benchmarks/)")
    ap.add_argument("--keep", help="clone into this folder and keep it (default: a temporary folder, removed)")
    args = ap.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kdray-newcomer-"))
    clone = root / "kdray"
    log = root / "newcomer.log"
    try:
        subprocess.run(["git", "clone", "--quiet", args.repo, str(clone)], check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                                text=True, check=True).stdout.strip()
        print(f"fresh clone of {commit} in {clone}; log in {log}", flush=True)
        install, _ = timed(["make", "install"], clone, log)
        print(f"make install            {install:7.1f} s", flush=True)
        demo, demo_out = timed(["make", "demo"], clone, log)
        print(f"make demo (installed)   {demo:7.1f} s", flush=True)
        py, kdray = str(clone / ".venv/bin/python"), str(clone / ".venv/bin/kdray")
        imp = first_and_median([py, "-c", "import kdray"], clone, log)
        best = first_and_median([kdray, "best", "--json"], clone, log)
        comp = first_and_median([kdray, "compare", "--json"], clone, log)
        by_type = {s["knowledge"]: s for s in json.loads(comp[2])["by_knowledge"]}
        champion = json.loads(best[2])
        res = {
            "commit": commit, "install_s": install, "demo_s": demo, "fresh_clone_to_champion_s": install + demo,
            "import_kdray_s": imp[:2], "best_json_s": best[:2], "compare_json_s": comp[:2],
            "champion": {k: champion.get(k) for k in ("knowledge", "val_accuracy", "test_accuracy")},
            "best_val_by_knowledge": {k: v["best_val_accuracy"] for k, v in by_type.items()},
            "demo_tail": demo_out.strip().splitlines()[-3:],
        }
        print(f"fresh clone -> champion {install + demo:7.1f} s   (goal <= 360 s)")
        for name, (a, b) in (("import kdray", imp[:2]), ("kdray best --json", best[:2]),
                             ("kdray compare --json", comp[:2])):
            print(f"{name:<23} {a:7.2f} s first, {b:.2f} s again   (goal <= 3 s for the queries)")
        print(f"champion: {res['champion']}; best validation accuracy by type: {res['best_val_by_knowledge']}")
        if args.json:
            out = HERE / args.json
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
