"""The best student of a sweep: chosen on validation, measured once on test, logged and registered.

Selection uses the validation accuracy at the last epoch of trials that ran to the end (an ASHA-stopped
trial's student is not fully trained). The test split is read once, after selection, and never feeds
back into it. The registered model is the ``Classifier`` (preprocessing + network), so it takes the data
set's raw inputs: for MNIST-1D the float32 rows ``x`` of ``make_dataset(get_dataset_args())``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdray.errors import KdrayError
from kdray.goal import ACCURACY, Goal
from kdray.models import load_record, model_from_record, save_model
from kdray.models.quantize import is_int8, serving_device
from kdray.tracking.store import TAG_STATUS, client, retrying

CHAMPION_ALIAS = "champion"
RECORD_NAME = "student.pt"


@dataclass
class TrialOutcome:
    trial_id: str
    run_id: str | None
    knowledge: str
    status: str  # completed | stopped_early | failed | error
    epochs: int
    val_accuracy: float
    params: dict[str, Any]
    checkpoint: Any  # a ray.train.Checkpoint (local or cloud storage) or a local path
    number: int = 0
    costs: dict[str, float] = field(default_factory=dict)  # student_params, latency_ms, latency_b64_ms
    metrics: dict[str, float] = field(default_factory=dict)  # the sweep's metric when it is not accuracy (val_nll)
    budget_tokens: float | None = None  # a language model's: tokens trained on and generated (loop.budget_metrics)


@dataclass
class Champion:
    sweep: str
    run_id: str
    trial_id: str
    knowledge: str
    val_accuracy: float
    test_accuracy: float
    model_uri: str
    registered_model: str
    version: str
    params: dict[str, Any] = field(default_factory=dict)
    alias_uri: str = ""  # models:/<name>@champion when the alias points at this version, else ""
    alias_moved: bool = True  # False: registered, but the alias stays on a better version
    alias_version: str = ""  # the version @champion points at after this registration
    note: str = ""  # "registered as version N; @champion ..." in words
    metrics: dict[str, float] = field(default_factory=dict)  # a language model's val_nll, test_nll, test_ppl

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def outcome_value(o: TrialOutcome, goal: Goal = ACCURACY) -> float:
    """A trial's value of the sweep's metric."""
    return o.val_accuracy if goal.metric == "val_accuracy" else o.metrics.get(goal.metric, math.nan)


def select(outcomes: list[TrialOutcome], goal: Goal = ACCURACY) -> TrialOutcome | None:
    """Best completed trial by the sweep's validation metric (ties: the earlier trial)."""
    done = [o for o in outcomes if o.status == "completed" and o.checkpoint]
    return max(done, key=lambda o: (goal.key(outcome_value(o, goal)), -o.number), default=None)


def read_checkpoint_record(checkpoint: Any) -> dict[str, Any]:
    """The student record of a trial checkpoint: a Ray Checkpoint (local disk or cloud storage) or a path."""
    import ray.train

    from kdray.runfiles import STUDENT_FILE

    if not isinstance(checkpoint, ray.train.Checkpoint):  # (a Checkpoint claims to be PathLike, and refuses it)
        if Path(checkpoint).exists():
            return load_record(Path(checkpoint) / STUDENT_FILE)
        checkpoint = ray.train.Checkpoint(str(checkpoint))
    with checkpoint.as_directory() as d:  # downloads once from cloud storage
        return load_record(Path(d) / STUDENT_FILE)


def test_metrics(record: dict[str, Any], dataset_cfg: dict[str, Any], use_gpu: bool = False) -> dict[str, float]:
    """A student record on the test split (the one place kdray reads it): ``test_accuracy``, and for a language
    model ``test_nll`` and ``test_ppl`` (per target token), and on prompt/answer rows ``test_exact_match``."""
    from kdray.config import DatasetConfig
    from kdray.data import load_dataset
    from kdray.data.evaluate import evaluate_model

    model = model_from_record(record)
    device = serving_device(model, torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu"))
    data = load_dataset(DatasetConfig.model_validate(dataset_cfg))
    out = evaluate_model(model.to(device), data.test, 512, device)
    return {f"test_{k}": float(out[k]) for k in ("accuracy", "nll", "ppl", "exact_match") if k in out}


def test_accuracy(record: dict[str, Any], dataset_cfg: dict[str, Any], use_gpu: bool = False) -> float:
    """Accuracy of a student record on the test split."""
    return test_metrics(record, dataset_cfg, use_gpu)["test_accuracy"]


def remote_test_metrics(record: dict[str, Any], dataset_cfg: dict[str, Any], gpus: float = 0.0) -> dict[str, float]:
    """The test evaluation: a Ray task on a GPU node when the trials use GPUs, else in this process."""
    import ray

    if not ray.is_initialized() or gpus == 0:  # on CPU, here: no worker process to start for one pass
        return test_metrics(record, dataset_cfg, False)
    task = ray.remote(test_metrics).options(num_cpus=1, num_gpus=min(gpus, 1.0))
    return dict(ray.get(task.remote(record, dataset_cfg, gpus > 0)))


def raw_example(split: Any) -> torch.Tensor:
    """The input example a registered model is logged with: five raw samples of an in-memory split, one of a
    file-backed split (each read costs a file)."""
    return split.head(5 if split.in_memory else 1)


def register(uri: str, outcome: TrialOutcome, record: dict[str, Any], test: dict[str, float] | float, *, sweep: str,
             model_name: str, parent_run_id: str, raw_example: torch.Tensor, goal: Goal = ACCURACY) -> Champion:
    """Log the champion as a new model version (a classifier with ``mlflow.pytorch``, signature + input example; a
    language model as a Hugging Face folder with its tokenizer, ``mlflow.transformers``), and point ``@champion`` at
    it only if it beats the version the alias points at now on the sweep's metric.

    Several sweeps share one registered model (one per search space); a sweep that found a worse
    student registers it, but the alias stays where it is. The version carries its metric as tags
    (``kdray.metric``, ``kdray.<metric>``); versions are compared only on the same metric.
    """
    test = test if isinstance(test, dict) else {"test_accuracy": float(test)}
    metric, mode = goal.metric, goal.mode
    c = client(uri)
    version = log_version(uri, outcome.run_id, record, test, model_name, raw_example, {"kdray.champion": "true"})
    value = float(outcome_value(outcome, goal))
    extra = {k: v for k, v in {**outcome.metrics, **test}.items() if k not in ("val_accuracy", "test_accuracy")}
    # The metric first: a concurrent registration compares against it (versions without it are not compared).
    for k, v in {"kdray.sweep": sweep, "kdray.metric": metric, "kdray.mode": mode, f"kdray.{metric}": f"{value:.6f}",
                 "val_accuracy": f"{outcome.val_accuracy:.6f}", "test_accuracy": f"{test['test_accuracy']:.6f}",
                 **{k: f"{v:.6f}" for k, v in extra.items()}, "knowledge": outcome.knowledge}.items():
        retrying(c.set_model_version_tag, model_name, version, k, v, what="tagging the model version")
    holder, why, before = settle_alias(c, model_name, version, metric, mode)
    moved = holder == version
    note = f"registered as version {version}; @{CHAMPION_ALIAS} " + (
        f"moved to it ({why})" if moved else
        f"stays on version {holder} ({why})" if holder == before else f"is on version {holder} ({why})")
    champion = Champion(sweep, outcome.run_id, outcome.trial_id, outcome.knowledge, outcome.val_accuracy,
                        test["test_accuracy"], f"models:/{model_name}/{version}", model_name, version, outcome.params,
                        f"models:/{model_name}@{CHAMPION_ALIAS}" if moved else "", moved, holder, note, extra)
    for k, v in {"kdray.champion_run_id": champion.run_id, "kdray.champion_model_uri": champion.model_uri,
                 "kdray.champion_knowledge": champion.knowledge, "kdray.registered_model": model_name,
                 "kdray.champion_version": version, "kdray.champion_alias": note}.items():
        retrying(c.set_tag, parent_run_id, k, v, what="tagging the sweep run")
    for k, v in {"val_accuracy": champion.val_accuracy, "test_accuracy": champion.test_accuracy, **extra}.items():
        retrying(c.log_metric, parent_run_id, f"champion_{k}", v, what="logging a metric")
    retrying(c.log_text, parent_run_id, json.dumps(champion.as_dict(), indent=2, default=str), "champion.json",
             what="logging champion.json")
    return champion


def log_version(uri: str, run_id: str, record: dict[str, Any], test: dict[str, float] | float, model_name: str,
                raw_example: torch.Tensor, run_tags: dict[str, str]) -> str:
    """Log a trial's student in its run and the kdray record, register it as a new version of ``model_name`` and
    return that version: a classifier with ``mlflow.pytorch`` (signature + input example), a causal LM as a Hugging
    Face folder with its tokenizer (:func:`kdray.tracking.lm.log_lm`)."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(uri)
    test = test if isinstance(test, dict) else {"test_accuracy": float(test)}
    model = model_from_record(record).eval()
    with mlflow.start_run(run_id=run_id):
        if model.causal_lm:
            from kdray.tracking.lm import log_lm

            info = log_lm(model, record, model_name)
        else:
            example = raw_example[:5]  # as stored: uint8 images stay uint8 (the model scales them itself)
            with torch.no_grad():
                out = model(example)
            signature = infer_signature(example.numpy(), out.numpy())
            # MLflow 3 saves PyTorch models as "pt2" (torch.export): loading runs no pickled code. torch.export has no
            # rule for an int8 model's packed weights: it is logged as TorchScript (torch.jit.save), which
            # mlflow.pytorch.load_model reads back with torch.jit.load.
            int8 = is_int8(model)
            with quiet_torchscript() if int8 else contextlib.nullcontext():
                info = mlflow.pytorch.log_model(
                    traced(model, example) if int8 else model, name="student", signature=signature,
                    input_example=example.numpy(), registered_model_name=model_name,
                    pip_requirements=_requirements(),
                    # MLflow's "pickle" format saves a ScriptModule with torch.jit.save: no pickled code either
                    **({"serialization_format": "pickle"} if int8 else {}),
                )
        mlflow.log_metrics(test)
        mlflow.set_tags(run_tags)
        # The kdray record too (weights_only-loadable, rebuildable as a module): what --export reads.
        with tempfile.TemporaryDirectory() as d:
            save_model(record, Path(d) / RECORD_NAME)
            mlflow.log_artifact(str(Path(d) / RECORD_NAME), "kdray")
    return str(info.registered_model_version)


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Logging a TorchScript student: MLflow warns that its "pickle" format may run code (it saves a ScriptModule
    with ``torch.jit.save``, which does not), and PyTorch that TorchScript is deprecated, as MLflow loads it back to
    check the input example. None of it is the user's to act on."""
    import logging
    import warnings

    log = logging.getLogger("mlflow.pytorch")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*TorchScript archive", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
            yield
    finally:
        log.setLevel(level)


def traced(model: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``model`` as TorchScript traced on ``example`` (PyTorch marks tracing deprecated in favour of torch.export,
    which cannot take an int8 model's packed weights: the warning is not shown)."""
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace", category=FutureWarning)
        return torch.jit.trace(model, example, check_trace=False)


def _metric_of(version, metric: str) -> float | None:
    """The version's value of ``metric`` (from its kdray tags), None if it was registered on another metric."""
    tags = version.tags or {}
    if tags.get("kdray.metric") != metric:
        return None
    try:
        v = float(tags[f"kdray.{metric}"])
    except (KeyError, ValueError):
        return None
    return v if math.isfinite(v) else None


def settle_alias(c, name: str, own: str, metric: str, mode: str = "max",
                 rounds: int = 5) -> tuple[str, str, str | None]:
    """Point ``@champion`` at the best of: the version it points at, ``own``, and every version registered
    after the one it pointed at when this call began (sweeps registering at the same time). Return the
    version it points at in the end, why (in words), and the version it pointed at before.

    Ties keep the current holder. A holder registered on another metric (or by an older kdray, with no
    metric tag) cannot be compared and is replaced. Each round re-reads after writing, so two sweeps
    registering at once leave the alias on the better model whichever writes last. Versions older than
    the holder at the start are not candidates: an alias moved back by hand stays until a better model
    arrives.
    """
    sign = 1.0 if mode == "max" else -1.0
    own, first, floor, first_val = str(own), None, None, None
    best, own_val, comparable = own, None, {}
    for _ in range(rounds):
        aliases = retrying(c.get_registered_model, name, what="reading the registered model").aliases or {}
        current = str(aliases[CHAMPION_ALIAS]) if CHAMPION_ALIAS in aliases else None
        versions = {str(v.version): v for v in _all_versions(c, name)}
        if floor is None:
            first, floor = current, int(current) if current is not None else 0
            first_val = _metric_of(versions[current], metric) if current in versions else None
        cands = {v: mv for v, mv in versions.items() if int(v) > floor or v in (own, current)}
        comparable = {v: x for v, x in ((v, _metric_of(mv, metric)) for v, mv in cands.items()) if x is not None}
        own_val = comparable.get(own)
        # the best value; ties: the current holder, then the earliest version
        best = max(comparable, key=lambda v: (sign * comparable[v], v == current, -int(v))) if comparable else own
        if best == current:
            break
        retrying(c.set_registered_model_alias, name, CHAMPION_ALIAS, best, what="moving the champion alias")
        time.sleep(0.2)  # then read again: a sweep registering at the same moment may have moved it
    # why, against the holder when this registration began
    if first is None:
        why = "the first champion"
    elif first_val is None:
        why = f"version {first} has no {metric} to compare"
    elif own_val is None:
        why = f"version {own} has no {metric} to compare"
    elif best == own:
        why = f"{metric} {own_val:.4f} {'>' if mode == 'max' else '<'} {first_val:.4f} of version {first}"
    elif best == first:
        rel = "=" if own_val == first_val else ">" if first_val > own_val else "<"
        why = f"{metric} {first_val:.4f} {rel} {own_val:.4f}"
    else:
        why = f"version {best}, registered meanwhile, has {metric} {comparable.get(best, float('nan')):.4f}"
    return best, why, first


def _all_versions(c, name: str) -> list:
    out, token = [], None
    while True:
        page = retrying(c.search_model_versions, f"name = '{name}'", max_results=1000, page_token=token,
                        what="listing model versions")
        out.extend(page)
        token = page.token
        if not token:
            return out


def _requirements() -> list[str]:
    """Pins for the logged model's environment: what loading a kdray student needs."""
    import torch as _t

    from kdray.version import __version__

    return [f"torch=={_t.__version__.split('+')[0]}", f"kdray=={__version__}"]


def export(run_id: str, out_dir: str | os.PathLike, tracking: str,
           formats: tuple[str, ...] = ("state_dict", "torchscript")) -> dict[str, str]:
    """Write the champion of run ``run_id`` as a kdray record, a state dict, TorchScript and/or ONNX.

    Every format takes the data set's raw inputs (the preprocessing is part of the module).
    """
    import mlflow

    mlflow.set_tracking_uri(tracking)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"kdray/{RECORD_NAME}", dst_path=str(out))
    written = export_record(load_record(local), out, formats, f"MLflow run {run_id}")
    written["kdray_record"] = str(Path(local))
    return written


def export_record(record: dict[str, Any], out_dir: str | os.PathLike,
                  formats: tuple[str, ...] = ("state_dict", "torchscript"), source: str = "") -> dict[str, str]:
    """Write ``record`` as a state dict, TorchScript and/or ONNX taking the data set's raw samples: the
    shape and dtype one stored sample has (uint8 (C, H, W) images, float rows), any batch size."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model_from_record(record).eval()
    if model.causal_lm:
        return export_lm(record, model, out, source)
    if "onnx" in formats and is_int8(model):  # before anything is written
        raise KdrayError("an int8 student is exported as TorchScript (and its state dict); PyTorch's ONNX exporter "
                         "does not take its quantised layers: export without --onnx")
    raw = record.get("raw_input") or {"shape": list(model.preprocess.shape), "dtype": "float32"}
    shape, dtype = tuple(raw["shape"]), getattr(torch, raw["dtype"])
    example = torch.zeros((2, *shape), dtype=dtype)
    written: dict[str, str] = {}
    if "state_dict" in formats:
        p = out / "student_state_dict.pt"
        torch.save(model.state_dict(), p)
        written["state_dict"] = str(p)
    if "torchscript" in formats:
        p = out / "student.torchscript.pt"
        traced(model, example).save(str(p))
        written["torchscript"] = str(p)
    if "onnx" in formats:
        try:
            import onnx  # noqa: F401  (torch's exporter needs it)
        except ImportError:
            raise KdrayError("ONNX export needs the onnx package: pip install 'kdray[onnx]'") from None
        p = out / "student.onnx"
        torch.onnx.export(model, (example,), str(p), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        written["onnx"] = str(p)
    scale = " (0-255: the model divides by 255 and normalises inside)" if raw["dtype"] == "uint8" else ""
    (out / "README.txt").write_text(
        f"kdray champion{' of ' + source if source else ''}: {record['model']} trained on "
        f"{record['dataset'].get('name')}.\n"
        f"Input: {raw['dtype']} raw samples as the data set stores them, shape (batch, {', '.join(map(str, shape))})"
        f"{scale}; any batch size. Output: float32 logits, shape (batch, {record['num_classes']}).\n"
        "student.pt: kdray.models.model_from_record(kdray.models.load_record(path)).\n"
        + ("student_state_dict.pt: the int8 model's (packed weights); rebuild it from student.pt.\n" if is_int8(model)
           else "student_state_dict.pt: load into kdray.models.build_model(<model>, <classes>, <Preprocess>).\n") +
        "student.torchscript.pt: torch.jit.load(path)(x).  student.onnx: onnxruntime.InferenceSession(path)"
        ".run(None, {'x': x})[0].\n"
    )
    return written


def export_lm(record: dict[str, Any], model: Any, out: Path, source: str = "") -> dict[str, str]:
    """A causal LM: the Hugging Face folder (``save_pretrained``: config, weights, generation settings) with its
    tokenizer, which ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load."""
    from kdray.tracking.lm import save_hf_folder

    save_hf_folder(record, out, model)
    (out / "README.txt").write_text(
        f"kdray champion{' of ' + source if source else ''}: {record['model']} trained on "
        f"{record['dataset'].get('name')}, a causal language model of {record['num_classes']} tokens.\n"
        "Load it with transformers: AutoModelForCausalLM.from_pretrained(this folder) and "
        "AutoTokenizer.from_pretrained(this folder); model.generate(**tokenizer(text, return_tensors='pt')).\n"
        "student.pt: the kdray record, kdray.models.model_from_record(kdray.models.load_record(path)).\n")
    return {"hf_folder": str(out)}


def outcome_status(tags: dict[str, str]) -> str:
    return tags.get(TAG_STATUS, "unknown")
