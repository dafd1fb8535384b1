"""``dataset: {name: table, path: x.parquet, label: y}``: a table read with pandas, every other column a numeric
feature, standardised with the training part's statistics inside the model."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdray.data.base import (
    DataBundle,
    DatasetInfo,
    in_memory_bundle,
    register_dataset,
)
from kdray.errors import DatasetUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from kdray.data.base import DatasetSpec

from kdray.data.custom import column_list, feature_stats, hold_out_test, label_mapping, need_package, train_part

# -- table: a pandas-readable file --------------------------------------------------------------------
TABLE_KEYS = ("path", "label", "features", "test_path", "test_fraction")
TABLE_READERS = (".parquet", ".pq", ".csv", ".tsv", ".json", ".jsonl")


def _read_table(path: Any, option: str) -> Any:
    pd = need_package("pandas")
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
    raise ValueError(f"dataset.{option}: {p.name} has none of the suffixes {column_list(TABLE_READERS)}")


def _table_columns(df: Any, opts: dict[str, Any], name: str) -> tuple[str, list[str]]:
    label = opts.get("label")
    if not isinstance(label, str) or not label:
        raise ValueError(f"data set 'table' needs `dataset.label`: the label column (columns of {name}: "
                         f"{column_list(df.columns)})")
    if label not in df.columns:
        raise ValueError(f"label column {label!r} not in {name} (columns: {column_list(df.columns)})")
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
        raise ValueError(f"feature column(s) {column_list(map(repr, missing))} not in {name} (columns: "
                         f"{column_list(df.columns)})")
    if label in features:
        raise ValueError(f"the label column {label!r} is also listed in `dataset.features`")
    return label, features


def _table_part(df: Any, label: str, features: list[str], name: str) -> tuple[np.ndarray, list]:
    pd = need_package("pandas")
    non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(df[c])]
    if non_numeric:
        raise ValueError(f"non-numeric feature column(s) {column_list(map(repr, non_numeric))} in {name}: encode them "
                         "as numbers, or choose numeric columns with `features: [...]`")
    nan = df[features + [label]].isna().sum()
    nan = nan[nan > 0]
    if len(nan):
        raise ValueError(f"missing values in {name}: " + ", ".join(f"{c!r} ({n} rows)" for c, n in nan.items())
                         + "; fill or drop them first")
    x = df[features].to_numpy(dtype=np.float32)
    if not np.isfinite(x).all():
        bad = [c for c in features if not np.isfinite(df[c].to_numpy(dtype=np.float64)).all()]
        raise ValueError(f"infinite values in {name}: {column_list(map(repr, bad))}")
    return x, df[label].tolist()


def _table_arrays(cfg: "DatasetSpec") -> tuple[dict[str, np.ndarray], list[str], list[str]]:
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
            raise ValueError(f"column(s) {column_list(map(repr, absent))} not in {tname} (dataset.test_path; columns: "
                             f"{column_list(tdf.columns)})")
        x_te, y_te_raw = _table_part(tdf, label, features, tname)
        y, y_te, names = label_mapping(y_raw, y_te_raw, f"label column {label!r} of {name} and {tname}")
    else:
        y, _, names = label_mapping(y_raw, [], f"label column {label!r} of {name}")
        keep, held = hold_out_test(y, opts.get("test_fraction", 0.2), name)
        x, x_te, y, y_te = x[keep], x[held], y[keep], y[held]
    return {"x": x, "y": y, "x_test": x_te, "y_test": y_te}, names, features


def _table_info(cfg: "DatasetSpec", arrays: dict[str, np.ndarray], num_classes: int) -> DatasetInfo:
    mean, std = feature_stats(arrays["x"][train_part(arrays["y"], cfg)], axis=(0,))
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature stays constant (0) instead of dividing by 0
    f = arrays["x"].shape[1]
    return DatasetInfo((f,), num_classes, (f,), tuple(float(m) for m in mean), tuple(float(s) for s in std))


def describe_table(cfg: "DatasetSpec") -> DatasetInfo:
    """Reads the table: the class count and the standardisation need the data."""
    arrays, names, _ = _table_arrays(cfg)
    return _table_info(cfg, arrays, len(names))


@register_dataset(
    "table", describe_table, offline=True, option_keys=TABLE_KEYS,
    description="a table (parquet, CSV, JSON): numeric feature columns and a label column; standardised per feature",
)
def load_table(cfg: "DatasetSpec") -> DataBundle:
    """float32 rows (N, F); the model's Preprocess standardises them with the training part's statistics."""
    arrays, names, features = _table_arrays(cfg)
    info = _table_info(cfg, arrays, len(names))
    t = torch.from_numpy
    bundle = in_memory_bundle("table", info, t(arrays["x"]), t(arrays["y"]), t(arrays["x_test"]),
                              t(arrays["y_test"]), cfg)
    bundle.details.update(classes=names, features=features)
    return bundle
