"""``teacher.serve``: what a teacher actor answers (its top-k per position against the Hugging Face forward's own
logits) and the configurations ``kdray check`` refuses with it, naming the field."""
from __future__ import annotations

import pytest
import torch

from kdray.cache.served import TeacherServer
from kdray.check import dry_run
from kdray.config import ConfigError, RunConfig
from kdray.models import Preprocess, build_model, model_record

TINY = {"layers": 1, "hidden": 32, "heads": 2}


@pytest.mark.parametrize("chunk", [None, 5], ids=["one-chunk", "chunks-of-5"])
def test_an_actor_answers_each_position_with_its_top_k_and_the_exact_rest(chunk, monkeypatch):
    """Run as a plain object (the actor's class): the top 5 of the model's own log-softmax, largest first, their
    ids, and log(1 - their mass) for the rest; the same when the positions go through in chunks of 5 (a large
    vocabulary's chunks), joined back in order."""
    if chunk:
        import kdray.cache.served as served

        monkeypatch.setattr(served, "chunk_tokens", lambda vocab, requested=None, device=None: chunk)
    torch.manual_seed(0)
    teacher = build_model("tiny_llama", 40, Preprocess((12,), passthrough=True), TINY).eval()
    rec = model_record(teacher, model_name="tiny_llama", model_options=TINY, num_classes=40, dataset={})
    server = TeacherServer([rec], {}, use_gpu=False)
    x = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(1))
    lp, idx, rest = server.top_k(x.numpy(), 5)
    with torch.no_grad():
        want = torch.log_softmax(teacher.net.hf(input_ids=x).logits.double(), -1)
    assert lp.shape == (3, 12, 5) and idx.shape == (3, 12, 5) and rest.shape == (3, 12)
    top = want.topk(5, dim=-1)
    assert (torch.from_numpy(idx) == top.indices).all()
    torch.testing.assert_close(torch.from_numpy(lp).double(), top.values, atol=1e-5, rtol=0)
    mass = top.values.exp().sum(-1)
    torch.testing.assert_close(torch.from_numpy(rest).double(), torch.log1p(-mass), atol=1e-4, rtol=0)
    assert server.stats() == {"served_batches": 1} and server.vocab() == 40


def lm_cfg(**over) -> RunConfig:
    base = {"dataset": {"name": "synthetic_lm"}, "teacher": {"name": "tiny_llama", "options": TINY, "serve": {}},
            "student": {"name": "tiny_llama", "options": TINY}, "knowledge": [{"type": "tkd"}],
            "cache": {"top_k": 8}}
    return RunConfig.model_validate({**base, **over})


@pytest.mark.parametrize("over,field,words", [
    ({"cache": {}}, "cache.top_k", "top_k"),
    ({"knowledge": [{"type": "fitnet"}]}, "knowledge.0.type", "top-k"),
    ({"scheme": {"type": "seq_kd"}}, "scheme.type", "served"),
    ({"scheme": {"type": "on_policy", "lmbda": 0.5}}, "scheme.type", "served"),
    ({"student": {"name": "tiny_llama", "options": TINY, "init_from_teacher": [0]}}, "student.init_from_teacher",
     "actors"),
    ({"dataset": {"name": "mnist1d"}, "student": {"name": "mlp"},
      "teacher": {"name": "mlp", "serve": {}}, "knowledge": [{"type": "kd"}]}, "teacher.serve", "language model"),
])
def test_check_refuses_what_a_served_teacher_cannot_answer(over, field, words):
    with pytest.raises(ConfigError) as e:
        dry_run(lm_cfg(**over), file="run.yaml")
    assert e.value.fields == [field] and words in str(e.value), str(e.value)


def test_check_accepts_token_terms_from_a_served_teacher():
    assert dry_run(lm_cfg(), file="run.yaml").knowledge == "tkd"
