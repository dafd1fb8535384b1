"""Hugging Face transformers as kdray models (``hf/<folder>``): tiny configs saved to tmp folders, no network."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys

import pydantic
import pytest
import torch

pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification  # noqa: E402

from kdray.config import ModelConfig  # noqa: E402
from kdray.knowledge import DistillObjective, ModelLayout  # noqa: E402
from kdray.models import (  # noqa: E402
    MODELS,
    Classifier,
    FeatureTaps,
    Preprocess,
    Teacher,
    build_model,
    model_from_record,
    model_record,
)
from kdray.models.hf import HFClassifier, init_from_teacher  # noqa: E402

T = 16  # tokens per sequence
PRE = Preprocess((T,), passthrough=True)


def tiny_bert(**over) -> BertConfig:
    # initializer_range 0.5: a random model whose outputs visibly depend on every token it attends to
    kw = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=100,
              max_position_embeddings=64, initializer_range=0.5)
    return BertConfig(**{**kw, **over})


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert") / "tiny-bert"
    BertForSequenceClassification(tiny_bert(num_labels=3)).save_pretrained(path)
    return path


def ids(b: int = 3, lengths: list[int] | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 100, (b, T), generator=g)
    for i, n in enumerate(lengths or []):
        x[i, n:] = 0  # BERT's pad id
    return x


def run_taps(model: Classifier, x: torch.Tensor, names: list[str]):
    taps = FeatureTaps(model.net, names)
    try:
        return taps.run(model, x)
    finally:
        taps.remove()


def test_hf_folder_validates_builds_and_gives_logits_on_token_ids(bert_dir):
    name = f"hf/{bert_dir}"  # hf//abs/path
    assert ModelConfig(name=name).name == name
    spec = MODELS.get(name)
    assert (spec.family, spec.example_input, spec.example_dtype) == ("transformers", (16,), "int64")
    model = build_model(name, 5, PRE).eval()
    assert isinstance(model.net, HFClassifier)
    assert model(ids()).shape == (3, 5)
    layout = ModelLayout.of(model)
    assert layout.feature_layers == ("hidden.1", "hidden.2", "hidden.3", "hidden.4")
    assert layout.embedding_layer == "pooled"
    assert layout.attention_layers == tuple(f"attention.{i}" for i in range(4))
    assert layout.value_layers == tuple(f"value.{i}" for i in range(4))


def test_pretrained_weights_are_loaded_and_a_relative_path_works(bert_dir, monkeypatch):
    monkeypatch.chdir(bert_dir.parent)
    model = build_model(f"hf/./{bert_dir.name}", 3, PRE)
    ref = BertForSequenceClassification.from_pretrained(bert_dir)
    assert torch.equal(model.net.hf.bert.encoder.layer[2].output.dense.weight,
                       ref.bert.encoder.layer[2].output.dense.weight)
    assert torch.equal(model.net.hf.classifier.weight, ref.classifier.weight)  # 3 labels: the saved head is kept
    fresh = build_model(f"hf/./{bert_dir.name}", 3, PRE, {"pretrained": False, "config": {"num_hidden_layers": 2}})
    assert len(fresh.net.hf.bert.encoder.layer) == 2 and len(fresh.net.hidden) == 3


def test_padding_is_masked(bert_dir):
    model = build_model(f"hf/{bert_dir}", 3, PRE).eval()
    x = ids(3, [16, 9, 4])
    with torch.no_grad():
        logits = model(x)
        for i, n in enumerate([16, 9, 4]):  # each padded row predicts as its real tokens alone
            alone = Classifier(Preprocess((n,), passthrough=True), model.net)(x[i:i + 1, :n])
            torch.testing.assert_close(logits[i:i + 1], alone, rtol=1e-5, atol=1e-6)
        unmasked = model.net.hf(input_ids=x).logits  # the same ids, padding attended to: different logits
    assert not torch.allclose(unmasked[1:], logits[1:], atol=1e-4)


def test_taps_have_the_documented_shapes_and_values(bert_dir):
    model = build_model(f"hf/{bert_dir}", 3, PRE).eval()
    x = ids(2, [16, 10])
    out = run_taps(model, x, ["hidden.2", "hidden.4", "attention.1", "value.3", "pooled"])
    f = out.features
    assert f["hidden.2"].shape == (2, 32, T)  # channels-first token sequences
    assert f["attention.1"].shape == (2, 4, T, T)
    assert f["value.3"].shape == (2, T, 32)
    assert f["pooled"].shape == (2, 32)
    with torch.no_grad():
        hf = model.net.hf.bert(input_ids=x, attention_mask=(x != 0).long())
        value = model.net.hf.bert.encoder.layer[3].attention.self.value
        layer3_in = model.net.hf.bert(input_ids=x, attention_mask=(x != 0).long(),
                                      output_hidden_states=True).hidden_states[3]
    torch.testing.assert_close(f["hidden.4"], hf.last_hidden_state.transpose(1, 2))
    torch.testing.assert_close(f["pooled"], hf.last_hidden_state[:, 0])
    torch.testing.assert_close(f["value.3"], value(layer3_in))
    torch.testing.assert_close(f["attention.1"].sum(-1), torch.ones(2, 4, T))
    assert f["attention.1"][1, :, :, 10:].abs().max() == 0  # padded keys get no attention


def test_attention_taps_are_taken_before_attention_dropout(bert_dir):
    model = build_model(f"hf/{bert_dir}", 3, PRE, {"config": {"attention_probs_dropout_prob": 0.5}}).train()
    att = run_taps(model, ids(2), ["attention.0"]).features["attention.0"]
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 4, T))  # dropout would zero entries, rows would not sum to 1
    assert (att > 0).all()
    torch.manual_seed(0)
    a = model(ids(2))
    torch.manual_seed(1)
    assert not torch.allclose(a, model(ids(2)))  # the forward pass itself still drops attention out


def test_plain_forward_requests_no_hidden_states_or_attentions(bert_dir):
    model = build_model(f"hf/{bert_dir}", 3, PRE).eval()
    seen = []
    model.net.hf.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    model(ids())
    run_taps(model, ids(), ["hidden.1"])
    run_taps(model, ids(), ["attention.0"])
    assert seen == [{"input_ids", "attention_mask"}, {"input_ids", "attention_mask", "output_hidden_states"},
                    {"input_ids", "attention_mask", "output_attentions"}]


def test_record_round_trip_after_the_folder_is_deleted(bert_dir, tmp_path):
    """The weights and the whole config travel in the record (this process has already resolved the name)."""
    folder = tmp_path / "copy"
    shutil.copytree(bert_dir, folder)
    name = f"hf/{folder}"
    model = build_model(name, 3, PRE, {"config": {"num_hidden_layers": 3}}).eval()
    rec = model_record(model, model_name=name, model_options={"config": {"num_hidden_layers": 3}}, num_classes=3,
                       dataset={"name": "text"}, raw_input={"shape": [T], "dtype": "int64"})
    buf = io.BytesIO()
    torch.save(rec, buf)
    shutil.rmtree(folder)
    rec = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)  # plain values only
    assert rec["model_options"]["pretrained"] is False and rec["model_options"]["hf_config"]["num_hidden_layers"] == 3
    again = model_from_record(rec).eval()
    x = ids(4, [16, 12, 5, 1])
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_record_rebuilds_in_a_fresh_process_without_the_folder(bert_dir, tmp_path):
    folder = tmp_path / "gone"
    shutil.copytree(bert_dir, folder)
    name = f"hf/{folder}"
    model = build_model(name, 3, PRE)
    rec = model_record(model, model_name=name, model_options={}, num_classes=3, dataset={})
    shutil.rmtree(folder)
    MODELS._resolved.pop(name, None)  # what a fresh process (a Ray worker) starts from
    model_from_record(rec)


@pytest.mark.parametrize("layers", [4, 5])
def test_init_from_teacher_keeps_every_other_layer(bert_dir, layers):
    opts = {} if layers == 4 else {"pretrained": False, "config": {"num_hidden_layers": 5}}
    teacher = build_model(f"hf/{bert_dir}", 3, PRE, opts).eval()
    student = init_from_teacher(Teacher([teacher]).members[0], "every_other_layer").eval()
    t, s = teacher.net.hf, student.hf
    keep = list(range(0, layers, 2))
    assert len(s.bert.encoder.layer) == len(keep) == -(-layers // 2) and len(student.hidden) == len(keep) + 1
    for j, i in enumerate(keep):
        for (kt, vt), (ks, vs) in zip(t.bert.encoder.layer[i].state_dict().items(),
                                      s.bert.encoder.layer[j].state_dict().items()):
            assert kt == ks and torch.equal(vt, vs)
    for part in ("bert.embeddings", "bert.pooler", "classifier"):
        for (kt, vt), (ks, vs) in zip(t.get_submodule(part).state_dict().items(),
                                      s.get_submodule(part).state_dict().items()):
            assert kt == ks and torch.equal(vt, vs)
    x = ids(2)  # no padding: no mask needed in the manual forward
    with torch.no_grad():  # independent check: teacher embeddings, its layers 0, 2 (, 4), its pooler and head
        h = t.bert.embeddings(input_ids=x)
        for i in keep:
            h = t.bert.encoder.layer[i](h)
            h = h[0] if isinstance(h, tuple) else h
        manual = t.classifier(t.bert.pooler(h))
        torch.testing.assert_close(Classifier(PRE, student)(x), manual)
    rec = model_record(Classifier(PRE, student), model_name=f"hf/{bert_dir}", model_options={}, num_classes=3,
                       dataset={})
    assert rec["model_options"]["hf_config"]["num_hidden_layers"] == len(keep)
    assert len(model_from_record(rec).net.hf.bert.encoder.layer) == len(keep)
    assert len(init_from_teacher(teacher.net).hf.bert.encoder.layer) == len(keep)  # an HFClassifier directly
    with pytest.raises(ValueError, match="needs a Hugging Face teacher"):
        init_from_teacher(torch.nn.Linear(2, 2))


def test_fitnet_attn_and_minilm_between_two_hf_models_of_different_widths(bert_dir):
    teacher = Teacher([build_model(f"hf/{bert_dir}", 3, PRE)])
    student = build_model(f"hf/{bert_dir}", 3, PRE, {"pretrained": False, "config": {
        "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}}).train()
    obj = DistillObjective.from_specs([{"type": "fitnet"}, {"type": "attn"}, {"type": "minilm"}, {"type": "at"}],
                                      ModelLayout.of(teacher.members[0]), ModelLayout.of(student))
    assert obj.knowledge["attn"].teacher_layers == ["attention.1", "attention.3"]
    x, y = ids(4, [16, 11, 6, 3]), torch.tensor([0, 1, 2, 0])
    teacher.tap(obj.teacher_layers)
    t_out = teacher(x)
    s_out = run_taps(student, x, obj.student_layers)
    obj.bind(t_out.features, s_out.features)
    reg = obj.knowledge["fitnet"].regressor
    assert reg.kind == "conv1x1" and isinstance(reg.proj, torch.nn.Conv1d) and reg.proj.kernel_size == (1,)
    assert (reg.student_shape, reg.teacher_shape) == ((16, T), (32, T))
    terms = obj(s_out, t_out, y)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in terms.values())
    terms["loss"].backward()
    assert student.net.hf.bert.encoder.layer[0].attention.self.value.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit") / "tiny-vit"
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64,
                                            num_channels=3)).save_pretrained(path)
    return path


def test_a_vit_image_model_builds_and_taps(vit_dir):
    name = f"hf/{vit_dir}"
    spec = MODELS.get(name)
    assert (spec.example_input, spec.example_dtype) == ((3, 32, 32), "float32")
    model = build_model(name, 10, Preprocess((3, 32, 32), mean=[0.5] * 3, std=[0.25] * 3)).eval()
    x = torch.rand(2, 3, 32, 32)
    out = run_taps(model, x, ["hidden.2", "attention.1", "value.1", "pooled"])
    assert out.logits.shape == (2, 10)
    shapes = {k: tuple(v.shape) for k, v in out.features.items()}
    assert shapes == {"hidden.2": (2, 32, 17), "attention.1": (2, 2, 17, 17), "value.1": (2, 17, 32), "pooled": (2, 32)}
    assert ModelLayout.of(model).feature_layers == ("hidden.1", "hidden.2")
    obj = DistillObjective.from_specs([{"type": "minilm"}, {"type": "attn"}], ModelLayout.of(model),
                                      ModelLayout.of(model))
    same = run_taps(model, x, obj.student_layers)
    assert obj(same, same, torch.tensor([0, 1]))["minilm"].item() == pytest.approx(0.0, abs=1e-6)


def test_unknown_or_incomplete_folders_are_clear_config_errors(tmp_path):
    with pytest.raises(pydantic.ValidationError, match="there is no folder"):
        ModelConfig(name=f"hf/{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pydantic.ValidationError, match="has no config.json"):
        ModelConfig(name=f"hf/{tmp_path / 'empty'}")
    assert f"hf/{tmp_path / 'nope'}" not in MODELS


def test_an_unreachable_hub_id_says_it_needs_the_network(monkeypatch):
    import transformers

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(pydantic.ValidationError, match="OSError: We couldn't connect.*needs network access"):
        ModelConfig(name="hf/some-org/some-model")


def test_a_text_model_refuses_images(bert_dir):
    with pytest.raises(ValueError, match="is a text model"):
        build_model(f"hf/{bert_dir}", 3, Preprocess((3, 8, 8)))
    with pytest.raises(ValueError, match="has no field 'num_hidden_layer'"):
        build_model(f"hf/{bert_dir}", 3, PRE, {"config": {"num_hidden_layer": 2}})


def test_importing_kdray_does_not_import_transformers():
    code = "import sys, kdray, kdray.models, kdray.knowledge; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_config_override_that_reinitialises_pretrained_tensors_is_refused_naming_them(bert_dir, caplog):
    """intermediate_size 64 -> 48 no longer fits the checkpoint's feed-forward weights: transformers re-initialises
    them at random (ignore_mismatched_sizes). Refused unless allow_reinit, and the tensors are named either way."""
    import logging

    with pytest.raises(ValueError, match=r"12 pretrained tensors are re-initialised.*intermediate_size.*"
                                         r"bert\.encoder\.layer\.0\.intermediate\.dense\.weight.*allow_reinit: true"):
        build_model(f"hf/{bert_dir}", 3, PRE, {"config": {"intermediate_size": 48}})
    with caplog.at_level(logging.WARNING, logger="kdray"):
        model = build_model(f"hf/{bert_dir}", 3, PRE, {"config": {"intermediate_size": 48}, "allow_reinit": True})
    assert model.net.hf.bert.encoder.layer[0].intermediate.dense.weight.shape == (48, 32)
    assert "re-initialised" in caplog.text and "allow_reinit: true" in caplog.text
    # Overrides that keep every pretrained tensor (fewer layers) and the new head for 5 classes are fine.
    build_model(f"hf/{bert_dir}", 5, PRE, {"config": {"num_hidden_layers": 2}})
