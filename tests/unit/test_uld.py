"""``uld`` (Boizard et al. 2024) for teachers of another tokenizer: the loss against values worked by hand and against
the authors' conventions (sorted probabilities, zero-padded vocabulary, mean over the shorter answer, then over rows),
the rows re-read in the teacher's tokens, a real teacher whose vocabulary is another numbering of the student's
distilled through the whole path, and what ``kdray check`` accepts and refuses."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_helpers import renumbered_teacher

from kdray.check import dry_run
from kdray.config import ConfigError, DatasetConfig, RunConfig
from kdray.data import load_dataset
from kdray.data.lm_tasks import ID, VOCAB, layout, make_rows, task_tokenizer, to_blocks
from kdray.data.retokenize import retokenize
from kdray.knowledge import TapOutputs
from kdray.knowledge.token import LMHead, TokenStates
from kdray.knowledge.uld import ULD, AlignedTokens

TINY = {"layers": 1, "hidden": 32, "heads": 2}


def logits(*probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_the_loss_is_the_l1_between_sorted_probabilities_averaged_over_the_shorter_answer_then_the_rows():
    """By hand. Row 0, one aligned token: student (.5 .3 .2), teacher (.1 .9) -> sorted (.9 .1 0): |.5-.9| + |.3-.1|
    + |.2-0| = 0.8. Row 1, two: (.2 .5 .3) vs (.5 .5) -> 0 + .2 + .2 = 0.4; (1/3 1/3 1/3) vs (.25 .75) -> 5/12 + 1/12
    + 1/3 = 5/6; its mean 0.6167. Row 2 has no answer and is left out: (0.8 + 0.6167) / 2."""
    z_s = torch.stack([logits([.5, .3, .2], [.2, .3, .5]), logits([.2, .5, .3], [1 / 3, 1 / 3, 1 / 3]),
                       logits([.6, .2, .2], [.6, .2, .2])])
    z_t = torch.stack([logits([.1, .9], [.5, .5]), logits([.5, .5], [.25, .75]), logits([.5, .5], [.5, .5])])
    got = ULD()(z_s, z_t, torch.tensor([1, 2, 0]))
    assert float(got) == pytest.approx((0.8 + (0.4 + 5 / 6) / 2) / 2, abs=1e-12)


def test_student_and_teacher_temperatures_are_separate():
    """Teacher (.25 .75) at T = 2: softmax(log(.25, .75) / 2) = (1, √3) / (1 + √3); against a uniform student the L1
    is 2 (√3 / (1 + √3) - 1/2)."""
    z_s, z_t = logits([[.5, .5]]), logits([[.25, .75]])
    got = ULD(teacher_temperature=2.0)(z_s, z_t, torch.tensor([1]))
    r3 = math.sqrt(3)
    assert float(got) == pytest.approx(2 * (r3 / (1 + r3) - 0.5), abs=1e-12)
    assert float(ULD(student_temperature=2.0)(z_t, z_s, torch.tensor([1]))) == pytest.approx(float(got), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(2, 9), st.integers(0, 2**31 - 1), st.floats(0.5, 8.0))
def test_a_teacher_that_numbers_the_same_distribution_otherwise_costs_nothing(rows, length, vocab, seed, scale):
    """Sorting needs no map between vocabularies: a teacher whose logits are the student's under any renumbering of
    the tokens (confident or flat: ``scale``) gives 0, and a renumbered teacher the same loss as the original."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, length, vocab, generator=g, dtype=torch.float64) * scale
    perm = torch.randperm(vocab, generator=g)
    n = torch.randint(0, length + 1, (rows,), generator=g)
    assert float(ULD()(z, z[..., perm], n)) == pytest.approx(0.0, abs=1e-12)
    other = torch.randn(rows, length, vocab + 3, generator=g, dtype=torch.float64) * scale
    perm2 = torch.randperm(vocab + 3, generator=g)
    assert float(ULD()(z, other[..., perm2], n)) == pytest.approx(float(ULD()(z, other, n)), abs=1e-12)


def test_compute_aligns_each_models_answer_from_its_own_start_and_trains_the_student_only():
    """From hidden states and heads: the student's answer starts at its first target, the teacher's where its rows
    say; positions past the shorter answer and rows without targets do not count; no gradient reaches the teacher."""
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 6, 4, generator=g, requires_grad=True)
    ws = torch.randn(5, 4, generator=g, requires_grad=True)
    ht, wt = torch.randn(2, 7, 3, generator=g), torch.randn(4, 3, generator=g, requires_grad=True)
    target = torch.full((2, 6), -100)
    target[0, 2:5] = 1  # student answer: positions 2, 3, 4
    target[1, 1:6] = 1  # positions 1..5
    start, size = torch.tensor([4, 0]), torch.tensor([2, 6])  # teacher: 2 tokens from 4; 6 from 0
    got = ULD().compute(TapOutputs(TokenStates(hs, LMHead(ws)), {}),
                        TapOutputs(AlignedTokens(ht, LMHead(wt), start, size), {}), target)
    zs, zt = hs @ ws.T, (ht @ wt.T).detach()
    want0 = ULD()(zs[0:1, 2:4], zt[0:1, 4:6], torch.tensor([2]))  # min(3, 2) = 2 tokens
    want1 = ULD()(zs[1:2, 1:6], zt[1:2, 0:5], torch.tensor([5]))  # min(5, 6) = 5 tokens
    torch.testing.assert_close(got, (want0 + want1) / 2)
    got.backward()
    assert hs.grad is not None and ws.grad is not None and wt.grad is None


def pair_tokenizer(singles_first: bool = True):
    """A tokenizer that reads two characters at a time: 17 + 17² tokens; ``.`` (alone) its end token, ``_`` its
    padding. ``singles_first``: the data's 17 characters keep their ids (an extension of the data's vocabulary);
    else the pairs come first (another vocabulary)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pairs = [a + b for a in VOCAB for b in VOCAB]
    pieces = list(VOCAB) + pairs if singles_first else pairs + list(VOCAB)
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="_"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("..?"), "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="_", eos_token=".", pad_token="_")
    roles = {r: getattr(fast, r) for r in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    return fast, pieces, {"pad": fast.pad_token_id, **roles}


def test_rows_are_re_read_in_the_teachers_tokens_with_their_answers_found(tmp_path):
    """``A12+34=`` then ``046.``: read two characters at a time the prompt is A1 2+ 34 =; the answer's text 04 6 and
    the data's end token ``.`` becomes the teacher's own end token (never text); the teacher reads the prompt and the
    answer but its last token (only predicted), its answer predicted from the logits of ``=`` (position 3), three
    tokens long."""
    from kdray.data.lm import load_tokenizer

    data_tok = load_tokenizer(str(task_tokenizer(DatasetConfig(name="lm_tasks", data_dir=str(tmp_path)))))
    row = np.array([[ID[c] for c in "A12+34=046."]])
    x, y = to_blocks(row, 7)
    teacher, pieces, spec = pair_tokenizer()
    rows = retokenize(x, y, data_tok, teacher, spec)
    assert [pieces[i] for i in rows.ids[0]] == ["A1", "2+", "34", "=", "04", "6"]
    assert rows.start.tolist() == [3] and rows.size.tolist() == [3]
    opts = {"tasks": ["add", "sort"], "digits": 2, "items": 4, "seed": 3}
    p, _ = layout(opts)  # sort's body of 4 digits is shorter than add's 5 characters: left-padded
    x, y = to_blocks(make_rows(20, opts, 0), p)
    rows = retokenize(x, y, data_tok, teacher, spec)
    for i in range(20):  # every row: padding token by token, then the prompt's characters in pairs, then the answer's
        prompt = "".join(VOCAB[t] for t in x[i, :p])
        body = prompt.lstrip("_")
        answer = "".join(VOCAB[t] for t in y[i][y[i] != -100])
        assert answer.endswith(".") and "." not in answer[:-1]
        want_p = ["_"] * (len(prompt) - len(body)) + [body[j:j + 2] for j in range(0, len(body), 2)]
        want_a = [answer[:-1][j:j + 2] for j in range(0, len(answer) - 1, 2)] + ["."]
        got = [pieces[t] for t in rows.ids[i, :len(want_p) + len(want_a) - 1]]
        assert got == want_p + want_a[:-1], (prompt, answer, got)
        assert (rows.start[i], rows.size[i]) == (len(want_p) - 1, len(want_a))
    with pytest.raises(ValueError, match="more than its 3 positions"):
        retokenize(x, y, data_tok, teacher, spec, max_len=3)
    two = y.copy()
    two[0, p] = -100  # a hole in the first row's answer: two spans
    with pytest.raises(ValueError, match="more than one answer"):
        retokenize(x, two, data_tok, teacher, spec)


def word_tokenizer(words: list[str], bos: bool):
    """A SentencePiece-style word tokenizer (``▁`` marks a space), with ``</s>`` its end token and ``<s>`` its
    beginning when ``bos``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "</s>"] + (["<s>"] if bos else [])
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                   **({"bos_token": "<s>"} if bos else {}))
    return fast, {"pad": 1, **{r: getattr(fast, r) for r in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                             "unk_token_id")}}


def test_a_sentencepiece_answer_keeps_its_space_and_the_teacher_gets_its_own_beginning_and_end():
    """The answer ``▁Paris`` decoded alone would lose its space (``Paris``, another token); read as the continuation
    of its prompt it keeps it. The data's end token becomes the teacher's, and the teacher's rows start with its own
    beginning-of-text token, as the reference's ``bos + prompt``."""
    data, _ = word_tokenizer(["▁The", "▁capital", "▁is", "▁Paris"], bos=False)
    teacher, spec = word_tokenizer(["▁is", "▁Paris", "▁capital", "▁The", "Paris"], bos=True)
    ids = [data.convert_tokens_to_ids(t) for t in ["▁The", "▁capital", "▁is", "▁Paris", "</s>"]]
    x, y = np.array([ids[:-1]]), np.array([[-100, -100, ids[3], ids[4]]])
    rows = retokenize(x, y, data, teacher, spec)
    read = teacher.convert_ids_to_tokens(rows.ids[0].tolist())
    assert read == ["<s>", "▁The", "▁capital", "▁is", "▁Paris"]
    assert rows.start.tolist() == [3] and rows.size.tolist() == [2]  # ▁Paris, </s>


def test_a_renumbered_teacher_through_the_whole_path_gives_the_loss_of_the_original_on_the_datas_tokens(tmp_path):
    """kdray's path: the teacher's record with its own tokenizer, the rows re-read in it, the teacher run on them,
    the answers aligned. Computed independently: the original network on the data's own tokens, each row's targets,
    the sorted-probability L1 in plain torch. Equal, since renumbering changes nothing but the ids."""
    from kdray.cache import TeacherOutputs
    from kdray.models import Preprocess, Teacher, build_model
    from kdray.teachers import load_teacher_records

    dataset = {"name": "lm_tasks", "options": {"train_examples": 60, "test_examples": 10}, "data_dir": str(tmp_path)}
    data = load_dataset(DatasetConfig.model_validate(dataset))
    original, folder = renumbered_teacher(tmp_path, data.info)
    cfg = RunConfig.model_validate({"dataset": dataset, "teacher": {"name": f"hf-lm/{folder}"},
                                    "student": {"name": "tiny_llama", "options": TINY},
                                    "knowledge": [{"type": "uld"}]})
    records = load_teacher_records(cfg)
    assert records[0]["tokenizer"]["vocab"] == len(VOCAB)
    teacher = Teacher.from_records(records)
    out = TeacherOutputs.create(teacher, None, records, data, [], torch.device("cpu"))
    assert out.cross and "own tokenizer" in out.reason
    torch.manual_seed(1)
    student = build_model("tiny_llama", len(VOCAB), Preprocess(data.info.input_shape, passthrough=True), TINY).eval()
    idx = torch.arange(8)
    x, y = data.train.x[idx], data.train.y[idx]
    with torch.no_grad():
        got = ULD().compute(TapOutputs(student.net.states(x), {}), out(idx, x), y)
        zs, zt = student(x).double(), original(x).double()
    per_row = []
    for i in range(len(x)):
        pos = (y[i] != -100).nonzero().flatten()
        q = zs[i, pos].softmax(-1).sort(-1, descending=True).values
        p = zt[i, pos].softmax(-1).sort(-1, descending=True).values
        per_row.append((q - p).abs().sum(-1).mean())
    assert float(got) == pytest.approx(float(torch.stack(per_row).mean()), rel=1e-5)
    assert float(got) > 0.01  # two different networks: not a loss that is 0 whatever it compares


def test_check_takes_uld_alone_for_a_teacher_of_another_tokenizer_and_says_so(tmp_path):
    dataset = {"name": "lm_tasks", "options": {"train_examples": 60, "test_examples": 10}, "data_dir": str(tmp_path)}
    info = load_dataset(DatasetConfig.model_validate(dataset)).info
    _, folder = renumbered_teacher(tmp_path, info)

    def cfg(**over):
        return RunConfig.model_validate({"dataset": dataset, "teacher": {"name": f"hf-lm/{folder}"},
                                         "student": {"name": "tiny_llama", "options": TINY},
                                         "knowledge": [{"type": "uld"}], **over})

    report = dry_run(cfg(), file="run.yaml")
    assert any("own tokenizer" in line and "uld" in line for line in report.lines())
    dry_run(cfg(knowledge=[]), file="run.yaml")  # a sweep's "none" trials: the teacher is unused, nothing to refuse
    for over, field in (({"knowledge": [{"type": "uld"}, {"type": "tkd"}]}, "knowledge.1.type"),
                        ({"knowledge": [{"type": "fitnet"}]}, "knowledge.0.type"),
                        ({"scheme": {"type": "seq_kd"}, "knowledge": [{"type": "uld"}]}, "scheme.type"),
                        ({"scheme": {"type": "born_again", "generations": 2}}, "scheme.type"),
                        ({"dataset": {"name": "synthetic_lm", "data_dir": str(tmp_path)}}, "dataset")):
        with pytest.raises(ConfigError) as e:
            dry_run(cfg(**over), file="run.yaml")
        assert e.value.fields == [field] and "another tokenizer" in str(e.value), (over, str(e.value))
    # uld with a teacher of the data's own tokenizer: tkd compares exactly; refused naming the type
    with pytest.raises(ConfigError) as e:
        dry_run(cfg(teacher={"name": "tiny_llama", "options": TINY}), file="run.yaml")
    assert e.value.fields == ["knowledge.0.type"] and "tkd" in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_under_autocast_the_heads_and_the_loss_run_in_float32(dtype):
    """The states come out of an autocast forward in low precision; the heads' matmuls and the loss must not run in
    it too (a bf16 head moves confident probabilities by about 1 %): the value is the float32 one on those states."""
    g = torch.Generator().manual_seed(3)
    hs, ht = (8 * torch.randn(4, 10, 32, generator=g)).to(dtype), (8 * torch.randn(4, 10, 32, generator=g)).to(dtype)
    ws, wt = torch.randn(50, 32, generator=g), torch.randn(40, 32, generator=g)
    target = torch.randint(0, 50, (4, 10), generator=g)
    target[:, :3] = -100
    s = TapOutputs(TokenStates(hs, LMHead(ws)), {})
    t = TapOutputs(AlignedTokens(ht, LMHead(wt), torch.full((4,), 2), torch.full((4,), 7)), {})
    with torch.autocast("cpu", dtype=dtype):
        low = ULD().compute(s, t, target)
    ref = ULD().compute(TapOutputs(TokenStates(hs.float(), LMHead(ws)), {}),
                        TapOutputs(AlignedTokens(ht.float(), LMHead(wt), t.logits.start, t.logits.size), {}), target)
    assert low.dtype == torch.float32 and float(low) == pytest.approx(float(ref), rel=1e-6)


def test_a_teacher_with_a_larger_vocabulary_keeps_it_and_is_compared_over_its_own_tokens(tmp_path):
    """A teacher that reads two characters at a time (306 tokens against the data's 17): its record keeps its own
    vocabulary, the live teacher's head has 306 rows, and uld over the batch equals the sorted-probability L1
    computed from the Hugging Face model's own logits on its rows, each model's answer aligned from its start."""
    from kdray.cache import TeacherOutputs
    from kdray.models import Preprocess, Teacher, build_model
    from kdray.teachers import load_teacher_records

    dataset = {"name": "lm_tasks", "options": {"train_examples": 60, "test_examples": 10}, "data_dir": str(tmp_path)}
    data = load_dataset(DatasetConfig.model_validate(dataset))
    tok, pieces, _ = pair_tokenizer(singles_first=False)
    torch.manual_seed(4)
    net = build_model("tiny_llama", len(pieces), Preprocess((16,), passthrough=True), {**TINY, "layers": 2}).net.hf
    net.save_pretrained(tmp_path / "pairs")
    tok.save_pretrained(tmp_path / "pairs")
    cfg = RunConfig.model_validate({"dataset": dataset, "teacher": {"name": f"hf-lm/{tmp_path / 'pairs'}"},
                                    "student": {"name": "tiny_llama", "options": TINY},
                                    "knowledge": [{"type": "uld"}]})
    records = load_teacher_records(cfg)
    assert records[0]["num_classes"] == len(pieces) == 306
    out = TeacherOutputs.create(Teacher.from_records(records), None, records, data, [], torch.device("cpu"))
    torch.manual_seed(1)
    student = build_model("tiny_llama", len(VOCAB), Preprocess(data.info.input_shape, passthrough=True), TINY).eval()
    idx = torch.arange(6)
    x, y = data.train.x[idx], data.train.y[idx]
    with torch.no_grad():
        t_out = out(idx, x)
        assert t_out.logits.head.vocab == 306
        got = ULD().compute(TapOutputs(student.net.states(x), {}), t_out, y)
        zs = student(x).double()
        rows = torch.from_numpy(out._cross.ids[idx.numpy()])
        zt = net.eval()(input_ids=rows).logits.double()
    per_row = []
    for i in range(len(x)):
        pos = (y[i] != -100).nonzero().flatten()
        t0, tn = int(out._cross.start[i]), int(out._cross.size[i])
        n = min(len(pos), tn)
        q = zs[i, pos[:n]].softmax(-1).sort(-1, descending=True).values
        p = zt[i, t0:t0 + n].softmax(-1).sort(-1, descending=True).values
        q = torch.nn.functional.pad(q, (0, p.shape[-1] - q.shape[-1]))  # the student's 17 then zeros
        per_row.append((q - p).abs().sum(-1).mean())
    assert float(got) == pytest.approx(float(torch.stack(per_row).mean()), rel=1e-5)
    assert (out._cross.size[:6] < (y != -100).sum(1).numpy()).all()  # pairs: shorter answers than the data's
