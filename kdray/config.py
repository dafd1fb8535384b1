"""Typed configuration, validated once at the edge.

YAML is read with ``yaml.safe_load`` and validated by pydantic models; any problem becomes a
``ConfigError`` that names the file and the dotted field (``knowledge.0.temperature``) before Ray or
MLflow is touched. The resolved config (defaults filled in) is what every run logs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdray.data import DATASETS
from kdray.knowledge import KNOWLEDGE
from kdray.models import MODELS


class ConfigError(Exception):
    """A bad config: a list of (field, message) pairs, and the file they came from."""

    def __init__(self, errors: list[tuple[str, str]] | str, file: str | Path | None = None, field: str = "") -> None:
        if isinstance(errors, str):
            errors = [(field, errors)]
        self.errors = errors
        self.file = str(file) if file else None
        super().__init__(self._message())

    def with_file(self, file: str | Path) -> "ConfigError":
        return ConfigError(self.errors, file)

    def _message(self) -> str:
        where = f"{self.file}: " if self.file else ""
        lines = [f"{where}{f'field {f!r}: ' if f else ''}{m}" for f, m in self.errors]
        return lines[0] if len(lines) == 1 else f"{len(lines)} problems:\n  " + "\n  ".join(lines)

    def __str__(self) -> str:
        return self._message()

    @property
    def fields(self) -> list[str]:
        return [f for f, _ in self.errors]


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _valid_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The field names of the model that sits at ``loc`` (best effort, for 'unknown field' errors)."""
    cls: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(cls, "model_fields", None)
        if not fields or part not in fields:
            return None
        ann = fields[part].annotation
        cls = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cls is None:
            return None
    return list(getattr(cls, "model_fields", {}) or []) or None


def pydantic_errors(e: ValidationError, root: type[BaseModel], prefix: tuple[Any, ...] = ()) -> list[tuple[str, str]]:
    out = []
    for err in e.errors():
        loc = prefix + tuple(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            keys = _valid_keys(root, tuple(err["loc"])[:-1])
            msg = "unknown field" + (f" (valid fields here: {', '.join(keys)})" if keys else "")
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif "input" in err and err["type"] not in ("value_error", "assertion_error"):
            shown = repr(err["input"])
            msg += f" (got {shown[:80]}{'...' if len(shown) > 80 else ''})"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        out.append((_loc(loc), msg))
    return out


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


_reading: list[Path] = []  # the config file being validated: its folder is searched for plugin modules


def import_config_plugins(data: Any) -> Any:
    """Import a config's ``plugins`` (and installed entry points) before any field names a registry entry:
    a ``model_validator(mode="before")`` of every top-level config, so a Ray worker that validates a trial's
    config imports them too. Errors name the field (``plugins.1``)."""
    from kdray import plugins

    try:
        plugins.load_entry_points()
        if isinstance(data, dict) and data.get("plugins") is not None:
            mods = data["plugins"]
            if isinstance(mods, str):
                mods = [mods]
            if not isinstance(mods, list):
                raise plugins.PluginError("plugins", f"expected a list of Python module names, got {mods!r}")
            search = [p.parent for p in _reading[-1:]] + [Path.cwd()]
            plugins.import_plugins(mods, where="plugins", search=search)
            data = {**data, "plugins": mods}
    except plugins.PluginError as e:
        raise ConfigError([(e.field, e.reason)]) from None
    return data


def local_path(value: Any) -> Any:
    """A relative path that exists next to the config being read (else in the working directory) made
    absolute: Ray workers run in other folders. Anything else (a hub id, a URI) is returned unchanged."""
    if isinstance(value, list):
        return [local_path(v) for v in value]
    if isinstance(value, dict):
        return {k: local_path(v) for k, v in value.items()}
    if not isinstance(value, str) or not value or "://" in value or Path(value).is_absolute():
        return value
    for folder in [p.parent for p in _reading[-1:]] + [Path.cwd()]:
        candidate = folder / value
        if candidate.exists():
            return str(candidate.resolve())
    return value


def absolute_dir(value: Any) -> Any:
    """A folder given relative (``data``, ``~/data``) made absolute: next to the config being read when it exists
    there, else in the working directory (it may be created later, a download's target). Tune runs each trial in
    a folder of its own: a relative path would point elsewhere in every trial."""
    if not isinstance(value, str) or not value or "://" in value:
        return value
    value = str(Path(value).expanduser())
    if Path(value).is_absolute():
        return value
    found = local_path(value)
    return found if found != value else str((Path.cwd() / value).resolve())


def absolute_hf_name(name: Any) -> Any:
    """``hf/./my-bert`` -> ``hf//abs/path/my-bert``: workers build the model from the same folder."""
    if isinstance(name, str) and name.startswith("hf/"):
        return "hf/" + local_path(name[len("hf/"):])
    return name


PATH_OPTIONS = ("path", "test_path", "root", "tokenizer", "data_files")  # data-set options that name files


PLUGINS_FIELD = Field(default_factory=list, description="Python modules to import first: they register your own "
                      "models, data sets and knowledge types (also --plugin and the kdray.plugins entry points)")


# -- pieces --------------------------------------------------------------------------------------------
SPLIT_FIELDS = ("name", "options", "val_fraction", "split_seed")  # what decides which samples are validation


class DatasetConfig(Strict):
    name: Annotated[str, AfterValidator(DATASETS.check)] = Field(
        "mnist1d", description="a registered data set (kdray list)")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of train carved out for validation")
    split_seed: int = Field(0, description="seed of the train/validation split (fixed across trials)")
    data_dir: str | None = Field(None, description="where data sets live (default $KDRAY_DATA_DIR or ~/.cache/kdray/data)")
    download: bool = Field(False, description="allow torchvision to download a missing data set")
    augment: bool | None = Field(None, description="random augmentation of training images (default: the set's standard)")
    options: dict[str, Any] = Field(default_factory=dict, description="data-set specific options")

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: str | None) -> str | None:
        return absolute_dir(value)

    @model_validator(mode="before")
    @classmethod
    def _flat_options(cls, data: Any) -> Any:
        """A data set's own options may sit beside ``name`` (``{name: table, path: x.parquet, label: y}``)."""
        if not isinstance(data, dict) or not isinstance(data.get("name", "mnist1d"), str):
            return data
        name = data.get("name", "mnist1d")
        if name not in DATASETS:
            return data
        keys = DATASETS.get(name).option_keys
        flat = {k: v for k, v in data.items() if k not in cls.model_fields and k in keys}
        if not flat:
            return data
        options = data.get("options") or {}
        if not isinstance(options, dict):
            return data
        twice = sorted(set(flat) & set(options))
        if twice:
            raise ValueError(f"option(s) {twice} given both beside `name` and under `options`")
        return {**{k: v for k, v in data.items() if k not in flat}, "options": {**options, **flat}}

    def split_differences(self, other: dict[str, Any]) -> list[str]:
        """The fields of another run's data set config (a checkpoint's) that give it a different split."""
        mine = self.model_dump(mode="json")
        return [f"{k}: {other.get(k)!r} there, {mine[k]!r} here" for k in SPLIT_FIELDS
                if other.get(k, DatasetConfig.model_fields[k].get_default(call_default_factory=True)) != mine[k]]

    @model_validator(mode="after")
    def _options(self) -> "DatasetConfig":
        keys = DATASETS.get(self.name).option_keys
        for key in PATH_OPTIONS:
            if key in self.options:
                self.options[key] = local_path(self.options[key])
        unknown = sorted(set(self.options) - set(keys))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for data set {self.name!r}"
                + (f"; valid: {', '.join(keys)}" if keys else "; it takes no options")
            )
        return self


def default_tokenizer(dataset: DatasetConfig, models: list[Any]) -> None:
    """A text data set of your own is tokenised with the teacher's tokenizer (else the student's) when the run
    names a Hugging Face model and the data set names no tokenizer."""
    opts = dataset.options
    if dataset.name != "hf" or opts.get("tokenizer") or opts.get("image_column"):
        return
    source = next((m for m in models if isinstance(m, str) and m.startswith("hf/")), None)
    if source:
        opts["tokenizer"] = local_path(source[len("hf/"):])


class ModelConfig(Strict):
    name: Annotated[str, BeforeValidator(absolute_hf_name), AfterValidator(MODELS.check)] = Field(
        description="a registered model (kdray list), timm/<timm name> or hf/<hub id or local path>")
    options: dict[str, Any] = Field(default_factory=dict, description="constructor options, e.g. hidden: [64]")
    init_from_teacher: Literal["every_other_layer"] | None = Field(
        None, description="a student: start from the teacher's own weights, keeping every other transformer "
        "layer (DistilBERT's initialisation); the teacher must be a Hugging Face model")


class TrainConfig(Strict):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    scheduler: Literal["none", "cosine", "step"] = "cosine"
    step_epochs: list[int] = Field(default_factory=list, description="epochs at which `step` multiplies lr by gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it (else fp16), fp32 on CPU"
    )
    channels_last: bool | None = Field(None, description="NHWC memory format for 2-D convnets (default: on GPU)")
    checkpoint_every: int = Field(1, ge=1, description="save a resumable checkpoint every N epochs (and the last)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept per run: the newest K (Ray's num_to_keep)")
    sync_batchnorm: bool = Field(False, description="SyncBatchNorm across DDP ranks (GPU workers only); without it "
                                 "rank 0's BatchNorm statistics are broadcast before every validation")
    deterministic: bool = Field(False, description="deterministic kernels (cudnn.benchmark off, "
                                "torch.use_deterministic_algorithms): bit-identical reruns on GPUs, slower")

    @model_validator(mode="after")
    def _step(self) -> "TrainConfig":
        if self.scheduler == "step" and not self.step_epochs:
            raise ValueError("scheduler 'step' needs step_epochs, e.g. [150, 180, 210]")
        if self.scheduler == "step" and any(m <= self.warmup_epochs for m in self.step_epochs):
            raise ValueError(f"step_epochs {self.step_epochs} must come after the warm-up ({self.warmup_epochs} epochs)")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        return self


class ResourcesConfig(Strict):
    num_workers: int = Field(1, ge=1, description="data-parallel workers (Ray Train) for one run or trial")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker; also its torch thread count")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker; a fraction < 1 shares a GPU between trials")
    execution: Literal["auto", "train", "inline"] = Field(
        "auto",
        description="how a sweep trial runs: train = a Ray Train TorchTrainer; inline = the same loop inside the "
        "Tune trial (no worker group to start); auto = inline for one CPU worker, train otherwise",
    )
    loader_workers: int = Field(0, ge=0, description="DataLoader processes per worker (file-backed data sets)")
    max_failures: int = Field(2, ge=-1, description="times a failed worker/trial is restarted from its checkpoint")

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError(f"more than one GPU per worker must be a whole number, got {v}")
        return v

    @model_validator(mode="after")
    def _one_device_per_rank(self) -> "ResourcesConfig":
        # Ray would place both ranks of one run on the same GPU, and NCCL refuses that
        # ("Duplicate GPU detected"); several one-worker *trials* may still share a GPU.
        if self.num_workers > 1 and 0 < self.gpus_per_worker < 1:
            raise ConfigError([("resources.gpus_per_worker",
                                f"{self.num_workers} workers x {self.gpus_per_worker:g} GPU would put several ranks "
                                "of one run on one GPU, which NCCL refuses; use gpus_per_worker: 1 (or more) with "
                                "several workers, or num_workers: 1 to share a GPU between trials")])
        return self

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def resolved_execution(self) -> str:
        if self.execution != "auto":
            return self.execution
        return "inline" if self.num_workers == 1 and not self.use_gpu else "train"


class TeacherTrainSpec(Strict):
    """Train the teacher before the run (once; reused while its config and data are unchanged)."""

    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    seed: int = 0


class TeacherConfig(Strict):
    """Where the teacher comes from: exactly one of a kdray checkpoint, a config to train first, a model by name
    (``hf/...``, ``timm/...`` with its pretrained weights) or a model in the MLflow registry."""

    checkpoint: str | list[str] | None = Field(
        None, description="a kdray model checkpoint, or a list of them (an ensemble whose logits are averaged)"
    )
    train: TeacherTrainSpec | None = Field(None, description="train this teacher first instead of loading one")
    name: Annotated[str, BeforeValidator(absolute_hf_name), AfterValidator(MODELS.check)] | None = Field(
        None, description="a ready-made model by name with its own weights: hf/<hub id or local path> (a fine-tuned "
        "classifier), timm/<name> with options {pretrained: true}, or a plugin's model")
    options: dict[str, Any] = Field(default_factory=dict, description="with `name`: the model's options")
    mlflow: str | None = Field(
        None, description="a model logged with mlflow.pytorch: models:/<name>@<alias>, models:/<name>/<version> or "
        "runs:/<run id>/<path>; it takes the data set's raw inputs and returns logits")
    tracking_uri: str | None = Field(
        None, description="with `mlflow`: the tracking server (default $MLFLOW_TRACKING_URI, else the command's "
        "--tracking-uri, else sqlite:///mlflow.db)")
    allow_split_mismatch: bool = Field(
        False, description="use a teacher trained on another train/validation split (it has seen validation "
        "samples, which biases selection towards distillation); tagged in MLflow")

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherConfig":
        given = [k for k in ("checkpoint", "train", "name", "mlflow") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of `checkpoint` (path or list of paths), `train`, `name` (a model "
                             "with its weights, e.g. hf/...) or `mlflow` (models:/name@alias)"
                             + (f"; got {', '.join(given)}" if given else ""))
        if isinstance(self.checkpoint, list) and not self.checkpoint:
            raise ValueError("`checkpoint` is an empty list")
        if self.options and self.name is None:
            raise ValueError("`options` go with `name`")
        if self.mlflow is not None and not self.mlflow.startswith(("models:/", "runs:/")):
            raise ValueError(f"`mlflow` must be a models:/ or runs:/ URI, got {self.mlflow!r}")
        return self

    @property
    def checkpoints(self) -> list[str]:
        if self.checkpoint is None:
            return []
        return [self.checkpoint] if isinstance(self.checkpoint, str) else list(self.checkpoint)

    @property
    def ready_made(self) -> bool:
        """A teacher that is loaded (checkpoint, name, MLflow), not trained by kdray first."""
        return self.train is None

    @property
    def model_name(self) -> str:
        """What the teacher is, for messages and the teacher tap names (hf/..., the MLflow URI...)."""
        if self.train is not None:
            return self.train.model.name
        return self.name or self.mlflow or "+".join(self.checkpoints)


class CacheConfig(Strict):
    """Teacher outputs shared by a sweep's trials: one pass over fixed inputs, or per (epoch, sample) when the
    inputs are augmented (kdray.view_cache)."""

    teacher_outputs: Literal["auto", "off"] = Field(
        "auto", description="auto: share teacher outputs across a sweep's trials (per epoch when inputs are augmented)"
    )
    max_bytes: int = Field(2 * 1024**3, ge=0, description="memory budget of the cached outputs (beyond it, augmented "
                                                          "epochs spill to the sweep's storage)")
    dtype: Literal["auto", "float32", "float16"] = Field(
        "auto", description="auto: float32 if it fits, else float16 (augmented data: float16)")
    top_k: int | None = Field(None, ge=1, description="augmented data: log-probabilities of the k likeliest classes "
                                                     "are stored, plus the remaining mass (default: every class up "
                                                     "to 128 classes, exact; else 64)")
    prefetch_epochs: int = Field(1, ge=0, description="augmented data: epochs the producer computes beyond the "
                                                      "furthest trial's")
    producer: bool = Field(True, description="augmented data: a Ray actor computes epochs ahead of the trials "
                                             "(off: trials compute and share what they need)")
    producer_gpus: float | None = Field(None, ge=0, description="GPUs of the producer (default: 1 when trials use "
                                                                "GPUs and a whole trial still fits beside it; "
                                                                "else 0, and trials on GPUs get no producer)")


def validate_knowledge(entries: list[Any]) -> list[dict[str, Any]]:
    """Validate each ``{type: ..., weight: ..., <params>}`` entry against its registered schema.

    Raises ``ConfigError`` with a precise field (``knowledge.1.temperature``) rather than a pydantic
    ValueError, so the location survives.
    """
    errors: list[tuple[str, str]] = []
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            errors.append((f"knowledge.{i}", f"expected a mapping like {{type: kd, weight: 1.0}}, got {entry!r}"))
            continue
        kind = entry.get("type")
        if kind is None:
            errors.append((f"knowledge.{i}.type", "required field is missing"))
            continue
        if kind not in KNOWLEDGE:
            errors.append((f"knowledge.{i}.type", KNOWLEDGE.unknown_message(kind)))
            continue
        if kind in seen:
            errors.append((f"knowledge.{i}.type", f"knowledge type {kind!r} is listed twice"))
            continue
        seen.add(kind)
        params_cls = KNOWLEDGE.get(kind).Params
        try:
            params = params_cls(**{k: v for k, v in entry.items() if k != "type"})
        except ValidationError as e:
            errors.extend(pydantic_errors(e, params_cls, ("knowledge", i)))
            continue
        out.append({"type": kind, **params.model_dump()})
    if errors:
        raise ConfigError(errors)
    return out


# -- a run ---------------------------------------------------------------------------------------------
class SchemeConfig(Strict):
    """Who teaches whom. ``distill`` (default): the teacher teaches one student. ``born_again``: the run is
    repeated ``generations`` times with the same student architecture and knowledge terms, generation k+1
    taught by generation k's final student (Furlanello et al., ICML 2018); the teacher teaches generation 1.
    ``dml``: deep mutual learning (Zhang et al., CVPR 2018): ``student`` and every model in ``peers`` train
    together from scratch, each on labels plus the KL to the others' predictions; no pretrained teacher."""

    type: Literal["distill", "born_again", "dml"] = Field("distill", description="distill | born_again | dml")
    generations: int = Field(1, ge=1, description="born_again: how many generations to train (1 = plain distill)")
    peers: list[ModelConfig] = Field(default_factory=list,
                                     description="dml: the models that learn together with `student`")
    mutual_weight: float = Field(1.0, ge=0, description="dml: weight of the KL to the other peers (1 in the paper)")
    temperature: float = Field(1.0, gt=0, description="dml: softmax temperature of the mutual KL (1 in the paper)")

    @classmethod
    def catalogue(cls) -> dict[str, dict[str, Any]]:
        """The schemes besides ``distill``, with their papers and parameters (``kdray list``): each parameter is
        the field whose description starts with the scheme's name."""
        papers = {"dml": ("Zhang et al. 2018", "deep mutual learning: the student and its peers learn together "
                                               "from scratch, each on labels + KL to the others; no teacher"),
                  "born_again": ("Furlanello et al. 2018", "born-again networks: generation k+1 of the same "
                                                            "student is taught by generation k")}
        out = {}
        for name, (paper, summary) in papers.items():
            params = {f: info.description.split(":", 1)[1].strip() for f, info in cls.model_fields.items()
                      if (info.description or "").startswith(f"{name}:")}
            out[name] = {"paper": paper, "summary": summary, "params": params}
        return out

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> "SchemeConfig":
        if self.type != "born_again" and self.generations != 1:
            raise ConfigError([("scheme.generations", f"is for type born_again, not {self.type}")])
        if self.type == "dml" and not self.peers:
            raise ConfigError([("scheme.peers", "dml needs at least one peer besides `student`")])
        if self.type != "dml" and self.peers:
            raise ConfigError([("scheme.peers", f"is for type dml, not {self.type}")])
        return self


class LatencyConfig(Strict):
    """Where a student's inference latency is measured: the device it would be served on."""

    device: Literal["cpu", "cuda"] = Field("cpu", description="cpu (default) or cuda")
    threads: int = Field(1, ge=1, description="CPU intra-op threads of the measurement")


class RunConfig(Strict):
    """One teacher -> student run (``kdray distill``), or a labels-only run when there is no knowledge."""

    plugins: list[str] = PLUGINS_FIELD
    name: str = "run"
    seed: int = 0
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    teacher: TeacherConfig | None = None
    student: ModelConfig
    knowledge: list[dict[str, Any]] = Field(default_factory=list)
    ce_weight: float = Field(1.0, ge=0, description="w_ce, weight of the cross-entropy on labels")
    train: TrainConfig = Field(default_factory=TrainConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    scheme: SchemeConfig = Field(default_factory=SchemeConfig, description="who teaches whom: distill, born_again, dml")
    latency: LatencyConfig = Field(default_factory=LatencyConfig,
                                   description="how the student's serving latency is measured (logged per run)")
    output_dir: str | None = Field(None, description="where the run writes its checkpoints and the final model")

    _plugins = model_validator(mode="before")(import_config_plugins)

    @field_validator("knowledge", mode="before")
    @classmethod
    def _knowledge(cls, v: Any) -> Any:
        if v is None:
            return []
        if not isinstance(v, list):
            raise ValueError("expected a list of {type: ..., weight: ...} entries")
        return validate_knowledge(v)

    @model_validator(mode="after")
    def _coherent(self) -> "RunConfig":
        if self.knowledge and self.teacher is None:
            raise ConfigError([("teacher", "knowledge types are configured but no teacher is given")])
        default_tokenizer(self.dataset, [self.teacher and (self.teacher.name or (
            self.teacher.train and self.teacher.train.model.name)), self.student.name])
        if self.student.init_from_teacher and self.teacher is None:
            raise ConfigError([("student.init_from_teacher", "needs a teacher to copy the weights from")])
        if self.train.sync_batchnorm and not self.resources.use_gpu:
            raise ConfigError([("train.sync_batchnorm", "PyTorch's SyncBatchNorm runs on GPUs only; on CPU workers "
                                "kdray broadcasts rank 0's BatchNorm statistics before each validation instead")])
        if not self.knowledge and self.ce_weight == 0:
            raise ConfigError([("ce_weight", "is 0 and there is no knowledge term: nothing to optimise")])
        if all(k["weight"] == 0 for k in self.knowledge) and self.knowledge and self.ce_weight == 0:
            raise ConfigError([("knowledge", "every weight is 0: nothing to optimise")])
        if self.scheme.type == "dml":
            for field, bad in (("teacher", self.teacher is not None), ("knowledge", bool(self.knowledge)),
                               ("student.init_from_teacher", bool(self.student.init_from_teacher))):
                if bad:
                    raise ConfigError([(field, "scheme dml trains its peers from scratch, teaching each other: "
                                               "it takes no teacher and no knowledge terms")])
        if self.scheme.type == "born_again" and self.student.init_from_teacher:
            raise ConfigError([("student.init_from_teacher", "scheme born_again teaches generation k+1 with "
                                "generation k; copying every other layer from it would halve the student each time")])
        if self.scheme.type == "born_again" and not self.knowledge:
            raise ConfigError([("knowledge", "scheme born_again passes knowledge from generation to generation: "
                                             "name the knowledge terms (e.g. kd)")])
        return self

    @property
    def knowledge_label(self) -> str:
        """``none``, ``kd``, ``kd+at``: the knowledge types of this run, as the sweep names them; a scheme comes
        first (``dml``, ``born_again+kd``)."""
        label = "+".join(k["type"] for k in self.knowledge) or "none"
        if self.scheme.type == "dml":
            return "dml"
        return f"born_again+{label}" if self.scheme.type == "born_again" else label


class TeacherRunConfig(Strict):
    """``kdray teacher``: train a model on labels alone and save it as a teacher checkpoint."""

    plugins: list[str] = PLUGINS_FIELD
    name: str = "teacher"
    seed: int = 0
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    output: str | None = Field(None, description="checkpoint path (default kdray_runs/teachers/<name>.pt)")

    _plugins = model_validator(mode="before")(import_config_plugins)

    @model_validator(mode="after")
    def _tokenizer(self) -> "TeacherRunConfig":
        default_tokenizer(self.dataset, [self.model.name])
        return self

    def as_run(self) -> RunConfig:
        return RunConfig(
            plugins=self.plugins, name=self.name, seed=self.seed, dataset=self.dataset, student=self.model, train=self.train,
            resources=self.resources,
        )


# -- loading -------------------------------------------------------------------------------------------
def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping safely; syntax errors name the file, line and column."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"file not found (looked in {p.resolve().parent})", file=p)
    # Aliases share one node, so a few lines of aliases-of-aliases ("billion laughs") compose instantly but
    # expand to hundreds of millions of values once validated or printed. Count the expanded size on the
    # composed node graph (memoised per node, so linear in the file) and refuse before constructing.
    max_values = 100_000
    try:
        loader = yaml.SafeLoader(p.read_text())
        try:
            root = loader.get_single_node()
            sizes: dict[int, int] = {}
            started: set[int] = set()
            stack: list[tuple[yaml.Node, bool]] = [(root, False)] if root is not None else []
            while stack:
                node, finished = stack.pop()
                if isinstance(node, yaml.MappingNode):
                    children = [c for pair in node.value for c in pair]
                elif isinstance(node, yaml.SequenceNode):
                    children = list(node.value)
                else:
                    children = []
                if finished:
                    sizes[id(node)] = min(max_values + 1, 1 + sum(sizes[id(c)] for c in children))
                    continue
                if id(node) in sizes:
                    continue
                if id(node) in started:  # on the current path: an alias to one of its own ancestors
                    raise ConfigError(f"a YAML alias refers to itself (line {node.start_mark.line + 1}); "
                                      "recursive values are not allowed", file=p)
                started.add(id(node))
                stack.append((node, True))
                stack.extend((c, False) for c in children if id(c) not in sizes)
            if root is not None and sizes[id(root)] > max_values:
                raise ConfigError(f"YAML aliases expand to more than {max_values:,} values; refusing to read it "
                                  "(nested anchors and aliases, a 'billion laughs'?)", file=p)
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"YAML syntax error at {where}{e.problem or e}", file=p) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"YAML error: {e}", file=p) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not a text file: {e}", file=p) from None
    if data is None:
        raise ConfigError("the file is empty", file=p)
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of fields at the top level, got {type(data).__name__}", file=p)
    return data


def validate(cls: type[BaseModel], data: dict[str, Any], file: str | Path | None = None) -> Any:
    if file is not None and Path(str(file)).is_file():
        _reading.append(Path(str(file)).resolve())
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(pydantic_errors(e, cls), file=file) from None
    except ConfigError as e:
        raise (e.with_file(file) if file else e) from None
    finally:
        if file is not None and Path(str(file)).is_file():
            _reading.pop()


def load_config(path: str | Path, cls: type[BaseModel] = RunConfig) -> Any:
    """Read and validate ``path`` as ``cls`` (RunConfig, TeacherRunConfig or a search space)."""
    return validate(cls, read_yaml(path), path)


def dotted_set(data: dict[str, Any], path: str, value: Any) -> None:
    """``dotted_set(d, "train.lr", 0.01)``: set a nested key, creating mappings on the way."""
    parts = path.split(".")
    cur = data
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[part] = nxt
        cur = nxt
    cur[parts[-1]] = value


def is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
