"""A teacher from the MLflow registry: a user's production model teaches without an export step.

``teacher: {mlflow: "models:/fraud-net@production"}`` loads a model logged with ``mlflow.pytorch``. Such a
model is a pickled ``nn.Module`` of the user's own class (unlike kdray's weights-only records), so it is
handed to the workers through Ray's object store: MLflow 3's default "pt2" format (``torch.export``) as
the program's bytes, loaded in each worker (no pickled code runs, and no class needs importing); the older
"pickle" format (which MLflow refuses to load unless ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``) as the
unpickled module, whose class must be importable in every worker (an installed package or a kdray plugin).
It receives the data set's samples as training batches hold them (rows and token ids unchanged, 8-bit
images as floats in [0, 1]) and must return logits. An
exported program has no named submodules to tap, so it teaches through its logits (kd, dkd).

Its signature, when it was logged with one, is checked against the data set before anything trains:
input shape and dtype against the stored samples, output width against the class count. Without a
signature a dry forward pass on two samples checks the output instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdray.data.base import DatasetInfo
from kdray.errors import KdrayError
from kdray.models.checkpoint import FORMAT
from kdray.models.foreign import MODULE_KEY, PT2_KEY, foreign_module


class MlflowTeacherError(KdrayError, ValueError):
    """The registered model cannot teach on this data set (missing, not PyTorch, wrong signature)."""


def _signature_problems(sig: Any, info: DatasetInfo) -> list[str]:
    problems: list[str] = []
    try:
        inputs = sig.inputs.inputs if sig is not None and sig.inputs is not None else []
        outputs = sig.outputs.inputs if sig is not None and sig.outputs is not None else []
    except AttributeError:
        return problems
    if len(inputs) == 1 and hasattr(inputs[0], "shape"):
        spec = inputs[0]
        shape = tuple(spec.shape)[1:]
        if shape and tuple(int(s) for s in shape) != tuple(info.input_shape) and -1 not in shape:
            problems.append(f"its signature takes inputs of shape {shape} but the data set's samples are "
                            f"{tuple(info.input_shape)}")
        dtype = str(getattr(spec, "type", "")).replace("dtype(", "").replace(")", "").strip("'")
        want = np.dtype("float32" if info.input_dtype == "uint8" else info.input_dtype)  # 8-bit images as [0, 1]
        if dtype and np.dtype(dtype).kind != want.kind:
            problems.append(f"its signature takes {dtype} inputs but the data set's samples are {want}")
    if len(outputs) == 1 and hasattr(outputs[0], "shape"):
        shape = tuple(outputs[0].shape)
        if len(shape) == 2 and shape[-1] not in (-1, info.num_classes):
            problems.append(f"its signature returns {shape[-1]} outputs per sample but the data set has "
                            f"{info.num_classes} classes")
    return problems


def _fetch(uri: str) -> tuple[bytes | None, nn.Module | None]:
    """The model as a pt2 program (bytes, rebuilt in every worker) or, for MLflow's "pickle" format, as the
    unpickled module (MLflow refuses that unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    programs = sorted(local.rglob("*.pt2"))
    if programs:
        return programs[0].read_bytes(), None
    try:
        module = mlflow.pytorch.load_model(str(local), map_location="cpu")
    except MlflowException as e:
        raise MlflowTeacherError(f"cannot load {uri}: {e.message}") from None
    except (ModuleNotFoundError, AttributeError) as e:
        raise MlflowTeacherError(f"cannot load {uri}: {e}. The model's class must be importable here and on every "
                                 "worker: install its package, or name its module in `plugins:`") from None
    return None, module


def load_mlflow_teacher(uri: str, info: DatasetInfo, tracking_uri: str) -> dict[str, Any]:
    """A teacher record for a registered model, checked against ``info``: ``record["pt2"]`` holds an exported
    program, ``record["module"]`` an unpickled module (see ``kdray.models.checkpoint.model_from_record``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    try:
        model_info = mlflow.models.get_model_info(uri)
    except (MlflowException, OSError) as e:
        raise MlflowTeacherError(f"cannot find {uri} in the MLflow registry at {tracking_uri}: "
                                 f"{str(e).splitlines()[0]}") from None
    if "pytorch" not in (model_info.flavors or {}):
        raise MlflowTeacherError(f"{uri} was not logged with mlflow.pytorch (its flavors: "
                                 f"{', '.join(sorted(model_info.flavors or {}))})")
    problems = _signature_problems(model_info.signature, info)
    if problems:
        raise MlflowTeacherError(f"{uri} does not fit this data set: " + "; ".join(problems))
    program, module = _fetch(uri)
    if module is not None and not isinstance(module, nn.Module):
        raise MlflowTeacherError(f"{uri} loads as {type(module).__name__}, not a torch.nn.Module")
    record: dict[str, Any] = {
        "format": FORMAT,
        "model": uri,
        "model_options": {},
        "num_classes": int(info.num_classes),
        "preprocess": {"shape": list(info.input_shape), "mean": [0.0], "std": [1.0], "passthrough": True},
        "dataset": {},
        "metrics": {},
        "config": {"mlflow": uri, "run_id": model_info.run_id},
        PT2_KEY: program,
        MODULE_KEY: module.float().eval() if module is not None else None,
    }
    net = foreign_module(record)
    record["state_dict"] = {k: v.detach() for k, v in net.state_dict().items()}  # the teacher-cache key hashes it
    from kdray.data.loaders import to_float

    x = to_float(info.example_input(2))  # what training feeds it: 8-bit images arrive as floats in [0, 1]
    try:
        with torch.no_grad():
            out = net(x)
    except Exception as e:  # noqa: BLE001 - the user's model failing on the data is the user's input at fault
        raise MlflowTeacherError(f"{uri} fails on two samples of the data set (shape {tuple(x.shape)}, "
                                 f"{x.dtype}): {type(e).__name__}: {e}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, info.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise MlflowTeacherError(f"{uri} returns {got} for 2 samples; a teacher must return logits "
                                 f"(2, {info.num_classes})")
    return record
