"""A run config (``kdray distill``, every sweep trial) and a teacher's (``kdray teacher``), and reading one."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from kdray.config.parts import (
    CacheConfig,
    DatasetConfig,
    ModelConfig,
    ResourcesConfig,
    TeacherConfig,
    TrainConfig,
    default_tokenizer,
    validate_knowledge,
)
from kdray.config.validation import PLUGINS_FIELD, Strict, import_config_plugins, validate
from kdray.config.yaml import read_yaml
from kdray.errors import ConfigError
from kdray.knowledge.divergences import needs_full_support


class SamplingConfig(Strict):
    """How the student samples its on-policy completions: apart from the loss temperature (training at the sampling
    temperature by mistake cost TRL's GKD trainer a 15 % loss gap)."""

    temperature: float = Field(1.0, ge=0, description="on_policy: the student's sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="on_policy: nucleus sampling, the smallest set of tokens whose "
                                                     "mass reaches top_p (1: every token)")


ON_POLICY_FIELDS = ("lmbda", "max_new_tokens", "sampling")


class SchemeConfig(Strict):
    """Who teaches whom. ``distill`` (default): the teacher teaches one student. ``born_again``: the run is
    repeated ``generations`` times with the same student architecture and knowledge terms, generation k+1
    taught by generation k's final student (Furlanello et al., ICML 2018); the teacher teaches generation 1.
    ``dml``: deep mutual learning (Zhang et al., CVPR 2018): ``student`` and every model in ``peers`` train
    together from scratch, each on labels plus the KL to the others' predictions; no pretrained teacher.
    ``on_policy`` (language models on prompt/answer rows): with probability ``lmbda`` a batch's completions are the
    student's own samples, scored by the live teacher (GKD, Agarwal et al., ICLR 2024; on-policy distillation as
    Thinking Machines published it in 2025); the other batches are the data's answers. ``seq_kd`` (the same data):
    the student trains on the teacher's greedy answers to the training prompts (Kim & Rush, EMNLP 2016), made once
    per sweep. ``assistant``: teacher assistants (Mirzadeh et al., AAAI 2020): each model of ``chain`` is distilled
    from the one before it (the first from the teacher) and teaches the next; the last teaches ``student``."""

    type: Literal["distill", "born_again", "dml", "on_policy", "seq_kd", "assistant"] = Field(
        "distill", description="distill | born_again | dml | on_policy | seq_kd | assistant")
    generations: int = Field(1, ge=1, description="born_again: how many generations to train (1 = plain distill)")
    peers: list[ModelConfig] = Field(default_factory=list,
                                     description="dml: the models that learn together with `student`")
    mutual_weight: float = Field(1.0, ge=0, description="dml: weight of the KL to the other peers (1 in the paper)")
    temperature: float = Field(1.0, gt=0, description="dml: softmax temperature of the mutual KL (1 in the paper)")
    lmbda: float = Field(0.5, ge=0, le=1, description="on_policy: the probability that a batch's completions are the "
                                                       "student's own samples (GKD's λ; 1: every batch)")
    max_new_tokens: int | None = Field(None, ge=1, description="on_policy: tokens the student generates per prompt "
                                                               "(default: the data's answer length)")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig,
                                     description="on_policy: the student's sampling temperature and top_p")
    chain: list[ModelConfig] = Field(default_factory=list,
                                     description="assistant: the assistants from the teacher's side to the "
                                                 "student's, or their names joined by commas (searchable)")

    @field_validator("chain", mode="before")
    @classmethod
    def _chain_names(cls, v: Any) -> Any:
        """``"a,b"`` (what a categorical can search: chain length and sizes) -> [{name: a}, {name: b}]."""
        if isinstance(v, str):
            return [{"name": n.strip()} for n in v.split(",") if n.strip()]
        return v

    @property
    def stages(self) -> int:
        """Runs one after the other: born-again's generations, or the assistants then the student."""
        if self.type == "assistant":
            return len(self.chain) + 1
        return self.generations if self.type == "born_again" else 1

    @classmethod
    def catalogue(cls) -> dict[str, dict[str, Any]]:
        """The schemes besides ``distill``, with their papers and parameters (``kdray list``): each parameter is
        the field whose description starts with the scheme's name."""
        papers = {"dml": ("Zhang et al. 2018", "deep mutual learning: the student and its peers learn together "
                                               "from scratch, each on labels + KL to the others; no teacher"),
                  "born_again": ("Furlanello et al. 2018", "born-again networks: generation k+1 of the same "
                                                            "student is taught by generation k"),
                  "on_policy": ("Agarwal et al. 2024 (GKD); Thinking Machines 2025", "with probability lmbda the "
                                "student completes the batch's prompts itself and the live teacher scores its tokens"),
                  "seq_kd": ("Kim & Rush 2016", "sequence-level KD: the student trains on the teacher's greedy "
                             "answers to the training prompts, made once per sweep"),
                  "assistant": ("Mirzadeh et al. 2020", "teacher assistants: a chain of mid-sized models, each "
                                "distilled from the one before, the last teaching the student")}
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
        if self.type == "assistant" and not self.chain:
            raise ConfigError([("scheme.chain", "assistant needs at least one model between teacher and student")])
        if self.type != "assistant" and self.chain:
            raise ConfigError([("scheme.chain", f"is for type assistant, not {self.type}")])
        if self.type != "on_policy":  # a value other than the default (a dumped config carries every field)
            for name in ON_POLICY_FIELDS:
                if getattr(self, name) != type(self).model_fields[name].get_default(call_default_factory=True):
                    raise ConfigError([(f"scheme.{name}", f"is for type on_policy, not {self.type}")])
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
    scheme: SchemeConfig = Field(default_factory=SchemeConfig,
                                 description="who teaches whom: distill, born_again, dml, on_policy")
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
        for j, peer in enumerate(self.scheme.peers):
            if peer.peft is not None:
                raise ConfigError([(f"scheme.peers.{j}.peft", "LoRA adapters are for the student")])
            if peer.quantize:
                raise ConfigError([(f"scheme.peers.{j}.quantize", "int8 quantisation is for the student")])
        if self.teacher is not None and self.teacher.train is not None and self.teacher.train.model.peft is not None:
            raise ConfigError([("teacher.train.model.peft", "a teacher kdray trains is trained whole: LoRA adapters "
                                                            "are for the student")])
        if self.teacher is not None and self.teacher.train is not None and self.teacher.train.model.quantize:
            raise ConfigError([("teacher.train.model.quantize", "a teacher kdray trains stays in floating point: "
                                                                "int8 quantisation is for the student")])
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
        for i, k in enumerate(self.knowledge):  # a top-k teacher that renormalises has no mass outside its top-k
            if (k["type"] == "tkd" and self.cache.top_k and self.cache.tail == "renormalize"
                    and needs_full_support(k["divergence"], k["beta"])):
                raise ConfigError([(f"knowledge.{i}.divergence",
                                    f"{k['divergence']}{' with beta 1' if k['divergence'] == 'jsd' else ''} needs the "
                                    "teacher's probability of every token the student predicts, but cache.top_k "
                                    f"{self.cache.top_k} with cache.tail renormalize gives 0 outside the top-k (the "
                                    "divergence is infinite); use cache.tail uniform or tail, or another divergence")])
        self._check_on_policy()
        self._check_unlabelled()
        if self.scheme.type == "seq_kd" and self.teacher is None:
            raise ConfigError([("teacher", "scheme seq_kd trains the student on the teacher's answers: it needs a "
                                           "teacher")])
        if self.scheme.type in ("born_again", "assistant") and not self.knowledge:
            raise ConfigError([("knowledge", f"scheme {self.scheme.type} passes knowledge from model to model: "
                                             "name the knowledge terms (e.g. kd)")])
        if self.scheme.type == "assistant" and (self.teacher is None or self.student.init_from_teacher):
            raise ConfigError([("teacher" if self.teacher is None else "student.init_from_teacher",
                                "scheme assistant distils the teacher into its chain, then the student, each from "
                                "scratch: it needs a teacher, and the student starts from its own weights")])
        for j, m in enumerate(self.scheme.chain):
            if m.peft is not None or m.init_from_teacher or m.quantize:
                raise ConfigError([(f"scheme.chain.{j}", "an assistant is trained whole from its own weights, in "
                                                         "floating point")])
        return self

    def _check_unlabelled(self) -> None:
        """A transfer set's samples have no labels: what needs one for every sample cannot train on them."""
        d = self.dataset
        if d.labelled_fraction == 1.0 and d.transfer is None:
            return
        from kdray.knowledge import KNOWLEDGE

        field = "dataset.transfer" if d.transfer is not None else "dataset.labelled_fraction"
        if self.scheme.type == "dml":
            raise ConfigError([(field, "dml's peers learn from labels and each other; unlabelled samples are for "
                                       "distilling from a teacher")])
        for i, k in enumerate(self.knowledge):
            if KNOWLEDGE.get(k["type"]).uses_target:
                raise ConfigError([(f"knowledge.{i}.type", f"{k['type']} needs each sample's label, and the "
                                    f"unlabelled samples ({field}) have none")])
            if k.get("negatives") == "other_class":
                raise ConfigError([(f"knowledge.{i}.negatives", "other-class negatives need each sample's label; "
                                    f"the unlabelled samples ({field}) have none: use negatives uniform")])

    def _check_on_policy(self) -> None:
        """``on_policy`` needs a token-level term to train its samples on; ``rkl_sampled`` estimates from samples
        drawn from the student's own distribution at the term's temperature, so it needs on_policy and that
        sampling (a sample from another distribution, or one cut by top_p, makes the estimate biased)."""
        from kdray.knowledge import KNOWLEDGE

        scheme = self.scheme
        if scheme.type == "on_policy" and not any(KNOWLEDGE.get(k["type"]).family == "token" for k in self.knowledge):
            raise ConfigError([("knowledge", "scheme on_policy trains the student on its own samples scored by the "
                                             "teacher: it needs a token-level term (tkd)")])
        for i, k in enumerate(self.knowledge):
            if k["type"] != "tkd" or k["divergence"] != "rkl_sampled":
                continue
            if scheme.type != "on_policy":
                raise ConfigError([(f"knowledge.{i}.divergence", "rkl_sampled estimates from the student's own "
                                    "samples: it needs scheme on_policy (on the data's tokens use rkl)")])
            if scheme.sampling.temperature != k["temperature"]:
                raise ConfigError([("scheme.sampling.temperature",
                                    f"is {scheme.sampling.temperature} but rkl_sampled estimates KL at the term's "
                                    f"temperature {k['temperature']} from samples drawn at it: make them equal")])
            if scheme.sampling.top_p < 1:
                raise ConfigError([("scheme.sampling.top_p", "rkl_sampled needs samples from the student's whole "
                                                             "distribution: top_p 1")])

    @property
    def knowledge_label(self) -> str:
        """``none``, ``kd``, ``kd+at``: the knowledge types of this run, as the sweep names them; a scheme comes
        first (``dml``, ``born_again+kd``)."""
        label = "+".join(k["type"] for k in self.knowledge) or "none"
        if self.scheme.type == "dml":
            return "dml"
        if self.scheme.type == "seq_kd":  # the teacher's answers are its knowledge, with or without token terms
            return "seq_kd" + ("" if label == "none" else f"+{label}")
        return f"{self.scheme.type}+{label}" if self.scheme.type in ("born_again", "on_policy", "assistant") \
            else label


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

    @model_validator(mode="after")
    def _whole(self) -> "TeacherRunConfig":
        if self.model.peft is not None:
            raise ConfigError([("model.peft", "a teacher is trained whole: LoRA adapters are for the student")])
        if self.model.quantize:
            raise ConfigError([("model.quantize", "a teacher stays in floating point: int8 is for the student")])
        return self

    _plugins = model_validator(mode="before")(import_config_plugins)

    @model_validator(mode="after")
    def _tokenizer(self) -> "TeacherRunConfig":
        default_tokenizer(self.dataset, [self.model.name])
        return self

    def as_run(self) -> RunConfig:
        return RunConfig(
            plugins=self.plugins, name=self.name, seed=self.seed, dataset=self.dataset, student=self.model,
                train=self.train,
            resources=self.resources,
        )


def load_config(path: str | Path, cls: type[BaseModel] = RunConfig) -> Any:
    """Read and validate ``path`` as ``cls`` (RunConfig, TeacherRunConfig or a search space)."""
    return validate(cls, read_yaml(path), path)
