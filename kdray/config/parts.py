"""The pieces of a run config: data set, models, training, resources, teacher, the teacher-output cache and the
knowledge terms."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, field_validator, model_validator

from kdray.config.validation import (
    PATH_OPTIONS,
    Strict,
    absolute_dir,
    absolute_hf_name,
    local_path,
    pydantic_errors,
)
from kdray.data import DATASETS
from kdray.errors import ConfigError
from kdray.knowledge import KNOWLEDGE
from kdray.models import MODELS

SPLIT_FIELDS = ("name", "options", "val_fraction", "split_seed")  # what decides which samples are validation


class DatasetConfig(Strict):
    name: Annotated[str, AfterValidator(DATASETS.check)] = Field(
        "mnist1d", description="a registered data set (kdray list)")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of train carved out for validation")
    split_seed: int = Field(0, description="seed of the train/validation split (fixed across trials)")
    data_dir: str | None = Field(None,
                                 description="where data sets live (default $KDRAY_DATA_DIR or ~/.cache/kdray/data)")
    download: bool = Field(False, description="allow torchvision to download a missing data set")
    augment: bool | None = Field(None,
                                 description="random augmentation of training images (default: the set's standard)")
    options: dict[str, Any] = Field(default_factory=dict, description="data-set specific options")
    labelled_fraction: float = Field(1.0, gt=0, le=1, description="share of the training split whose labels are kept "
                                     "(seeded by split_seed); the others train only through knowledge terms")
    transfer: "DatasetConfig | None" = Field(None, description="another data set whose training inputs join the "
                                             "training split unlabelled (a transfer set; its labels are ignored)")

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
    names a Hugging Face model (``hf/`` for ``hf`` data, ``hf-lm/`` for ``text``) and the data set names none."""
    opts = dataset.options
    prefix = {"hf": "hf/", "text": "hf-lm/"}.get(dataset.name)
    if prefix is None or opts.get("tokenizer") or opts.get("image_column"):
        return
    source = next((m for m in models if isinstance(m, str) and m.startswith(prefix)), None)
    if source:
        opts["tokenizer"] = local_path(source[len(prefix):])


class PeftConfig(Strict):
    """LoRA adapters on a Hugging Face student (Hu et al. 2022, with peft): only the adapters train; the champion is
    the merged model, which loads without peft."""

    r: int = Field(8, ge=1, description="the adapters' rank (searchable: student.peft.r)")
    alpha: float = Field(16.0, gt=0, description="LoRA's alpha: the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="the linear layers that get adapters: names (q_proj, v_proj, ...) or all-linear "
                                  "(every linear layer but the output head)")


class ModelConfig(Strict):
    name: Annotated[str, BeforeValidator(absolute_hf_name), AfterValidator(MODELS.check)] = Field(
        description="a registered model (kdray list), timm/<timm name> or hf/<hub id or local path>")
    options: dict[str, Any] = Field(default_factory=dict, description="constructor options, e.g. hidden: [64]")
    init_from_teacher: Literal["every_other_layer"] | list[int] | None = Field(
        None, description="a student: start from the teacher's own weights, keeping every other transformer "
        "layer (DistilBERT's initialisation) or the teacher layers listed ([0, 2, 5]); the teacher must be a Hugging "
        "Face model (hf/ or hf-lm/)")
    peft: PeftConfig | None = Field(None, description="a student: train LoRA adapters instead of every weight "
                                                      "(r, alpha, dropout, target_modules)")
    quantize: Literal["int8"] | None = Field(
        None, description="a student: train with fake quantisation (PyTorch's FX quantisation-aware training) and "
        "deliver the int8 model; validation, latency, the registered champion and exports are the int8 model's")


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
    grad_accum_steps: int = Field(1, ge=1, description="batches whose gradients are summed before each optimizer "
                                  "step (an effective batch of batch_size x this x workers); language models "
                                  "normalise by the target tokens of all of them")
    token_chunk: int | None = Field(None, ge=16, description="language models: tokens whose logits the loss makes "
                                    "at once (default: 4 Mi logits / vocabulary size)")

    @model_validator(mode="after")
    def _step(self) -> "TrainConfig":
        if self.scheduler == "step" and not self.step_epochs:
            raise ValueError("scheduler 'step' needs step_epochs, e.g. [150, 180, 210]")
        if self.scheduler == "step" and any(m <= self.warmup_epochs for m in self.step_epochs):
            raise ValueError(f"step_epochs {self.step_epochs} must come after the warm-up "
                             f"({self.warmup_epochs} epochs)")
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
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="how several workers share a run: ddp = every worker holds the whole student and averages "
        "gradients; fsdp = PyTorch's FSDP2 shards a causal LM student's parameters, gradients and optimizer state "
        "across the workers (one group per decoder layer), for students whose training state exceeds one GPU",
    )

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
    labelled_fraction: float | None = Field(
        None, gt=0, le=1, description="the teacher's own share of the training labels (default: the run's "
        "dataset.labelled_fraction); 1.0: a teacher that saw every label, as one trained elsewhere")


class EnsembleConfig(Strict):
    """How an ensemble of teachers (``checkpoint: [a, b, ...]``) is combined into one: its members' logits weighted by
    a named rule, and the member whose feature maps the feature knowledge taps."""

    rule: Literal["mean", "fixed", "confidence"] = Field(
        "mean", description="mean: the members' logits averaged; fixed: weighted by `weights`; confidence: per sample, "
                            "each member weighted by its top-class probability (normalised over members); searchable")
    weights: list[float] | None = Field(None, description="fixed: one non-negative weight per checkpoint")
    feature_member: int = Field(0, ge=0, description="which checkpoint's feature maps the feature knowledge taps")

    @model_validator(mode="after")
    def _weights(self) -> "EnsembleConfig":
        if (self.rule == "fixed") != (self.weights is not None):
            raise ValueError("`weights` go with rule fixed, and rule fixed needs them")
        if self.weights is not None and (min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ValueError(f"weights must be >= 0 and not all 0, got {self.weights}")
        return self


class TeacherServeConfig(Strict):
    """A language-model teacher on Ray actors of its own, serving its top-k next-token log-probabilities to the
    trials, so no trial loads it (kdray.cache.served)."""

    actors: int = Field(1, ge=1, description="how many actors serve the teacher; a trial's batches go round them")
    cpus: float = Field(1.0, ge=0, description="CPUs each actor holds")
    gpus: float = Field(0.0, ge=0, description="GPUs each actor holds (its teacher runs on that GPU)")


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
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig,
                                     description="an ensemble (checkpoint list): how its members are combined")
    serve: TeacherServeConfig | None = Field(
        None, description="a language model's teacher on its own Ray actors, serving its top-k (cache.top_k) to the "
                          "trials instead of loaded by each")

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
        e, n = self.ensemble, len(self.checkpoints) or 1
        if e.weights is not None and len(e.weights) != n:
            raise ValueError(f"ensemble.weights has {len(e.weights)} weights for {n} checkpoint(s)")
        if e.feature_member >= n:
            raise ValueError(f"ensemble.feature_member is {e.feature_member}, but there are {n} checkpoint(s)")
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
    inputs are augmented (kdray.cache)."""

    teacher_outputs: Literal["auto", "off"] = Field(
        "auto", description="auto: share teacher outputs across a sweep's trials (per epoch when inputs are augmented)"
    )
    max_bytes: int = Field(2 * 1024**3, ge=0, description="memory budget of the cached outputs (beyond it, augmented "
                                                          "epochs spill to the sweep's storage)")
    dtype: Literal["auto", "float32", "float16"] = Field(
        "auto", description="auto: float32 if it fits, else float16 (augmented data: float16)")
    top_k: int | None = Field(None, ge=1, description="augmented data: log-probabilities of the k likeliest classes "
                                                     "are stored, plus the remaining mass (default: every class up "
                                                     "to 128 classes, exact; else 64). Language models: the teacher's "
                                                     "k likeliest tokens per position are what a trial learns from, "
                                                     "cached or live (default: every token); searchable")
    tail: Literal["uniform", "tail", "renormalize"] = Field(
        "uniform", description="language models with top_k: the teacher's remaining mass spread over the other "
        "tokens (uniform), kept as one outcome on both sides (tail), or dropped (renormalize: refuses rkl)")
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
