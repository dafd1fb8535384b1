"""Data you bring: Hugging Face data sets (text or images) and tables (parquet, CSV, JSON).

Both end as in-memory tensors like kdray's own sets, so everything downstream (validation carved with
``split_seed``, teacher caching, sharding) works unchanged:

* ``hf``: a folder written by ``save_to_disk`` or local CSV / JSON / Parquet files read by ``datasets``.
  Text is tokenised once (padded and truncated to ``max_length``) into int64 ids that go to the model
  unchanged; images become uint8 NCHW. The arrays are cached under the data directory, keyed by the
  inputs' state, the tokenizer and the options, so trials do not re-tokenise and a changed file does.
* ``table``: numeric feature columns and a label column read with pandas; float32 rows that kdray's
  ``Preprocess`` standardises with the training part's per-feature mean and std.

When the source has no test split, a stratified ``test_fraction`` is held out with a fixed seed that is
independent of ``split_seed``: a different validation split never moves a test sample. Labels that are
not a ``ClassLabel`` are mapped to 0..C-1 in sorted order (the names are kept in ``details``), one
mapping for train and test.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from kdray.data.base import (
    DataBundle,
    DatasetInfo,
    DatasetUnavailable,
    cached_arrays,
    carve_validation,
    data_dir,
    in_memory_bundle,
    register_dataset,
)

if TYPE_CHECKING:  # pragma: no cover
    from kdray.config import DatasetConfig

TEST_SEED = 0  # the held-out test split's seed: fixed, never split_seed, so test samples never move
CACHE_VERSION = "1"  # bump when the cached arrays' layout or meaning changes


def _need(package: str) -> Any:
    """Import an optional package, or say how to install it (kdray's own sets need none of them)."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise DatasetUnavailable(
            f"this data set needs the `{package}` package: pip install {package} (or pip install 'kdray[hub]')"
        ) from e


def _columns(names: Sequence[str]) -> str:
    return ", ".join(str(n) for n in names)


def _sorted_values(values: set) -> list:
    try:
        return sorted(values)
    except TypeError:  # mixed types (1 and "1"): any fixed order will do, as long as it is deterministic
        return sorted(values, key=lambda v: (type(v).__name__, str(v)))


def _label_mapping(train: list, test: list, what: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One sorted mapping of label values to 0..C-1 for train and test (strings, floats, 1-based ints ...)."""
    for part, values in (("train", train), ("test", test)):
        missing = sum(v is None or (isinstance(v, float) and v != v) for v in values)
        if missing:
            raise ValueError(f"{what} has {missing} missing value(s) in the {part} split")
    classes = _sorted_values(set(train))
    unseen = _sorted_values(set(test) - set(classes))
    if unseen:
        raise ValueError(f"{what}: test label(s) {unseen[:10]} never occur in the training split")
    if len(classes) < 2:
        raise ValueError(f"{what} has a single class ({classes}) in the training split: nothing to classify")
    index = {v: i for i, v in enumerate(classes)}
    to_ids = lambda vs: np.fromiter((index[v] for v in vs), dtype=np.int64, count=len(vs))  # noqa: E731
    return to_ids(train), to_ids(test), [str(v) for v in classes]


def _hold_out_test(labels: np.ndarray, fraction: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, test) of a fixed, stratified test split carved from train."""
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"test_fraction must be a number between 0 and 1, got {fraction!r}") from None
    if not 0 < f < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {f}")
    try:
        return carve_validation(labels, f, TEST_SEED)
    except ValueError as e:
        raise ValueError(f"cannot hold out a test split from {where}: {e}") from None


def _stats(x: np.ndarray, axis: tuple[int, ...], scale: float = 1.0,
           chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std over ``axis`` (which includes the sample axis 0), in float64 and in chunks
    of samples, so uint8 images are never copied whole as floats; two passes, exact for large offsets."""
    count = int(np.prod([x.shape[a] for a in axis]))
    if count == 0:
        raise ValueError("no training samples to compute the normalisation from")
    parts = lambda: (x[i:i + chunk].astype(np.float64) / scale for i in range(0, len(x), chunk))  # noqa: E731
    mean = sum(p.sum(axis=axis) for p in parts()) / count
    shape = [1 if a in axis else n for a, n in enumerate(x.shape)]
    var = sum(np.square(p - mean.reshape(shape)).sum(axis=axis) for p in parts()) / count
    return mean, np.sqrt(var)


def _train_part(y: np.ndarray, cfg: "DatasetConfig") -> np.ndarray:
    """The samples that train (train minus validation): normalisation statistics come from these only."""
    tr, _ = carve_validation(y, cfg.val_fraction, cfg.split_seed)
    return tr


def _slug(path: Any) -> str:
    """A readable file-name part for the cache: the (first) source's name."""
    while isinstance(path, (list, tuple, dict)) and path:
        path = next(iter(path.values())) if isinstance(path, dict) else path[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(path)).name)[:40] or "data"


# -- hf: Hugging Face data sets ------------------------------------------------------------------------
HF_KEYS = ("path", "text_column", "image_column", "label_column", "tokenizer", "max_length", "train_split",
           "test_split", "test_fraction")
HF_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".pq": "parquet",
              ".arrow": "arrow"}


def _hf_options(cfg: "DatasetConfig") -> dict[str, Any]:
    o = dict(cfg.options)
    if not o.get("path"):
        raise ValueError("data set 'hf' needs `dataset.path`: a folder saved with save_to_disk, or local "
                         "CSV / JSON / Parquet file(s)")
    opts = {
        "path": o["path"],
        "text_column": o.get("text_column", "text"),
        "image_column": o.get("image_column"),
        "label_column": o.get("label_column", "label"),
        "tokenizer": o.get("tokenizer"),
        "max_length": o.get("max_length", 128),
        "train_split": str(o.get("train_split", "train")),
        "test_split": str(o.get("test_split", "test")),
        "test_fraction": o.get("test_fraction", 0.2),
    }
    if not isinstance(opts["max_length"], int) or isinstance(opts["max_length"], bool) or opts["max_length"] < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {opts['max_length']!r}")
    if opts["image_column"] is None:
        text = opts["text_column"]
        cols = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else []
        if not 1 <= len(cols) <= 2 or not all(isinstance(c, str) for c in cols):
            raise ValueError(f"text_column must be a column name or a pair of them, got {text!r}")
        opts["text_column"] = cols
        if not opts["tokenizer"]:
            raise ValueError("a text data set needs a tokenizer: set `dataset.tokenizer` to a local folder or hub id "
                             "(a Hugging Face teacher's own is used when the teacher is hf/...); for images set "
                             "`dataset.image_column`")
    return opts


def _hf_source(path: Any) -> tuple[str, Any, list[Path]]:
    """("disk", folder, files) for a saved data set or (format, data_files, files) for raw files."""
    if isinstance(path, (str, Path)) and Path(path).expanduser().is_dir():
        folder = Path(path).expanduser().resolve()
        if not any((folder / f).is_file() for f in ("dataset_dict.json", "state.json")):
            raise ValueError(f"path {folder} is a folder but not one written by save_to_disk "
                             "(no dataset_dict.json or state.json)")
        return "disk", str(folder), sorted(p for p in folder.rglob("*") if p.is_file())

    def resolve(p: Any) -> str:
        if not isinstance(p, (str, Path)):
            raise ValueError(f"path must be a folder, a file or a list of files, got {p!r}")
        f = Path(p).expanduser()
        if not f.is_file():
            raise DatasetUnavailable(f"hf data set: no file or folder at {f} (dataset.path)")
        return str(f.resolve())

    if isinstance(path, dict):  # {train: files, test: files}
        files = {str(k): [resolve(p) for p in (v if isinstance(v, (list, tuple)) else [v])] for k, v in path.items()}
    else:
        files = {"train": [resolve(p) for p in (path if isinstance(path, (list, tuple)) else [path])]}
    every = [f for fs in files.values() for f in fs]
    if not every:
        raise ValueError("dataset.path lists no files")
    kinds = {HF_FORMATS.get(Path(f).suffix.lower()) for f in every}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"dataset.path: files must all be one of {_columns(sorted(HF_FORMATS))}, got "
                         f"{_columns(Path(f).name for f in every)}")
    return kinds.pop(), files, [Path(f) for f in every]


def _state_key(files: list[Path]) -> str:
    """The inputs' state: names, sizes and mtimes of every file, plus the contents of small JSON state files."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        if f.suffix == ".json" and st.st_size < 1_000_000:
            h.update(f.read_bytes())
    return h.hexdigest()


def _load_tokenizer(name: str) -> Any:
    _need("transformers")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load tokenizer {name!r} (dataset.tokenizer): {e}") from None
    if tok.pad_token_id is None:
        raise ValueError(f"tokenizer {name!r} has no padding token, so texts cannot be padded to max_length: use "
                         "a tokenizer with one (or save this one with pad_token set) as dataset.tokenizer")
    return tok


def _tokenizer_key(tok: Any) -> str:
    """Everything that decides the ids: the whole fast tokenizer (vocabulary, normaliser, templates) and sides."""
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(repr((tok.padding_side, tok.truncation_side, tok.pad_token_id, sorted(tok.special_tokens_map.items()))
                  ).encode())
    return h.hexdigest()


def _open_hf(kind: str, source: Any, cfg: "DatasetConfig") -> dict[str, Any]:
    """The splits as ``datasets.Dataset`` objects."""
    ds = _need("datasets")
    try:
        if kind == "disk":
            d = ds.load_from_disk(source)
        else:
            d = ds.load_dataset(kind, data_files=source, cache_dir=str(data_dir(cfg) / "hf-cache"))
    except (OSError, ValueError) as e:
        raise DatasetUnavailable(f"cannot read the hf data set at {source}: {e}") from None
    return dict(d) if isinstance(d, ds.DatasetDict) else {"train": d}


def _column(dset: Any, col: str) -> list:
    """One column as a list (decoded: images come as PIL images)."""
    return dset.select_columns([col])[:][col]


def _hf_labels(train: Any, test: Any | None, col: str, where: str) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    ds = _need("datasets")
    feat = train.features[col]
    if isinstance(feat, ds.ClassLabel):
        y_tr = np.asarray(_column(train, col), dtype=np.int64)
        y_te = None
        if test is not None:
            t_feat = test.features.get(col)
            if not isinstance(t_feat, ds.ClassLabel) or list(t_feat.names) != list(feat.names):
                raise ValueError(f"label column {col!r}: the test split's classes {getattr(t_feat, 'names', t_feat)} "
                                 f"differ from train's {feat.names} in {where}")
            y_te = np.asarray(_column(test, col), dtype=np.int64)
        for part, y in (("train", y_tr), ("test", y_te)):
            if y is not None and len(y) and y.min() < 0:
                raise ValueError(f"label column {col!r}: the {part} split of {where} has unlabelled rows (-1), as "
                                 "published test splits often do: set `dataset.test_split` to a labelled split (e.g. "
                                 "validation), or to a name the data set lacks so a test part is held out of train")
        return y_tr, y_te, list(feat.names)
    y_tr, y_te, names = _label_mapping(_column(train, col), _column(test, col) if test is not None else [],
                                       f"label column {col!r} of {where}")
    return y_tr, (y_te if test is not None else None), names


def _tokenise(tok: Any, dset: Any, cols: list[str], max_length: int, where: str) -> np.ndarray:
    texts = []
    for c in cols:
        values = _column(dset, c)
        bad = [v for v in values if not isinstance(v, str)]
        if bad:
            raise ValueError(f"text column {c!r} of {where} holds {len(bad)} value(s) that are not strings "
                             f"(e.g. {bad[0]!r})")
        texts.append(values)
    out = []
    n = len(texts[0])
    for i in range(0, n, 8192):  # bounded memory on large sets
        parts = [t[i:i + 8192] for t in texts]
        enc = tok(*parts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np",
                  return_attention_mask=False, return_token_type_ids=False)
        out.append(np.asarray(enc["input_ids"], dtype=np.int64))
    return np.concatenate(out) if out else np.zeros((0, max_length), np.int64)


def _as_image(v: Any) -> np.ndarray:
    """One image as uint8 (H, W, C): PIL images, or arrays in HWC / CHW with 0..255 or 0..1 values."""
    if hasattr(v, "mode") and hasattr(v, "convert"):  # PIL
        if v.mode not in ("L", "RGB"):
            v = v.convert("L" if v.mode in ("1", "I", "I;16", "F") else "RGB")
        a = np.asarray(v)
    else:
        a = np.asarray(v)
        if a.dtype.kind == "f":
            a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
            a = np.clip(np.rint(a), 0, 255)
        if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
            a = a.transpose(1, 2, 0)  # CHW -> HWC
        a = a.astype(np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"an image of shape {a.shape} is neither (H, W) nor (H, W, C)")
    return a[:, :, :3] if a.shape[2] == 4 else a


def _images(dset: Any, col: str, where: str) -> np.ndarray:
    """uint8 (N, C, H, W); grey images are broadcast to RGB when the set mixes both."""
    arrays = []
    for i in range(0, len(dset), 512):
        arrays.extend(_as_image(v) for v in _column(dset.select(range(i, min(i + 512, len(dset)))), col))
    if not arrays:
        return np.zeros((0, 3, 1, 1), np.uint8)
    sizes: dict[tuple[int, int], int] = {}
    for a in arrays:
        sizes[a.shape[:2]] = sizes.get(a.shape[:2], 0) + 1
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w} ({n} images)" for (h, w), n in sorted(sizes.items(), key=lambda kv: -kv[1]))
        raise ValueError(f"image column {col!r} of {where} holds images of different sizes (height x width): {listed}; "
                         "resize them to one size first (e.g. with Dataset.map) and save the data set again")
    channels = max(a.shape[2] for a in arrays)
    x = np.stack([np.broadcast_to(a, (*a.shape[:2], channels)) if a.shape[2] != channels else a for a in arrays])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _hf_arrays(cfg: "DatasetConfig") -> dict[str, np.ndarray]:
    """The cached arrays of an hf data set: x/y of train and test, class names, the padding id (text)."""
    opts = _hf_options(cfg)
    kind, source, files = _hf_source(opts["path"])
    tok = _load_tokenizer(str(opts["tokenizer"])) if opts["image_column"] is None else None
    key = hashlib.sha256(json.dumps({
        "v": CACHE_VERSION, "kind": kind, "source": source, "state": _state_key(files),
        "tokenizer": _tokenizer_key(tok) if tok is not None else None,
        **{k: v for k, v in opts.items() if k not in ("path", "tokenizer")},
    }, sort_keys=True, default=str).encode()).hexdigest()[:16]
    where = f"{opts['path']}"

    def make() -> dict[str, np.ndarray]:
        splits = _open_hf(kind, source, cfg)
        train_name, test_name = opts["train_split"], opts["test_split"]
        if train_name not in splits:
            raise ValueError(f"train_split {train_name!r} not in {where} (splits: {_columns(splits)})")
        train, test = splits[train_name], splits.get(test_name)
        if test_name == train_name:
            test = None
        data_cols = [opts["image_column"]] if opts["image_column"] is not None else opts["text_column"]
        for part, d in (("train", train), ("test", test)):
            if d is None:
                continue
            for role, col in [("label", opts["label_column"])] + [
                    ("image" if opts["image_column"] is not None else "text", c) for c in data_cols]:
                if col not in d.column_names:
                    hint = ""
                    if role == "text" and any(type(f).__name__ == "Image" for f in d.features.values()):
                        hint = "; for images set `dataset.image_column`"
                    raise ValueError(f"{role} column {col!r} not in the {part} split of {where} (columns: "
                                     f"{_columns(d.column_names)}); set `dataset.{role}_column`{hint}")
        y_tr, y_te, names = _hf_labels(train, test, opts["label_column"], where)
        carved = test is None
        parts = {"train": train} if carved else {"train": train, "test": test}
        if opts["image_column"] is not None:
            xs = [_images(d, opts["image_column"], f"the {p} split of {where}") for p, d in parts.items()]
            if len(xs) == 2 and xs[0].shape[1] != xs[1].shape[1] and min(xs[0].shape[1], xs[1].shape[1]) == 1:
                c = max(xs[0].shape[1], xs[1].shape[1])  # grey in one split, colour in the other
                xs = [np.ascontiguousarray(np.broadcast_to(x, (x.shape[0], c, *x.shape[2:]))) for x in xs]
            if len(xs) == 2 and xs[0].shape[1:] != xs[1].shape[1:]:
                raise ValueError(f"image column {opts['image_column']!r} of {where}: train images are "
                                 f"{xs[0].shape[1:]} (C, H, W) but test images are {xs[1].shape[1:]}")
            pad = -1
        else:
            xs = [_tokenise(tok, d, opts["text_column"], opts["max_length"], f"the {p} split of {where}")
                  for p, d in parts.items()]
            pad = int(tok.pad_token_id)
        x_tr = xs[0]
        if carved:  # on the decoded arrays, so every check above saw the whole training split
            keep, held = _hold_out_test(y_tr, opts["test_fraction"], f"{where} (it has no {test_name!r} split)")
            x_tr, x_te, y_tr, y_te = x_tr[keep], x_tr[held], y_tr[keep], y_tr[held]
        else:
            x_te = xs[1]
        return {"x": x_tr, "y": y_tr, "x_test": x_te, "y_test": y_te, "names": np.asarray(names, dtype=str),
                "pad": np.asarray(pad, dtype=np.int64), "carved": np.asarray(carved)}

    return cached_arrays(data_dir(cfg) / "hf" / f"{_slug(opts['path'])}-{key}.npz", make)


def _hf_info(cfg: "DatasetConfig", arrays: dict[str, np.ndarray]) -> DatasetInfo:
    num_classes = len(arrays["names"])
    x = arrays["x"]
    if x.dtype == np.int64:  # token ids
        shape = tuple(x.shape[1:])
        return DatasetInfo(shape, num_classes, shape, input_dtype="int64", pad_token_id=int(arrays["pad"]))
    mean, std = _stats(x[_train_part(arrays["y"], cfg)], axis=(0, 2, 3), scale=255.0)
    std = np.where(std > 0, std, 1.0)
    shape = tuple(x.shape[1:])
    return DatasetInfo(shape, num_classes, shape, tuple(float(m) for m in mean), tuple(float(s) for s in std),
                       input_dtype="uint8")


def describe_hf(cfg: "DatasetConfig") -> DatasetInfo:
    """Reads (and on first use tokenises or decodes and caches) the data set: the classes need the labels."""
    return _hf_info(cfg, _hf_arrays(cfg))


@register_dataset(
    "hf", describe_hf, offline=True, option_keys=HF_KEYS,
    description="a Hugging Face data set (text or images): path = save_to_disk folder or CSV/JSON/Parquet files",
)
def load_hf(cfg: "DatasetConfig") -> DataBundle:
    """Text: int64 ids (N, max_length) padded with the tokenizer's pad id; images: uint8 (N, C, H, W)."""
    from functools import partial

    from kdray.data.views import crop_flip

    arrays = _hf_arrays(cfg)
    info = _hf_info(cfg, arrays)
    augment = None
    if not info.tokens and cfg.augment:  # off unless asked: kdray does not know these images' standard
        augment = partial(crop_flip, pad=max(1, info.input_shape[-1] // 8), flip=True)
    t = torch.from_numpy
    bundle = in_memory_bundle("hf", info, t(arrays["x"]), t(arrays["y"]), t(arrays["x_test"]), t(arrays["y_test"]),
                              cfg, augment=augment)
    bundle.details.update(classes=[str(n) for n in arrays["names"]], test_held_out_of_train=bool(arrays["carved"]))
    return bundle


# -- table: a pandas-readable file --------------------------------------------------------------------
TABLE_KEYS = ("path", "label", "features", "test_path", "test_fraction")
TABLE_READERS = (".parquet", ".pq", ".csv", ".tsv", ".json", ".jsonl")


def _read_table(path: Any, option: str) -> Any:
    pd = _need("pandas")
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError(f"data set 'table' needs `dataset.{option}`: a .parquet, .csv, .tsv, .json or .jsonl file")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetUnavailable(f"table: no file at {p} (dataset.{option})")
    suffix = p.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(p)
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",")
        if suffix in (".json", ".jsonl"):
            try:
                return pd.read_json(p, lines=suffix == ".jsonl")
            except ValueError:  # a .json file with one record per line
                return pd.read_json(p, lines=True)
    except ImportError as e:
        raise DatasetUnavailable(f"reading {p} needs a package pandas did not find: {e} (pip install pyarrow)"
                                 ) from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {p} (dataset.{option}): {e}") from None
    raise ValueError(f"dataset.{option}: {p.name} has none of the suffixes {_columns(TABLE_READERS)}")


def _table_columns(df: Any, opts: dict[str, Any], name: str) -> tuple[str, list[str]]:
    label = opts.get("label")
    if not isinstance(label, str) or not label:
        raise ValueError(f"data set 'table' needs `dataset.label`: the label column (columns of {name}: "
                         f"{_columns(df.columns)})")
    if label not in df.columns:
        raise ValueError(f"label column {label!r} not in {name} (columns: {_columns(df.columns)})")
    features = opts.get("features")
    if features is None:
        features = [c for c in df.columns if c != label]
    elif isinstance(features, str):
        features = [features]
    if not isinstance(features, (list, tuple)) or not features:
        raise ValueError(f"`dataset.features` must be a non-empty list of columns, got {opts.get('features')!r}")
    features = list(features)
    missing = [c for c in features if c not in df.columns]
    if missing:
        raise ValueError(f"feature column(s) {_columns(map(repr, missing))} not in {name} (columns: "
                         f"{_columns(df.columns)})")
    if label in features:
        raise ValueError(f"the label column {label!r} is also listed in `dataset.features`")
    return label, features


def _table_part(df: Any, label: str, features: list[str], name: str) -> tuple[np.ndarray, list]:
    pd = _need("pandas")
    non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(df[c])]
    if non_numeric:
        raise ValueError(f"non-numeric feature column(s) {_columns(map(repr, non_numeric))} in {name}: encode them "
                         "as numbers, or choose numeric columns with `features: [...]`")
    nan = df[features + [label]].isna().sum()
    nan = nan[nan > 0]
    if len(nan):
        raise ValueError(f"missing values in {name}: " + ", ".join(f"{c!r} ({n} rows)" for c, n in nan.items())
                         + "; fill or drop them first")
    x = df[features].to_numpy(dtype=np.float32)
    if not np.isfinite(x).all():
        bad = [c for c in features if not np.isfinite(df[c].to_numpy(dtype=np.float64)).all()]
        raise ValueError(f"infinite values in {name}: {_columns(map(repr, bad))}")
    return x, df[label].tolist()


def _table_arrays(cfg: "DatasetConfig") -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    opts = dict(cfg.options)
    df = _read_table(opts.get("path"), "path")
    name = Path(str(opts["path"])).name
    label, features = _table_columns(df, opts, name)
    x, y_raw = _table_part(df, label, features, name)
    if opts.get("test_path") is not None:
        tdf = _read_table(opts["test_path"], "test_path")
        tname = Path(str(opts["test_path"])).name
        if tname == name:
            tname = str(opts["test_path"])
        absent = [c for c in [label, *features] if c not in tdf.columns]
        if absent:
            raise ValueError(f"column(s) {_columns(map(repr, absent))} not in {tname} (dataset.test_path; columns: "
                             f"{_columns(tdf.columns)})")
        x_te, y_te_raw = _table_part(tdf, label, features, tname)
        y, y_te, names = _label_mapping(y_raw, y_te_raw, f"label column {label!r} of {name} and {tname}")
    else:
        y, _, names = _label_mapping(y_raw, [], f"label column {label!r} of {name}")
        keep, held = _hold_out_test(y, opts.get("test_fraction", 0.2), name)
        x, x_te, y, y_te = x[keep], x[held], y[keep], y[held]
    return {"x": x, "y": y, "x_test": x_te, "y_test": y_te}, names, features


def _table_info(cfg: "DatasetConfig", arrays: dict[str, np.ndarray], num_classes: int) -> DatasetInfo:
    mean, std = _stats(arrays["x"][_train_part(arrays["y"], cfg)], axis=(0,))
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature stays constant (0) instead of dividing by 0
    f = arrays["x"].shape[1]
    return DatasetInfo((f,), num_classes, (f,), tuple(float(m) for m in mean), tuple(float(s) for s in std))


def describe_table(cfg: "DatasetConfig") -> DatasetInfo:
    """Reads the table: the class count and the standardisation need the data."""
    arrays, names, _ = _table_arrays(cfg)
    return _table_info(cfg, arrays, len(names))


@register_dataset(
    "table", describe_table, offline=True, option_keys=TABLE_KEYS,
    description="a table (parquet, CSV, JSON): numeric feature columns and a label column; standardised per feature",
)
def load_table(cfg: "DatasetConfig") -> DataBundle:
    """float32 rows (N, F); the model's Preprocess standardises them with the training part's statistics."""
    arrays, names, features = _table_arrays(cfg)
    info = _table_info(cfg, arrays, len(names))
    t = torch.from_numpy
    bundle = in_memory_bundle("table", info, t(arrays["x"]), t(arrays["y"]), t(arrays["x_test"]),
                              t(arrays["y_test"]), cfg)
    bundle.details.update(classes=names, features=features)
    return bundle
