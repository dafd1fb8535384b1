"""Bring your own (issue 11): a Hugging Face text classifier and a timm model, each distilled and swept through
the same commands (`kdray distill`, `kdray sweep`) on 2 gloo workers, the champion loaded back from MLflow.

Everything is made here, offline: a tokenizer trained on the spot, a tiny BERT fine-tuned for a few seconds
and saved like a hub repository (model + tokenizer in one folder), a text data set saved with `datasets`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from kdray.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]
pytest.importorskip("transformers")
pytest.importorskip("timm")

WORDS = {"neg": ["bad", "awful", "poor", "dull"], "pos": ["good", "great", "lovely", "fun"],
         "meh": ["fine", "okay", "average", "plain"]}
FILLER = ["the", "movie", "film", "plot", "was", "is", "very", "and", "a", "cast", "story", "ending"]
MAX_LEN = 16
# The distillations run on 2 gloo workers; the sweeps' trials on one worker each, in the trial itself: a
# 2-worker Train group per trial costs ~15 s of start-up on these 2-core machines, and multi-worker trials are
# covered by tests/e2e/test_bring_your_own.py (a plugin in every Train worker) and tests/e2e/test_multinode.py.
ONE_WORKER = {"num_workers": 1, "cpus_per_worker": 1}


def _texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        c = i % 3
        words = list(rng.choice(FILLER, size=rng.integers(3, 10))) + [rng.choice(WORDS[list(WORDS)[c]])]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(c)
    return texts, labels


@pytest.fixture(scope="module")
def text_project(tmp_path_factory):
    """A fine-tuned tiny BERT with its tokenizer in one folder, and a review data set saved to disk."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("text")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + sorted({w for ws in WORDS.values() for w in ws} | set(FILLER))
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tk.normalizer, tk.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                               ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(WORDS))})
    (tr_x, tr_y), (te_x, te_y) = _texts(360, 0), _texts(120, 1)
    DatasetDict({"train": Dataset.from_dict({"text": tr_x, "label": tr_y}, features=features),
                 "test": Dataset.from_dict({"text": te_x, "label": te_y}, features=features)}
                ).save_to_disk(str(root / "reviews"))

    torch.manual_seed(0)  # the user's fine-tuned teacher: 4 layers
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, pad_token_id=0))
    enc = tokenizer(tr_x, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
    y = torch.tensor(tr_y)
    opt = torch.optim.Adam(bert.parameters(), lr=3e-3)
    bert.train()
    for epoch in range(8):
        for idx in torch.randperm(len(y)).split(32):
            opt.zero_grad()
            bert(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx],
                 labels=y[idx]).loss.backward()
            opt.step()
    (root / "bert-reviews").mkdir()
    bert.save_pretrained(str(root / "bert-reviews"))
    tokenizer.save_pretrained(str(root / "bert-reviews"))

    base = {
        "dataset": {"name": "hf", "path": str(root / "reviews"), "max_length": MAX_LEN},
        "teacher": {"name": f"hf/{root / 'bert-reviews'}"},
        "student": {"name": f"hf/{root / 'bert-reviews'}", "init_from_teacher": "every_other_layer"},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.002},
        "resources": {"num_workers": 2, "cpus_per_worker": 1, "execution": "train"},
    }
    return root, base


def test_a_hugging_face_text_teacher_distils_into_a_half_depth_student(ray_cluster, text_project, capsys):
    root, base = text_project
    cfg = root / "distill.yaml"
    cfg.write_text(yaml.safe_dump({**base, "name": "text", "knowledge": [{"type": "kd", "temperature": 2.0},
                                                                         {"type": "minilm"}]}))
    assert main(["distill", str(cfg), "--storage", str(root / "runs"), "--test", "--json"]) == 0
    out = capsys.readouterr().out
    assert "2 worker(s)" in out
    summary = json.loads(out.strip().splitlines()[-1])
    from kdray.models import load_record

    record = load_record(summary["student"])
    assert record["model_options"]["hf_config"]["num_hidden_layers"] == 2  # every other layer of 4
    assert summary["test_accuracy"] > 0.6  # three classes: chance is 1/3


def test_a_sweep_over_transformer_knowledge_registers_a_champion_that_loads_back(ray_cluster, text_project):
    import mlflow

    root, base = text_project
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": "text-space", "num_samples": 3, "seed": 0, "base": {**base, "resources": ONE_WORKER},
        "scheduler": {"type": "fifo"},
        "searcher": {"type": "tpe", "n_startup_trials": 3},
        "space": {"knowledge": {"kd+attn": {"kd.temperature": 2.0}, "kd+minilm": {"kd.temperature": 2.0},
                                "fitnet": {}}},
    }))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    assert main(["sweep", str(space), "--storage", str(root / "runs"), "--tracking-uri", uri, "--quiet"]) == 0
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model("models:/kdray-text-space@champion")
    from kdray.config import DatasetConfig
    from kdray.data import load_dataset

    test = load_dataset(DatasetConfig.model_validate({**base["dataset"], "tokenizer": str(root / "bert-reviews")})).test
    with torch.no_grad():
        acc = (model(test.x).argmax(1) == test.y).float().mean().item()
    assert acc > 0.6


@pytest.fixture(scope="module")
def image_project(tmp_path_factory):
    """A timm teacher (ConvNeXt) trained briefly on CIFAR-shaped images made locally, saved as a kdray
    checkpoint, and a timm student of another family (ResNet)."""
    from conftest import train_record

    from kdray.models import save_model

    root = tmp_path_factory.mktemp("timm")
    teacher = train_record({"dataset": {"name": "test_images"}, "student": {"name": "timm/convnext_atto"},
                            "train": {"epochs": 1, "batch_size": 64, "lr": 0.003}}, root / "teacher-run")
    save_model(teacher, root / "teacher.pt")
    base = {
        "dataset": {"name": "test_images"},
        "teacher": {"checkpoint": str(root / "teacher.pt")},
        "student": {"name": "timm/resnet10t"},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.003},
        "resources": {"num_workers": 2, "cpus_per_worker": 1, "execution": "train"},
    }
    return root, base


def test_a_timm_student_distils_and_sweeps_from_a_timm_teacher(ray_cluster, image_project, capsys):
    import mlflow

    root, base = image_project
    cfg = root / "distill.yaml"  # hints between two timm families: the connector comes from feature_info's shapes
    cfg.write_text(yaml.safe_dump({**base, "name": "timm", "knowledge": [{"type": "kd"}, {"type": "fitnet"}]}))
    assert main(["distill", str(cfg), "--storage", str(root / "runs"), "--json"]) == 0
    out = capsys.readouterr().out
    assert "2 worker(s)" in out and "timm/convnext_atto -> timm/resnet10t" in out
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": "timm-space", "num_samples": 3, "seed": 0, "base": {**base, "resources": ONE_WORKER},
        "scheduler": {"type": "fifo"},
        "searcher": {"type": "tpe", "n_startup_trials": 3},
        "space": {"knowledge": {"kd": {}, "rkd": {}, "kd+fitnet": {}}},
    }))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    assert main(["sweep", str(space), "--storage", str(root / "runs"), "--tracking-uri", uri, "--quiet"]) == 0
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model("models:/kdray-timm-space@champion")
    from kdray.config import DatasetConfig
    from kdray.data import load_dataset

    test = load_dataset(DatasetConfig(name="test_images")).test
    with torch.no_grad():
        acc = (model(test.x).argmax(1) == test.y).float().mean().item()  # raw uint8 images in
    assert acc > 0.5  # three classes
