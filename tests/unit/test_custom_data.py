"""Data sets the user brings: Hugging Face data sets (text, images) and tables, made locally (no internet)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from kdray.config import ConfigError, DatasetConfig, RunConfig
from kdray.data import DatasetUnavailable, describe_dataset, load_dataset

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

MAX_LEN = 16
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
CLASS_WORDS = {"neg": ["bad", "awful", "poor"], "pos": ["good", "great", "lovely"], "meh": ["fine", "okay", "average"]}
FILLER = ["the", "movie", "film", "plot", "was", "is", "very", "and", "a", "cast", "story", "ending"]


def make_texts(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Sentences whose class is decided by which words appear; some longer than MAX_LEN tokens, some with a
    word outside the vocabulary ("zebra")."""
    rng = np.random.default_rng(seed)
    names = list(CLASS_WORDS)
    texts, labels = [], []
    for i in range(n):
        c = names[i % 3]
        words = list(rng.choice(FILLER, size=rng.integers(2, 20))) + list(rng.choice(CLASS_WORDS[c], size=2))
        if i % 7 == 0:
            words.append("zebra")
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(c)
    return texts, labels


@pytest.fixture(scope="module")
def raw_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = SPECIAL + sorted({w for ws in CLASS_WORDS.values() for w in ws} | set(FILLER))
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tk


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, raw_tokenizer):
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=raw_tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(str(folder))
    return str(folder)


def expected_ids(raw_tokenizer, text: str) -> list[int]:
    """[CLS] words... [SEP], truncated to MAX_LEN, right-padded with [PAD]=0: worked out by hand from the raw
    tokenizer (no transformers involved)."""
    words = raw_tokenizer.encode(text, add_special_tokens=False).ids[:MAX_LEN - 2]
    ids = [2, *words, 3]
    return ids + [0] * (MAX_LEN - len(ids))


def text_split(texts: list[str], labels: list[str]):
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=list(CLASS_WORDS))})
    return Dataset.from_dict({"text": texts, "label": [list(CLASS_WORDS).index(c) for c in labels]},
                             features=features)


def hf_cfg(path, tokenizer_dir, tmp_path, **kw) -> DatasetConfig:
    return DatasetConfig.model_validate({"name": "hf", "path": str(path), "tokenizer": tokenizer_dir,
                                         "max_length": MAX_LEN, "data_dir": str(tmp_path / "cache"), **kw})


def rows(x: torch.Tensor) -> list[tuple]:
    return sorted(tuple(r) for r in x.tolist())


def test_hf_text_saved_to_disk_is_tokenised_like_the_tokenizer(tmp_path, tokenizer_dir, raw_tokenizer):
    from datasets import DatasetDict

    tr_texts, tr_labels = make_texts(200, seed=0)
    te_texts, te_labels = make_texts(60, seed=1)
    DatasetDict({"train": text_split(tr_texts, tr_labels), "test": text_split(te_texts, te_labels)}
                ).save_to_disk(str(tmp_path / "sst"))
    cfg = hf_cfg(tmp_path / "sst", tokenizer_dir, tmp_path, val_fraction=0.25)

    info = describe_dataset(cfg)
    assert (info.input_shape, info.model_input, info.num_classes) == ((MAX_LEN,), (MAX_LEN,), 3)
    assert (info.input_dtype, info.pad_token_id) == ("int64", 0)
    data = load_dataset(cfg)
    assert data.train.x.dtype == torch.int64 and tuple(data.train.x.shape[1:]) == (MAX_LEN,)
    assert (len(data.train) + len(data.val), len(data.test)) == (200, 60)
    assert data.details["classes"] == ["neg", "pos", "meh"]  # a ClassLabel's own names and order

    # The test split keeps its order: row i is sentence i, encoded exactly as the tokenizer does.
    assert data.test.x.tolist() == [expected_ids(raw_tokenizer, t) for t in te_texts]
    assert data.test.y.tolist() == [list(CLASS_WORDS).index(c) for c in te_labels]
    assert (data.test.x[:, -1] == 0).any() and (data.test.x[:, -1] == 3).any()  # padded and truncated rows
    assert (data.test.x == 1).any()  # "zebra" is [UNK]
    # Train + validation are the training sentences, each with its own label.
    by_ids = {tuple(expected_ids(raw_tokenizer, t)): list(CLASS_WORDS).index(c) for t, c in zip(tr_texts, tr_labels)}
    got = torch.cat([data.train.x, data.val.x]).tolist()
    assert rows(torch.tensor(got)) == sorted(tuple(expected_ids(raw_tokenizer, t)) for t in tr_texts)
    assert [by_ids[tuple(r)] for r in got] == torch.cat([data.train.y, data.val.y]).tolist()

    # Validation is stratified: each class holds its quarter of the training split (200 = 67 + 67 + 66).
    counts = np.bincount(data.val.y.numpy(), minlength=3)
    assert all(abs(counts[c] - 0.25 * tr_labels.count(name)) <= 1 for c, name in enumerate(CLASS_WORDS))
    # ... and fixed by split_seed.
    again = load_dataset(cfg)
    assert torch.equal(again.val.x, data.val.x) and again.fingerprint == data.fingerprint
    other = load_dataset(hf_cfg(tmp_path / "sst", tokenizer_dir, tmp_path, val_fraction=0.25, split_seed=5))
    assert rows(other.val.x) != rows(data.val.x)
    assert torch.equal(other.test.x, data.test.x)


def test_hf_csv_with_string_labels_and_a_carved_test_split(tmp_path, tokenizer_dir, raw_tokenizer):
    import pandas as pd

    texts, labels = make_texts(150, seed=2)
    csv = tmp_path / "reviews.csv"
    pd.DataFrame({"review": texts, "sentiment": labels}).to_csv(csv, index=False)
    cfg = lambda seed: hf_cfg(csv, tokenizer_dir, tmp_path, text_column="review",  # noqa: E731
                              label_column="sentiment", split_seed=seed)
    data = load_dataset(cfg(0))
    # Strings map to 0..C-1 in sorted order, whatever order they first appear in.
    assert data.details["classes"] == ["meh", "neg", "pos"]
    assert data.details["test_held_out_of_train"] is True
    truth = {tuple(expected_ids(raw_tokenizer, t)): sorted(CLASS_WORDS).index(c) for t, c in zip(texts, labels)}
    for part in (data.train, data.val, data.test):
        assert [truth[tuple(r)] for r in part.x.tolist()] == part.y.tolist()
    assert len(data.test) == 30 and len(data.train) + len(data.val) == 120
    assert np.bincount(data.test.y.numpy()).tolist() == [10, 10, 10]  # stratified
    # A different split_seed moves validation samples but never test samples.
    other = load_dataset(cfg(7))
    assert torch.equal(other.test.x, data.test.x) and torch.equal(other.test.y, data.test.y)
    assert rows(other.val.x) != rows(data.val.x)
    assert rows(torch.cat([other.train.x, other.val.x])) == rows(torch.cat([data.train.x, data.val.x]))

    # The tokenised arrays are cached; a changed file is tokenised again.
    cached = list((tmp_path / "cache" / "hf").glob("*.npz"))
    assert len(cached) == 1
    texts2 = [t + " good" if c == "pos" else t for t, c in zip(texts, labels)]
    pd.DataFrame({"review": texts2, "sentiment": labels}).to_csv(csv, index=False)
    st = csv.stat()
    os.utime(csv, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = load_dataset(cfg(0))
    assert len(list((tmp_path / "cache" / "hf").glob("*.npz"))) == 2
    # Same labels, so the same rows are held out: each now reads as its edited sentence.
    edited = {t: e for t, e in zip(texts, texts2)}
    assert changed.test.x.tolist() == [expected_ids(raw_tokenizer, edited[t])
                                       for t in _texts_of(data.test.x, texts, raw_tokenizer)]
    assert not torch.equal(changed.test.x, data.test.x)


def _texts_of(x: torch.Tensor, texts: list[str], raw_tokenizer) -> list[str]:
    enc = {tuple(expected_ids(raw_tokenizer, t)): t for t in texts}
    return [enc[tuple(r)] for r in x.tolist()]


def test_hf_sentence_pairs(tmp_path, tokenizer_dir, raw_tokenizer):
    from datasets import Dataset

    rng = np.random.default_rng(3)
    a = [" ".join(rng.choice(FILLER, 3)) for _ in range(40)]
    b = [" ".join(rng.choice(FILLER, 2)) for _ in range(40)]
    Dataset.from_dict({"premise": a, "hypothesis": b, "label": [i % 2 for i in range(40)]}).save_to_disk(
        str(tmp_path / "pairs"))
    data = load_dataset(hf_cfg(tmp_path / "pairs", tokenizer_dir, tmp_path, text_column=["premise", "hypothesis"]))
    first = [2, *raw_tokenizer.encode(a[0], add_special_tokens=False).ids, 3,
             *raw_tokenizer.encode(b[0], add_special_tokens=False).ids, 3]
    everything = torch.cat([data.train.x, data.val.x, data.test.x]).tolist()
    assert first + [0] * (MAX_LEN - len(first)) in everything
    assert len(everything) == 40 and len(data.test) == 8


def test_hf_errors_name_the_option(tmp_path, tokenizer_dir):
    from datasets import DatasetDict

    texts, labels = make_texts(30, seed=4)
    DatasetDict({"train": text_split(texts, labels)}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match=r"dataset\.tokenizer"):
        describe_dataset(DatasetConfig.model_validate({"name": "hf", "path": str(tmp_path / "d")}))
    with pytest.raises(ValueError, match=r"text column 'sentence' not in .*columns: text, label"):
        describe_dataset(hf_cfg(tmp_path / "d", tokenizer_dir, tmp_path, text_column="sentence"))
    with pytest.raises(ValueError, match=r"train_split 'training' not in .*splits: train"):
        describe_dataset(hf_cfg(tmp_path / "d", tokenizer_dir, tmp_path, train_split="training"))
    with pytest.raises(DatasetUnavailable, match="nothing.parquet"):
        describe_dataset(hf_cfg(tmp_path / "nothing.parquet", tokenizer_dir, tmp_path))
    with pytest.raises(ValueError, match="unknown option.*valid: path"):
        DatasetConfig.model_validate({"name": "hf", "options": {"path": "x", "label": "y"}})


def test_hf_images_become_uint8_nchw(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (48, 8, 10, 3), dtype=np.uint8)  # not square: a transposed layout would show
    labels = [i % 3 for i in range(48)]
    features = Features({"img": Image(), "label": ClassLabel(names=["a", "b", "c"])})

    def split(s: slice):
        images = [PILImage.fromarray(p) for p in pix[s]]
        return Dataset.from_dict({"img": images, "label": labels[s]}, features=features)

    DatasetDict({"train": split(slice(0, 36)), "test": split(slice(36, 48))}).save_to_disk(str(tmp_path / "imgs"))
    cfg = DatasetConfig.model_validate({"name": "hf", "path": str(tmp_path / "imgs"), "image_column": "img",
                                        "data_dir": str(tmp_path / "cache")})
    data = load_dataset(cfg)
    assert data.train.x.dtype == torch.uint8 and tuple(data.train.x.shape[1:]) == (3, 8, 10)
    assert np.array_equal(data.test.x.numpy(), pix[36:].transpose(0, 3, 1, 2))
    assert rows(torch.cat([data.train.x, data.val.x]).flatten(1)) == rows(
        torch.from_numpy(pix[:36].transpose(0, 3, 1, 2).copy()).flatten(1))
    info = data.info
    assert (info.num_classes, info.model_input, info.input_dtype) == (3, (3, 8, 10), "uint8")
    train = data.train.x.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(info.mean, train.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(info.std, train.std(axis=(0, 2, 3)), rtol=1e-6)

    # Grey images keep one channel; a data set without a test split gets one held out of train.
    grey = pix[:30, :, :, 0]
    Dataset.from_dict({"img": [PILImage.fromarray(p) for p in grey], "label": labels[:30]},
                      features=features).save_to_disk(str(tmp_path / "grey"))
    g = load_dataset(DatasetConfig.model_validate({"name": "hf", "path": str(tmp_path / "grey"),
                                                   "image_column": "img", "data_dir": str(tmp_path / "cache")}))
    assert tuple(g.test.x.shape) == (6, 1, 8, 10) and len(g.info.mean) == 1
    assert rows(torch.cat([g.train.x, g.val.x, g.test.x]).flatten(1)) == rows(torch.from_numpy(grey).flatten(1))

    # Images of different sizes cannot be stacked: the error names the sizes.
    mixed = [PILImage.fromarray(p) for p in pix[:4]] + [PILImage.fromarray(np.zeros((6, 6, 3), np.uint8))] * 2
    Dataset.from_dict({"img": mixed, "label": [0, 1] * 3}, features=features).save_to_disk(str(tmp_path / "mixed"))
    with pytest.raises(ValueError, match=r"different sizes.*8x10 \(4 images\), 6x6 \(2 images\)"):
        describe_dataset(DatasetConfig.model_validate({"name": "hf", "path": str(tmp_path / "mixed"),
                                                       "image_column": "img", "data_dir": str(tmp_path / "cache")}))


# -- table ------------------------------------------------------------------------------------------
def make_table(n: int, seed: int, species=("cat", "dog", "eel")):
    import pandas as pd

    rng = np.random.default_rng(seed)
    y = [species[i % len(species)] for i in range(n)]
    return pd.DataFrame({
        "height": rng.normal(100, 20, n),          # large offset and scale
        "ratio": rng.normal(-3, 0.01, n),           # tiny scale
        "legs": rng.integers(0, 5, n),              # integers are numeric too
        "const": np.full(n, 5.0),                   # zero variance: must not divide by zero
        "species": y,
    })


def table_cfg(path, tmp_path, **kw) -> DatasetConfig:
    return DatasetConfig.model_validate({"name": "table", "path": str(path), "label": "species",
                                         "data_dir": str(tmp_path / "cache"), **kw})


def test_table_is_standardised_on_its_training_part(tmp_path):
    df = make_table(200, seed=0)
    df.to_parquet(tmp_path / "animals.parquet")
    data = load_dataset(table_cfg(tmp_path / "animals.parquet", tmp_path))
    assert data.train.x.dtype == torch.float32 and tuple(data.train.x.shape[1:]) == (4,)
    assert (len(data.train) + len(data.val), len(data.test)) == (160, 40)
    assert data.details["classes"] == ["cat", "dog", "eel"]
    assert data.details["features"] == ["height", "ratio", "legs", "const"]
    pre = data.info.preprocess()
    with torch.no_grad():
        z = pre(data.train.x).numpy().astype(np.float64)
        z_val = pre(data.val.x).numpy()
    np.testing.assert_allclose(z[:, :3].mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(z[:, :3].std(axis=0), 1, atol=1e-4)
    assert np.all(z[:, 3] == 0) and np.isfinite(z_val).all()
    train = data.train.x.numpy().astype(np.float64)
    np.testing.assert_allclose(z_val[:, :3], (data.val.x.numpy()[:, :3] - train[:, :3].mean(0)) / train[:, :3].std(0),
                               rtol=1e-4, atol=1e-4)
    # Every row is one of the file's rows with its own label.
    truth = {tuple(np.float32(r[:4])): r[4] for r in df.itertuples(index=False)}
    for part in (data.train, data.val, data.test):
        assert [["cat", "dog", "eel"][c] for c in part.y.tolist()] == [truth[tuple(r)] for r in part.x.numpy()]


def test_table_errors_name_the_columns(tmp_path):
    df = make_table(60, seed=1)
    df["city"] = "Oslo"
    df.to_parquet(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"non-numeric feature column\(s\) 'city'.*features:"):
        describe_dataset(table_cfg(tmp_path / "t.parquet", tmp_path))
    picked = describe_dataset(table_cfg(tmp_path / "t.parquet", tmp_path, features=["height", "legs"]))
    assert picked.input_shape == (2,)
    with pytest.raises(ValueError, match=r"label column 'y' not in t.parquet \(columns: height, ratio, legs, const, "
                                         r"species, city\)"):
        describe_dataset(table_cfg(tmp_path / "t.parquet", tmp_path, label="y"))
    with pytest.raises(ValueError, match=r"feature column\(s\) 'weight' not in t.parquet"):
        describe_dataset(table_cfg(tmp_path / "t.parquet", tmp_path, features=["weight"]))
    df.loc[3, "ratio"] = np.nan
    df.drop(columns="city").to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"missing values in t.csv: 'ratio' \(1 rows\)"):
        describe_dataset(table_cfg(tmp_path / "t.csv", tmp_path))
    with pytest.raises(DatasetUnavailable, match="absent.csv"):
        describe_dataset(table_cfg(tmp_path / "absent.csv", tmp_path))


def test_table_string_labels_map_alike_in_a_separate_test_file(tmp_path):
    make_table(90, seed=2).to_parquet(tmp_path / "train.parquet")
    test = make_table(20, seed=3, species=("eel", "cat"))  # first label seen is "eel", and no "dog" at all
    test.to_json(tmp_path / "test.jsonl", orient="records", lines=True)
    data = load_dataset(table_cfg(tmp_path / "train.parquet", tmp_path, test_path=str(tmp_path / "test.jsonl")))
    assert len(data.test) == 20 and len(data.train) + len(data.val) == 90
    assert data.test.y.tolist() == [["cat", "dog", "eel"].index(s) for s in test["species"]]
    np.testing.assert_allclose(data.test.x.numpy(), test[["height", "ratio", "legs", "const"]].to_numpy(np.float32))
    # A test label the training file never has is a data error, not a new class.
    make_table(20, seed=4, species=("cat", "fox")).to_csv(tmp_path / "odd.csv", index=False)
    with pytest.raises(ValueError, match=r"test label\(s\) \['fox'\] never occur"):
        describe_dataset(table_cfg(tmp_path / "train.parquet", tmp_path, test_path=str(tmp_path / "odd.csv")))


def test_dry_run_of_an_mlp_on_a_table(tmp_path):
    from kdray.check import dry_run

    make_table(120, seed=5).to_parquet(tmp_path / "animals.parquet")
    run = {"dataset": {"name": "table", "path": str(tmp_path / "animals.parquet"), "label": "species"},
           "teacher": {"train": {"model": {"name": "mlp", "options": {"hidden": [32, 32]}}}},
           "student": {"name": "mlp", "options": {"hidden": [8]}}, "knowledge": [{"type": "kd"}]}
    report = dry_run(RunConfig.model_validate(run))
    assert report.student == "mlp" and report.student_params == 4 * 8 + 8 + 8 * 3 + 3
    run["dataset"]["label"] = "kind"
    with pytest.raises(ConfigError, match=r"dataset.options.*label column 'kind' not in animals.parquet"):
        dry_run(RunConfig.model_validate(run))


def test_data_paths_in_a_search_space_are_taken_relative_to_the_space_file(tmp_path, monkeypatch):
    """Trials validate their config in Tune's trial folders (and on other machines): a relative path in `base`
    must reach them as the file next to the space, not as a path relative to wherever the trial runs."""
    import yaml

    from kdray.sweep.space import load_space

    proj = tmp_path / "project"
    proj.mkdir()
    make_table(120, seed=0).to_parquet(proj / "animals.parquet")
    (proj / "space.yaml").write_text(yaml.safe_dump({
        "name": "rel", "num_samples": 1,
        "base": {"dataset": {"name": "table", "path": "animals.parquet", "label": "species"},
                 "student": {"name": "mlp"}, "train": {"epochs": 1}},
        "space": {"knowledge": {"none": {}}}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    space = load_space(proj / "space.yaml")
    cfg = space.resolve({"knowledge": "none"})
    assert cfg.dataset.options["path"] == str((proj / "animals.parquet").resolve())
    monkeypatch.chdir(tmp_path)  # as a worker in another folder validates the trial's dumped config
    again = RunConfig.model_validate(cfg.model_dump(mode="json"))
    assert len(load_dataset(again.dataset).train) > 0
