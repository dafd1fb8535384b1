"""Language-model data: packing (every token a target once, prompts masked), splits by document (test fixed, validation
by split_seed), the hidden Markov language's exact next-token distribution (against brute-force enumeration), Python's
own documentation as a corpus with its BPE tokenizer, and your own text files."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from kdray.config import ConfigError, DatasetConfig, RunConfig
from kdray.data import describe_dataset, load_dataset
from kdray.data.lm import IGNORE, pack, split_documents
from kdray.data.lm_builtin import HiddenMarkovLanguage, python_docs_corpus


def test_packing_makes_every_token_a_target_exactly_once():
    docs = [np.arange(1, 8), np.arange(100, 105)]
    x, y = pack(docs, None, seq_len=4, eos=0)
    stream = np.r_[np.arange(1, 8), 0, np.arange(100, 105), 0]  # 14 tokens: 13 targets, 3 whole blocks of 4
    assert x.shape == (3, 4)
    np.testing.assert_array_equal(x.reshape(-1), stream[:12])
    np.testing.assert_array_equal(y.reshape(-1), stream[1:13])  # the next token at every position


def test_packing_masks_the_prompt_tokens():
    docs = [np.array([5, 6, 7, 8])]  # prompt 5 6, completion 7 8
    x, y = pack(docs, [np.array([False, False, True, True])], seq_len=4, eos=9)
    np.testing.assert_array_equal(x[0], [5, 6, 7, 8])
    np.testing.assert_array_equal(y[0], [IGNORE, 7, 8, 9])  # 6 is a prompt token: predicting it trains nothing


def test_test_documents_never_move_and_validation_follows_split_seed():
    a = split_documents(100, 0.2, split_seed=0)
    b = split_documents(100, 0.2, split_seed=1)
    np.testing.assert_array_equal(a[2], b[2])
    assert not np.array_equal(a[1], b[1])
    for tr, va, te in (a, b):
        assert len(te) == 10 and len(va) == 18 and len(tr) == 72
        assert len(set(tr) | set(va) | set(te)) == 100


def test_the_forward_algorithm_matches_brute_force_enumeration():
    """p(x_{t+1} | x_1..x_t) by summing the joint over every hidden path, for a 3-state, 4-token language."""
    lang = HiddenMarkovLanguage(vocab=4, states=3, seed=5, concentration=0.7)
    seqs = np.array([[0, 3, 1, 2], [2, 2, 0, 1]])
    got = np.exp(lang.next_token_logp(seqs))

    def joint(tokens):  # p(x_1..x_n) = Σ over hidden paths
        total = 0.0
        for path in itertools.product(range(3), repeat=len(tokens)):
            p = lang.pi[path[0]] * lang.b[path[0], tokens[0]]
            for i in range(1, len(tokens)):
                p *= lang.a[path[i - 1], path[i]] * lang.b[path[i], tokens[i]]
            total += p
        return total

    for n, seq in enumerate(seqs):
        for t in range(3):
            prefix = list(seq[:t + 1])
            want = np.array([joint(prefix + [v]) for v in range(4)]) / joint(prefix)
            np.testing.assert_allclose(got[n, t], want, rtol=1e-6)


def test_synthetic_lm_carries_the_true_distribution_of_validation_and_test():
    data = load_dataset(DatasetConfig(name="synthetic_lm", options={"train_sequences": 50, "test_sequences": 10,
                                                                      "seq_len": 8}))
    assert data.info.causal_lm and data.info.num_classes == 64 and data.train.x.shape[1] == 8
    true = data.val.aux["true_logp"]
    assert true.shape == (len(data.val), 8, 64)
    torch.testing.assert_close(true.exp().sum(-1), torch.ones(len(data.val), 8))
    assert data.test.aux["true_logp"].shape[0] == 10 and not data.train.aux
    assert (data.train.y[:, :-1] == data.train.x[:, 1:]).all()  # y is x shifted by one within a sequence


def test_python_docs_is_english_from_the_standard_library_outside_the_tests():
    docs = python_docs_corpus()
    text = "".join(docs)
    assert 2_000_000 < len(text) < 3_000_000 and len(docs) > 500
    assert not any(d.split("\n", 1)[0].startswith(("test.", "idlelib.idle_test")) for d in docs)
    assert "the" in text.split() and "def " not in docs[0][:200]


def test_python_docs_blocks_decode_to_text_with_their_own_tokenizer(tmp_path):
    from kdray.data.lm import load_tokenizer

    cfg = DatasetConfig(name="python_docs", data_dir=str(tmp_path), options={"max_documents": 40, "seq_len": 64})
    info = describe_dataset(cfg)
    data = load_dataset(cfg)
    assert info.num_classes == 2048 and data.train.x.shape[1] == 64
    tok = load_tokenizer(info.tokenizer)
    words = tok.decode(data.train.x[0].tolist()).split()
    assert len(words) > 5 and sum(w.isalpha() for w in words) > len(words) / 2
    again = load_dataset(DatasetConfig(name="python_docs", data_dir=str(tmp_path), split_seed=1,
                                       options={"max_documents": 40, "seq_len": 64}))
    assert torch.equal(again.test.x, data.test.x)  # test blocks do not move with split_seed


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_text_with_prompt_and_completion_trains_only_on_the_completions(tmp_path):
    from kdray.data.lm_builtin import synthetic_tokenizer

    tok_dir = synthetic_tokenizer(DatasetConfig(name="synthetic_lm", data_dir=str(tmp_path)), 64)
    rows = [{"q": " ".join(f"t{i}" for i in range(1, 4)), "a": " ".join(f"t{i}" for i in range(40, 46))}
            for _ in range(30)]
    f = write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg = DatasetConfig(name="text", data_dir=str(tmp_path), options={
        "path": str(f), "prompt_column": "q", "completion_column": "a", "tokenizer": str(tok_dir), "seq_len": 10})
    data = load_dataset(cfg)
    targets = torch.cat([data.train.y, data.val.y, data.test.y]).reshape(-1)
    trained = targets[targets != IGNORE]
    # completions are t40..t45 and the end of text (t0); prompt tokens t1..t3 are never targets
    assert set(trained.tolist()) <= set(range(40, 46)) | {0} and set(range(40, 46)) <= set(trained.tolist())
    assert (targets == IGNORE).sum() > 0


def test_a_prompt_column_that_does_not_exist_fails_at_check_naming_the_field(tmp_path):
    from kdray.check import dry_run
    from kdray.data.lm_builtin import synthetic_tokenizer

    tok_dir = synthetic_tokenizer(DatasetConfig(name="synthetic_lm", data_dir=str(tmp_path)), 64)
    f = write_jsonl(tmp_path / "qa.jsonl", [{"question": "t1", "answer": "t2"}] * 5)
    cfg = RunConfig.model_validate({"dataset": {"name": "text", "path": str(f), "prompt_column": "prompt",
                                                "completion_column": "answer", "tokenizer": str(tok_dir)},
                                    "student": {"name": "tiny_llama"}})
    with pytest.raises(ConfigError) as e:
        dry_run(cfg, file="run.yaml")
    assert e.value.fields == ["dataset.prompt_column"] and "question" in str(e.value)


def test_plain_text_files_are_one_document_each(tmp_path):
    from kdray.data.lm_builtin import synthetic_tokenizer

    tok_dir = synthetic_tokenizer(DatasetConfig(name="synthetic_lm", data_dir=str(tmp_path)), 64)
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i}.txt").write_text(" ".join(f"t{(i + j) % 60 + 1}" for j in range(20)))
    data = load_dataset(DatasetConfig(name="text", data_dir=str(tmp_path),
                                      options={"path": str(folder), "tokenizer": str(tok_dir), "seq_len": 8}))
    total = sum(int((s.y != IGNORE).sum()) for s in (data.train, data.val, data.test))
    assert math.isclose(total, 12 * 21, rel_tol=0.2)  # 21 tokens a document (20 + end of text), minus partial blocks


@pytest.mark.parametrize("form", ["parquet", "save_to_disk"])
def test_text_reads_parquet_and_saved_data_sets(tmp_path, form):
    import datasets

    from kdray.data.lm_builtin import synthetic_tokenizer

    tok_dir = synthetic_tokenizer(DatasetConfig(name="synthetic_lm", data_dir=str(tmp_path)), 64)
    rows = {"body": [" ".join(f"t{(i * 7 + j) % 60 + 1}" for j in range(30)) for i in range(20)]}
    d = datasets.Dataset.from_dict(rows)
    path = tmp_path / ("docs.parquet" if form == "parquet" else "saved")
    d.to_parquet(str(path)) if form == "parquet" else d.save_to_disk(str(path))
    data = load_dataset(DatasetConfig(name="text", data_dir=str(tmp_path), options={
        "path": str(path), "text_column": "body", "tokenizer": str(tok_dir), "seq_len": 16}))
    assert data.info.num_classes == 64
    # 20 documents of 30 tokens + the end of text, split by document (test 2, validation 2, train 16), each part
    # packed into blocks of 16 tokens and their 16 next tokens
    blocks = [(n * 31 - 1) // 16 for n in (16, 2, 2)]
    assert [len(data.train), len(data.val), len(data.test)] == blocks


def test_a_tokenizer_with_its_own_beginning_token_starts_every_document_with_it(tmp_path):
    """Llama- and Gemma-style tokenizers: each document starts with <bos>, which is not a target."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t0", bos_token="t63").save_pretrained(
        tmp_path / "tok")
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i}.txt").write_text(" ".join(f"t{j + 1}" for j in range(10)))
    data = load_dataset(DatasetConfig(name="text", data_dir=str(tmp_path),
                                      options={"path": str(folder), "tokenizer": str(tmp_path / "tok"), "seq_len": 8}))
    stream = data.train.x.reshape(-1)  # the blocks are consecutive windows of one stream
    assert stream[0] == 63 and stream[:13].tolist() == [63, *range(1, 11), 0, 63]  # <bos> t1..t10 <eos> <bos>
    assert not (data.train.y == 63).any()  # <bos> is never a target
