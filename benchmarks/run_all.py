"""Every benchmark, one after another, each in its own process; results as JSON under benchmarks/results/.

    make benchmark        (about 65 minutes on 2 CPUs; run nothing else meanwhile: timings are compared)
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [
    ["bench_epoch.py", "--epochs", "8", "--threads", "1", "--json", "results/epoch_1thread.json"],
    ["bench_sweep.py", "--trials", "8", "--epochs", "30", "--cache", "off", "--json", "results/sweep8_cache_off.json"],
    ["bench_sweep.py", "--trials", "16", "--epochs", "30", "--cache", "off", "--json",
     "results/sweep16_cache_off.json"],
    ["bench_sweep.py", "--trials", "16", "--epochs", "30", "--cache", "auto", "--json",
     "results/sweep16_cache_on.json"],
    ["bench_cache.py", "--epochs", "30", "--json", "results/cache.json"],
    ["bench_aug_cache.py", "--epochs", "4", "--json", "results/aug_cache.json"],
    ["bench_search.py", "--epochs", "40", "--seeds", "2"],
    ["bench_token_loss.py", "--json", "results/token_loss.json"],
    ["bench_lm_epoch.py", "--json", "results/lm_epoch.json"],
    ["bench_lm_sweep.py", "--json", "results/lm_sweep.json"],
    ["bench_int8.py", "--json", "results/int8.json"],
]

if __name__ == "__main__":
    (HERE / "results").mkdir(exist_ok=True)
    for args in RUNS:
        print(f"== {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], cwd=HERE, check=True)
