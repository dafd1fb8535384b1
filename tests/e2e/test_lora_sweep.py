"""A LoRA student as users run it: a sweep searches the adapters' rank of a student made of the teacher's own layers
(the frozen base copied from the teacher, only the adapters training), registers the champion merged, and that
folder loads with Hugging Face's own classes in a process where peft cannot be imported, giving the recorded
validation NLL."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient
from sweep_helpers import request

from kdray.tracking.store import TAG_STATUS, find_sweep, sweep_children

TINY = {"layers": 2, "hidden": 48, "heads": 2}
SPACE = {
    "name": "lora-lm", "metric": "val_nll", "num_samples": 4, "seed": 0, "min_trials_per_type": 1,
    "base": {
        "dataset": {"name": "lm_tasks", "options": {"train_examples": 600, "test_examples": 50}},
        "teacher": {"train": {"model": {"name": "tiny_llama", "options": TINY},
                              "train": {"epochs": 3, "batch_size": 32, "optimizer": "adamw", "lr": 0.005}}},
        "student": {"name": "tiny_llama", "init_from_teacher": [1], "peft": {"target_modules": ["q_proj", "v_proj"]}},
        "train": {"epochs": 2, "batch_size": 32, "optimizer": "adamw", "lr": 0.01},
    },
    "scheduler": {"type": "fifo"},
    "searcher": {"type": "tpe", "n_startup_trials": 4},
    "space": {"student.peft.r": {"type": "categorical", "choices": [2, 8]},
              "knowledge": {"none": {}, "tkd": {"divergence": "fkl"}}},
}


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_over_the_lora_rank_registers_a_merged_champion_that_loads_without_peft(tmp_path, ray_cluster):
    from kdray.sweep.runner import run_sweep

    path = tmp_path / "lora-lm.yaml"
    path.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    result = run_sweep(request(tmp_path, path, "lora"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    trials = [t for t in sweep_children(c, find_sweep(c, "lora"), kind="trial")
              if t.data.tags.get(TAG_STATUS) == "completed"]
    ranks = {json.loads(t.data.tags["kdray.searched"])["student.peft.r"] for t in trials}
    assert ranks <= {2, 8} and len(trials) == 4
    # every trial's student is the teacher's layer 1 plus adapters: the same delivered size whatever the rank
    assert len({t.data.metrics["student_params"] for t in trials}) == 1
    folder = tmp_path / "reg"
    code = f"""
import sys, json, torch
sys.modules["peft"] = None  # the registered champion needs no peft
import mlflow
from transformers import AutoModelForCausalLM
from kdray.config import DatasetConfig
from kdray.data import load_dataset
mlflow.set_tracking_uri({uri!r})
path = mlflow.artifacts.download_artifacts("models:/kdray-lora-lm@champion", dst_path={str(folder)!r})
model = AutoModelForCausalLM.from_pretrained(path + "/model").eval()
val = load_dataset(DatasetConfig.model_validate({SPACE["base"]["dataset"]!r})).val
with torch.no_grad():
    z = model(input_ids=val.x).logits
    print(torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), val.y.reshape(-1)).item())
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert float(p.stdout.strip().splitlines()[-1]) == pytest.approx(result.champion.metrics["val_nll"], rel=1e-4)
    assert not list(folder.rglob("adapter_config.json"))
