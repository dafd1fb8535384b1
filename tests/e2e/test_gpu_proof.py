"""The GPU proof script, run as the suite can run it: ``--device cpu --quick``, every part through the same code paths
a GPU run takes (the trial against the textbook loop, batch sizes and two trials sharing the device, the sweep with
its per-(epoch, sample) cache and producer, precision of every knowledge type under autocast, determinism, the
chunked language-model loss), its JSON and its Markdown table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_proof_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_proof.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_proof.py"), "--device", "cpu", "--quick",
                        "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    results = json.loads(out.read_text())
    failed = {k: v.get("error") or v.get("failed") for k, v in results["parts"].items() if not v.get("ok")}
    assert p.returncode == 0 and not failed, (failed, p.stdout[-3000:], p.stderr[-3000:])
    parts = results["parts"]
    assert set(parts) == {"trial", "saturation", "sweep", "precision", "determinism", "token_loss"}
    assert parts["trial"]["plain_samples_per_s"] > 0 and parts["trial"]["kdray_cached_samples_per_s"] > 0
    assert parts["sweep"]["teacher_rows_computed"] == parts["sweep"]["teacher_rows_needed"]  # each row once
    assert parts["sweep"]["champion"].startswith("models:/")
    assert parts["determinism"]["bit_identical"] is True
    assert all(r["same_loss"] for r in parts["token_loss"]["rows"].values())
    assert "| trial |" in p.stdout and "| token_loss |" in p.stdout
