"""Causal language models by name: ``hf-lm/<folder>`` for three families, their heads (scaling, soft-capping) against
the Hugging Face forward, records that rebuild without the folder, initialisation from the teacher's layers, and the
inputs ``kdray check`` refuses (blocks longer than the positions, another vocabulary)."""
from __future__ import annotations

import io

import pytest
import torch

from kdray.check import dry_run
from kdray.config import ConfigError, DatasetConfig, RunConfig
from kdray.data.lm_builtin import synthetic_tokenizer
from kdray.models import Preprocess, build_model, model_from_record, model_record
from kdray.models.hf_lm import HFCausalLM, init_from_teacher

PRE = Preprocess((12,), passthrough=True)
SIZES = {"layers": 4, "hidden": 32, "heads": 2}


def folder_of(tmp_path, family: str, vocab: int = 64, with_tokenizer: bool = True, **config):
    """A Hugging Face causal-LM folder written by save_pretrained (kdray's tiny model of that family), with the
    synthetic language's tokenizer when asked."""
    torch.manual_seed(0)
    model = build_model(f"tiny_{family}", vocab, PRE, {**SIZES, "config": config or None})
    path = tmp_path / family
    model.net.hf.save_pretrained(path)
    if with_tokenizer:
        from kdray.data.lm import load_tokenizer

        load_tokenizer(str(synthetic_tokenizer(DatasetConfig(name="synthetic_lm", data_dir=str(tmp_path)), vocab))
                       ).save_pretrained(path)
    return path, model


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_hf_lm_folders_build_and_match_the_hugging_face_forward(tmp_path, family):
    path, _ = folder_of(tmp_path, family)
    model = build_model(f"hf-lm/{path}", 64, PRE).eval()
    assert isinstance(model.net, HFCausalLM)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.net.hf(input_ids=x).logits.float()
        torch.testing.assert_close(model(x), want)
        s = model.states(x)
        torch.testing.assert_close(s.head.logits(s.hidden), want)


def test_a_soft_capping_family_keeps_its_cap_in_the_chunked_head(tmp_path):
    """Gemma 2 caps its logits (c · tanh(z / c)): the head kdray computes chunk by chunk does the same."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gemma2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                               final_logit_softcapping=2.0, max_position_embeddings=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gemma")
    model = build_model(f"hf-lm/{tmp_path / 'gemma'}", 64, PRE).eval()
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        s = model.states(x)
        z = s.head.logits(s.hidden)
        torch.testing.assert_close(z, model.net.hf(input_ids=x).logits.float(), rtol=1e-5, atol=1e-5)
    assert s.head.softcap == 2.0 and z.abs().max() <= 2.0


def test_a_record_rebuilds_without_the_folder(tmp_path):
    path, _ = folder_of(tmp_path, "llama")
    name = f"hf-lm/{path}"
    model = build_model(name, 64, PRE).eval()
    rec = model_record(model, model_name=name, model_options={}, num_classes=64, dataset={"name": "synthetic_lm"})
    buf = io.BytesIO()
    torch.save(rec, buf)
    import shutil

    shutil.rmtree(path)
    again = model_from_record(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)).eval()
    x = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert again.causal_lm


@pytest.mark.parametrize("mode,layers", [("every_other_layer", [0, 2]), ([0, 2, 3], [0, 2, 3]), ([3], [3])])
def test_init_from_teacher_keeps_the_chosen_layers(mode, layers):
    torch.manual_seed(0)
    teacher = build_model("tiny_llama", 64, PRE, SIZES)
    student = init_from_teacher(teacher, mode)
    assert student.hf.config.num_hidden_layers == len(layers)
    t_state, s_state = teacher.net.hf.state_dict(), student.hf.state_dict()
    for j, i in enumerate(layers):
        for key in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(s_state[f"model.layers.{j}.{key}"], t_state[f"model.layers.{i}.{key}"])
    assert torch.equal(s_state["model.embed_tokens.weight"], t_state["model.embed_tokens.weight"])
    assert torch.equal(s_state["model.norm.weight"], t_state["model.norm.weight"])


def test_init_from_teacher_refuses_layers_the_teacher_does_not_have():
    teacher = build_model("tiny_llama", 64, PRE, SIZES)
    with pytest.raises(ValueError, match=r"indices of the teacher's 4 layers"):
        init_from_teacher(teacher, [0, 4])


def run_cfg(**over):
    base = {"dataset": {"name": "synthetic_lm"}, "student": {"name": "tiny_llama", "options": {"layers": 1,
                                                                                              "hidden": 32,
                                                                                              "heads": 2}}}
    return RunConfig.model_validate({**base, **over})


def test_blocks_longer_than_the_models_positions_fail_at_check_naming_seq_len():
    cfg = run_cfg(dataset={"name": "synthetic_lm", "seq_len": 256},
                  student={"name": "tiny_llama", "options": {"layers": 1, "hidden": 32, "heads": 2,
                                                             "max_positions": 128}})
    with pytest.raises(ConfigError) as e:
        dry_run(cfg, file="run.yaml")
    assert e.value.fields == ["dataset.seq_len"] and "128 positions" in str(e.value)


def test_a_teacher_padded_to_more_rows_is_cut_to_the_tokenizers_ids_and_a_smaller_one_is_refused(tmp_path):
    """Models of one tokenizer are often padded apart (Qwen2.5-7B: 152 064 output rows, 0.5B: 151 936): the loss is over
    the tokenizer's ids, so an 80-row teacher distils into a 64-token student; a 48-row one cannot read the data."""
    path, _ = folder_of(tmp_path, "llama", vocab=80, with_tokenizer=False)
    report = dry_run(run_cfg(teacher={"name": f"hf-lm/{path}"}, knowledge=[{"type": "tkd"}]), file="run.yaml")
    assert report.teacher == f"hf-lm/{path}"
    teacher = build_model(f"hf-lm/{path}", 64, PRE)
    assert teacher.net.vocab == 64 and teacher.states(torch.zeros(1, 12, dtype=torch.long)).head.vocab == 64
    small, _ = folder_of(tmp_path / "s", "llama", vocab=48, with_tokenizer=False)
    with pytest.raises(ConfigError) as e:
        dry_run(run_cfg(teacher={"name": f"hf-lm/{small}"}, knowledge=[{"type": "tkd"}]), file="run.yaml")
    assert e.value.fields == ["teacher.name"] and "48 tokens" in str(e.value)


def test_a_model_whose_logits_kdray_cannot_reproduce_or_that_sees_later_tokens_is_refused(tmp_path):
    """A BERT-style model as a causal LM: its head transforms the hidden states before the decoder, and without
    is_decoder its attention sees later tokens; kdray's probe refuses it instead of training it silently wrong."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("bert", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError) as e:
        dry_run(run_cfg(student={"name": f"hf-lm/{tmp_path / 'bert'}"}), file="run.yaml")
    assert e.value.fields == ["student.name"] and "bert" in str(e.value)


def test_label_smoothing_is_refused_for_a_language_model():
    with pytest.raises(ConfigError) as e:
        dry_run(run_cfg(train={"label_smoothing": 0.1}), file="run.yaml")
    assert e.value.fields == ["train.label_smoothing"]


def test_a_model_whose_tokenizer_differs_from_the_datas_fails_at_check(tmp_path):
    """A checkpoint's own tokenizer with other ids than the data's would read other tokens than it learnt: a student
    of it is refused; a teacher of it is distilled by uld alone, token-level knowledge is refused naming the type."""
    path, _ = folder_of(tmp_path, "llama")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    other.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=other, unk_token="w0").save_pretrained(path)
    cfg = run_cfg(teacher={"name": f"hf-lm/{path}"}, knowledge=[{"type": "tkd"}])
    with pytest.raises(ConfigError) as e:
        dry_run(cfg, file="run.yaml")
    assert e.value.fields == ["knowledge.0.type"] and "another tokenizer" in str(e.value) and "uld" in str(e.value)
    with pytest.raises(ConfigError) as e:
        dry_run(run_cfg(student={"name": f"hf-lm/{path}"}), file="run.yaml")
    assert e.value.fields == ["dataset.tokenizer"] and "vocabulary differs" in str(e.value)


def test_a_teacher_whose_tokenizer_extends_the_datas_is_accepted_over_the_shared_prefix(tmp_path):
    """A teacher's vocabulary extended after the data's tokens (the same strings at the same ids, then its own):
    kdray reads the data's ids with it and distils over those, saying so; any other difference is refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path, _ = folder_of(tmp_path, "llama", vocab=72, with_tokenizer=False)
    extended = Tokenizer(models.WordLevel({**{f"t{i}": i for i in range(64)}, **{f"x{i}": 64 + i for i in range(8)}},
                                          unk_token="t0"))
    extended.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=extended, unk_token="t0").save_pretrained(path)
    report = dry_run(run_cfg(teacher={"name": f"hf-lm/{path}"}, knowledge=[{"type": "tkd"}]), file="run.yaml")
    assert any("shared vocabulary prefix" in line and "72 tokens" in line for line in report.lines())
    assert build_model(f"hf-lm/{path}", 64, PRE).net.vocab == 64
    shuffled = Tokenizer(models.WordLevel({**{f"t{i}": 71 - i for i in range(64)}, **{f"x{i}": i for i in range(8)}},
                                          unk_token="t0"))
    shuffled.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=shuffled, unk_token="t0").save_pretrained(path)
    with pytest.raises(ConfigError) as e:
        dry_run(run_cfg(teacher={"name": f"hf-lm/{path}"}, knowledge=[{"type": "tkd"}]), file="run.yaml")
    assert e.value.fields == ["knowledge.0.type"] and "not an extension" in str(e.value)


def test_a_classifier_student_on_language_model_data_fails_at_check():
    with pytest.raises(ConfigError) as e:
        dry_run(run_cfg(student={"name": "mlp"}), file="run.yaml")
    assert e.value.fields[0] in ("student.name",)


def test_text_data_takes_the_hf_lm_teachers_tokenizer_by_default(tmp_path):
    path, _ = folder_of(tmp_path, "llama")
    cfg = RunConfig.model_validate({"dataset": {"name": "text", "path": str(tmp_path / "x.jsonl")},
                                    "teacher": {"name": f"hf-lm/{path}"}, "student": {"name": "tiny_llama"},
                                    "knowledge": [{"type": "tkd"}]})
    assert cfg.dataset.options["tokenizer"] == str(path)


def test_logit_knowledge_and_dml_are_refused_for_language_models_naming_the_field():
    with pytest.raises(ConfigError) as e:
        dry_run(run_cfg(teacher={"train": {"model": {"name": "tiny_llama"}}}, knowledge=[{"type": "kd"}]),
                file="run.yaml")
    assert e.value.fields == ["knowledge.0.type"] and "tkd" in str(e.value)
    with pytest.raises(ConfigError) as e:
        dry_run(run_cfg(scheme={"type": "dml", "peers": [{"name": "tiny_llama"}]}), file="run.yaml")
    assert e.value.fields == ["scheme.type"]


def test_attention_taps_give_clean_causal_maps_and_the_fast_kernel_returns_after():
    """``attention.i`` of a causal LM: (B, heads, T, T) probabilities, rows summing to 1, nothing above the diagonal;
    the model switches to an attention function that returns maps only while such a tap is hooked."""
    from kdray.models import FeatureTaps

    torch.manual_seed(0)
    model = build_model("tiny_llama", 64, PRE, SIZES)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    taps = FeatureTaps(model.net, ["attention.1"])
    with torch.no_grad():
        out = taps.run(model, x, states=True)
    a = out.features["attention.1"]
    assert a.shape == (2, 2, 12, 12)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 12))
    assert (a.triu(1) == 0).all()
    taps.remove()
    with torch.no_grad():
        model.states(x)
    assert model.net.hf.config._attn_implementation == "sdpa"


def test_a_language_model_sweep_selects_on_nll_by_default_and_a_classifiers_cannot():
    from kdray.sweep.space import SearchSpace

    lm = SearchSpace.model_validate({"name": "x", "base": {"dataset": {"name": "synthetic_lm"},
                                                         "student": {"name": "tiny_llama"}}})
    assert (lm.metric, lm.mode, lm.objectives) == ("val_nll", "min", ["val_nll"])
    with pytest.raises(ConfigError) as e:
        SearchSpace.model_validate({"name": "x", "metric": "val_nll", "base": {"dataset": {"name": "mnist1d"},
                                                                               "student": {"name": "mnist1d_mlp"}}})
    assert e.value.fields == ["metric"]
