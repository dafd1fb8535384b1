"""timm models by name: built for the data set, with tappable KD layouts, in configs, records and offline."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("timm")

from kdray.config import ConfigError, DatasetConfig, RunConfig, validate  # noqa: E402
from kdray.data import describe_dataset  # noqa: E402
from kdray.knowledge.tensors import embedding  # noqa: E402
from kdray.models import (  # noqa: E402
    MODELS,
    FeatureTaps,
    build_model,
    model_from_record,
    model_record,
)


def image_model(name: str, options: dict | None = None):
    info = describe_dataset(DatasetConfig.model_validate({"name": "test_images"}))
    return build_model(name, info.num_classes, info.preprocess(), options), info


def classifier_input(net) -> list[torch.Tensor]:
    """What timm's own classifier receives: the reference for the embedding tap."""
    seen: list[torch.Tensor] = []
    clf = net.get_classifier()
    clf = clf[0] if isinstance(clf, tuple) else clf
    clf.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    return seen


@pytest.mark.parametrize("name, stages", [
    ("timm/resnet18", ["layer1", "layer2", "layer3", "layer4"]),
    ("timm/convnext_atto", ["stages.0", "stages.1", "stages.2", "stages.3"]),
])
def test_a_timm_model_classifies_small_images_and_taps_its_default_layout(name, stages):
    model, info = image_model(name)
    model.eval()
    net = model.net
    assert list(net.kd_feature_layers) == stages
    seen = classifier_input(net)
    taps = FeatureTaps(net, [*net.kd_feature_layers, net.kd_embedding_layer])
    x = torch.randint(0, 256, (4, *info.model_input), dtype=torch.uint8)  # raw images, as stored
    with torch.no_grad():
        out = taps.run(model, x)
    assert out.logits.shape == (4, 3)
    sizes = [out.features[n].shape[-1] for n in net.kd_feature_layers]
    assert all(a > b for a, b in zip(sizes, sizes[1:])), f"hint layers do not shrink: {sizes}"
    emb = embedding(out.features[net.kd_embedding_layer])
    assert emb.shape == (4, net.get_classifier().in_features)
    torch.testing.assert_close(emb, seen[0].reshape(4, -1))  # the representation the classifier sees


def test_a_vit_is_built_for_the_image_size_and_embeds_its_class_token_not_its_tokens():
    model, info = image_model("timm/vit_tiny_patch16_224")
    model.eval()
    net = model.net
    seen = classifier_input(net)
    taps = FeatureTaps(net, [*net.kd_feature_layers, net.kd_embedding_layer])
    with torch.no_grad():
        out = taps.run(model, torch.rand(2, *info.model_input))
    assert out.logits.shape == (2, 3)
    assert len(net.kd_feature_layers) == 4 and net.kd_feature_layers[-1] == "blocks.11"
    tokens = out.features["blocks.11"]
    assert tokens.shape == (2, (32 // 16) ** 2 + 1, 192)  # 2x2 patches and the class token
    e = out.features[net.kd_embedding_layer]
    assert e.shape == (2, 192), f"{net.kd_embedding_layer} gives {tuple(e.shape)}, not one vector per image"
    torch.testing.assert_close(e, seen[0])


def run_config(student: str, teacher: str, knowledge: list[dict], dataset: str = "test_images") -> dict:
    return {"dataset": {"name": dataset}, "student": {"name": student},
            "teacher": {"train": {"model": {"name": teacher}}}, "knowledge": knowledge}


def test_timm_teacher_and_student_pass_the_dry_run_with_logit_hint_and_relational_knowledge():
    from kdray.check import dry_run

    cfg = RunConfig.model_validate(run_config("timm/convnext_atto", "timm/resnet18",
                                              [{"type": "kd"}, {"type": "fitnet"}, {"type": "rkd"}]))
    report = dry_run(cfg)
    assert report.teacher == "timm/resnet18" and report.student == "timm/convnext_atto"
    assert report.teacher_shapes and report.student_shapes
    assert report.connectors, "fitnet's regressor between the two hint layers was not inferred"


def test_an_unknown_timm_name_fails_validation_suggesting_the_close_ones():
    with pytest.raises(ConfigError) as e:
        validate(RunConfig, run_config("timm/resnet181", "timm/resnet18", [{"type": "kd"}]), "run.yaml")
    assert "student.name" in str(e.value) and "Did you mean timm/resnet18," in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate(RunConfig, run_config("timm/resnet18", "timm/resnet18.a1_in1", [{"type": "kd"}]), "run.yaml")
    assert "teacher.train.model.name" in str(e.value) and "timm/resnet18.a1_in1k" in str(e.value)


def test_a_timm_model_on_a_non_image_data_set_is_refused_clearly():
    from kdray.check import dry_run

    cfg = RunConfig.model_validate({"dataset": {"name": "mnist1d"}, "student": {"name": "timm/resnet18"}})
    with pytest.raises(ConfigError) as e:
        dry_run(cfg)
    assert "timm models take images (C, H, W)" in str(e.value) and "student.name" in str(e.value)


def test_unknown_timm_options_are_config_errors_on_the_options():
    from kdray.check import dry_run

    cfg = RunConfig.model_validate({"dataset": {"name": "test_images"},
                                    "student": {"name": "timm/resnet18", "options": {"no_such_option": 1}}})
    with pytest.raises(ConfigError, match="no_such_option") as e:
        dry_run(cfg)
    assert "student.options" in str(e.value)


def test_a_record_round_trip_rebuilds_the_same_model():
    model, info = image_model("timm/resnet18", {"drop_rate": 0.1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # weights no fresh build has
    model.eval()
    record = model_record(model, model_name="timm/resnet18", model_options={"drop_rate": 0.1},
                          num_classes=info.num_classes, dataset={"name": "test_images"})
    again = model_from_record(record).eval()
    x = torch.randint(0, 256, (3, *info.model_input), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_pretrained_weights_are_loaded_and_the_record_rebuilds_without_them(tmp_path):
    import timm

    source = timm.create_model("resnet18", num_classes=1000)
    weights = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), weights)
    options = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(weights)}}  # a local file: no download
    model, info = image_model("timm/resnet18", options)
    torch.testing.assert_close(model.net.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert model.net.fc.out_features == 3
    model.eval()
    record = model_record(model, model_name="timm/resnet18", model_options=options,
                          num_classes=info.num_classes, dataset={"name": "test_images"})
    assert record["model_options"]["pretrained"] is False
    weights.unlink()
    again = model_from_record(record).eval()
    x = torch.rand(2, *info.model_input)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_pretrained_weights_offline_and_not_cached_fail_with_a_clear_message(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE and HF_HOME once, when imported: set the variables and its constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ValueError) as e:
        image_model("timm/resnet18", {"pretrained": True})
    msg = str(e.value)
    assert "pretrained weights of timm/resnet18" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "network" in msg and str(tmp_path / "hf" / "hub") in msg
    assert "pretrained: false" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_kdray_layers_prints_the_default_hint_layers_of_a_timm_model(capsys):
    from kdray.cli import main

    assert main(["layers", "timm/convnext_atto"]) == 0
    out = capsys.readouterr().out
    assert "timm/convnext_atto: default hint layers ['stages.0', 'stages.1', 'stages.2', 'stages.3']" in out
    rows = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()[1:] if line.strip()}
    assert rows["stages.3"] == "(320, 7, 7)"  # built for timm's own 224x224 input


def test_timm_names_resolve_lazily_and_say_how_to_install_timm(monkeypatch):
    from kdray.models import timm_zoo

    code = "import sys, kdray; from kdray import MODELS; assert 'timm' not in sys.modules; print(len(MODELS))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert MODELS.get("timm/convnext_atto").example_input == (3, 224, 224)
    assert MODELS.get("timm/mobilevit_xxs").example_input == (3, 256, 256)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ValueError, match=r"pip install timm \(or kdray\[hub\]\)"):
        timm_zoo.resolve("resnet34")
