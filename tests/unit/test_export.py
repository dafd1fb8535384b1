"""Exported champions take the images users have: raw uint8 (N, C, H, W), any batch size (issue 16, item 4)."""
from __future__ import annotations

import pytest
import torch
from conftest import train_record

from kdray.config import DatasetConfig
from kdray.data import load_dataset
from kdray.models import build_model, model_from_record
from kdray.tracking.champion import export_record
from kdray.train.loop import evaluate


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    record = train_record({"dataset": {"name": "test_images"}, "student": {"name": "small_cnn",
                                                                             "options": {"widths": [8, 16]}},
                           "train": {"epochs": 2, "batch_size": 32, "lr": 0.01}}, tmp / "run")
    return record, export_record(record, tmp / "out", ("state_dict", "torchscript", "onnx")), tmp / "out"


def test_every_export_format_on_raw_uint8_images_scores_what_kdray_measured(exported):
    record, written, out = exported
    val = load_dataset(DatasetConfig(name="test_images")).val
    assert val.x.dtype == torch.uint8 and val.x.shape[1:] == (3, 32, 32)
    want = evaluate(model_from_record(record), val, 512, torch.device("cpu"))["accuracy"]  # kdray's own
    with torch.no_grad():
        ref = model_from_record(record).eval()(val.x)
    assert (ref.argmax(1) == val.y).float().mean().item() == pytest.approx(want)

    scripted = torch.jit.load(written["torchscript"])
    sd = build_model(record["model"], record["num_classes"], model_from_record(record).preprocess,
                     record["model_options"]).eval()
    sd.load_state_dict(torch.load(written["state_dict"], weights_only=True))
    import onnxruntime

    session = onnxruntime.InferenceSession(written["onnx"])
    with torch.no_grad():
        outputs = {"torchscript": scripted(val.x), "state_dict": sd(val.x),
                   "onnx": torch.from_numpy(session.run(None, {"x": val.x.numpy()})[0])}
    for name, logits in outputs.items():  # batch of len(val) though traced with 2: the batch is dynamic
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4, msg=name)
        assert (logits.argmax(1) == val.y).float().mean().item() == pytest.approx(want), name
    readme = (out / "README.txt").read_text()
    assert "uint8" in readme and "(batch, 3, 32, 32)" in readme
