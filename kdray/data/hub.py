"""``dataset: {name: hf, ...}``: a Hugging Face data set saved with ``save_to_disk``, or local CSV / JSON / Parquet
files, of text (tokenised with the teacher's tokenizer) or images."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdray.data.base import (
    DataBundle,
    DatasetInfo,
    cached_arrays,
    data_dir,
    in_memory_bundle,
    register_dataset,
)
from kdray.errors import DatasetUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from kdray.data.base import DatasetSpec

from kdray.data.custom import (
    CACHE_VERSION,
    column_list,
    feature_stats,
    hold_out_test,
    label_mapping,
    need_package,
    slug,
    train_part,
)

# -- hf: Hugging Face data sets ------------------------------------------------------------------------
HF_KEYS = ("path", "text_column", "image_column", "label_column", "tokenizer", "max_length", "train_split",
           "test_split", "test_fraction")
HF_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".pq": "parquet",
              ".arrow": "arrow"}


def _hf_options(cfg: "DatasetSpec") -> dict[str, Any]:
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
        raise ValueError(f"dataset.path: files must all be one of {column_list(sorted(HF_FORMATS))}, got "
                         f"{column_list(Path(f).name for f in every)}")
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
    need_package("transformers")
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


def _open_hf(kind: str, source: Any, cfg: "DatasetSpec") -> dict[str, Any]:
    """The splits as ``datasets.Dataset`` objects."""
    ds = need_package("datasets")
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
    ds = need_package("datasets")
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
    y_tr, y_te, names = label_mapping(_column(train, col), _column(test, col) if test is not None else [],
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


def _hf_arrays(cfg: "DatasetSpec") -> dict[str, np.ndarray]:
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
            raise ValueError(f"train_split {train_name!r} not in {where} (splits: {column_list(splits)})")
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
                                     f"{column_list(d.column_names)}); set `dataset.{role}_column`{hint}")
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
            keep, held = hold_out_test(y_tr, opts["test_fraction"], f"{where} (it has no {test_name!r} split)")
            x_tr, x_te, y_tr, y_te = x_tr[keep], x_tr[held], y_tr[keep], y_tr[held]
        else:
            x_te = xs[1]
        return {"x": x_tr, "y": y_tr, "x_test": x_te, "y_test": y_te, "names": np.asarray(names, dtype=str),
                "pad": np.asarray(pad, dtype=np.int64), "carved": np.asarray(carved)}

    return cached_arrays(data_dir(cfg) / "hf" / f"{slug(opts['path'])}-{key}.npz", make)


def _hf_info(cfg: "DatasetSpec", arrays: dict[str, np.ndarray]) -> DatasetInfo:
    num_classes = len(arrays["names"])
    x = arrays["x"]
    if x.dtype == np.int64:  # token ids
        shape = tuple(x.shape[1:])
        return DatasetInfo(shape, num_classes, shape, input_dtype="int64", pad_token_id=int(arrays["pad"]))
    mean, std = feature_stats(x[train_part(arrays["y"], cfg)], axis=(0, 2, 3), scale=255.0)
    std = np.where(std > 0, std, 1.0)
    shape = tuple(x.shape[1:])
    return DatasetInfo(shape, num_classes, shape, tuple(float(m) for m in mean), tuple(float(s) for s in std),
                       input_dtype="uint8")


def describe_hf(cfg: "DatasetSpec") -> DatasetInfo:
    """Reads (and on first use tokenises or decodes and caches) the data set: the classes need the labels."""
    return _hf_info(cfg, _hf_arrays(cfg))


@register_dataset(
    "hf", describe_hf, offline=True, option_keys=HF_KEYS,
    description="a Hugging Face data set (text or images): path = save_to_disk folder or CSV/JSON/Parquet files",
)
def load_hf(cfg: "DatasetSpec") -> DataBundle:
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


