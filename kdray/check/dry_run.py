"""``dry_run``: build everything a run needs and push two samples through it, without training.

Each phase raises a ``ConfigError`` that names the file and the field at fault: the data set, the student and
dml's peers, the teacher (its classes, inputs and split), each knowledge type (its layers), then one forward pass of
the models and every loss on two samples (connector shapes, strong views, scalar losses).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdray.config import ConfigError, RunConfig
from kdray.data import describe_dataset
from kdray.data.loaders import to_float
from kdray.errors import DatasetUnavailable
from kdray.knowledge import KNOWLEDGE, Knowledge, ModelLayout, TapOutputs
from kdray.knowledge.token import TokenStates
from kdray.knowledge.uld import ULD, AlignedTokens
from kdray.models import Classifier, FeatureTaps, LayerNotFound, Teacher, build_model, model_from_record
from kdray.models.hf_lm import SequenceTooLong
from kdray.models.taps import check_layers
from kdray.teachers import load_teacher_records


@dataclass
class DryRun:
    """What a dry run learned: tapped shapes, connectors and model sizes."""

    knowledge: str
    teacher: str | None
    student: str
    teacher_params: int = 0
    student_params: int = 0
    teacher_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    student_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    connectors: dict[str, str] = field(default_factory=dict)
    peers: list[tuple[str, int]] = field(default_factory=list)  # dml: (model, parameters) of each peer
    notes: list[str] = field(default_factory=list)  # what was accepted and how (a shared vocabulary prefix)

    def lines(self) -> list[str]:
        if self.peers:  # dml: no teacher, the peers learn together
            out = [f"knowledge {self.knowledge}: student {self.student} ({self.student_params:,} params) and peers "
                   + ", ".join(f"{n} ({p:,} params)" for n, p in self.peers)]
        else:
            out = [f"knowledge {self.knowledge}: teacher {self.teacher or '-'} ({self.teacher_params:,} params) -> "
                   f"student {self.student} ({self.student_params:,} params)"]
        for k, s in self.teacher_shapes.items():
            out.append(f"  teacher tap {k}: {s}")
        for k, s in self.student_shapes.items():
            out.append(f"  student tap {k}: {s}")
        for k, c in self.connectors.items():
            out.append(f"  connector {k}: {c}")
        out.extend(f"  note: {n}" for n in self.notes)
        return out


LAYER_PARAMS = ("teacher_layer", "teacher_layers", "student_layer", "student_layers")


def _layer_field(i: int, spec: dict[str, Any], missing: list[str], side: str) -> str:
    for p in (f"{side}_layer", f"{side}_layers"):
        v = spec.get(p)
        names = v if isinstance(v, list) else [v]
        if any(m in names for m in missing):
            return f"knowledge.{i}.{p}"
    return f"knowledge.{i}"


def student_from_teacher(cfg: RunConfig, teacher: Teacher | None, info, file: str | Path | None = None) -> Classifier:
    """``student.init_from_teacher``: the student built from the teacher's own weights (DistilBERT)."""
    from kdray.models.hf_lm import init_from_teacher

    if teacher is None:
        raise ConfigError("needs a teacher", file, "student.init_from_teacher")
    try:
        return Classifier(info.preprocess(), init_from_teacher(teacher.members[0], cfg.student.init_from_teacher))
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e), file, "student.init_from_teacher") from None


def spec_name(cfg: RunConfig, i: int) -> str:
    return f"knowledge type {cfg.knowledge[i]['type']!r}"


def dry_run(cfg: RunConfig, *, file: str | Path | None = None,
            teacher_records: list[dict[str, Any]] | None = None) -> DryRun:
    """Build everything a run needs and push a zero batch through it; raise ``ConfigError`` on failure."""
    info = _data_info(cfg, file)
    notes: list[str] = []
    _check_tokenizers(cfg, info, file, notes)
    _check_serve(cfg, info, file)
    student = _build(cfg, info, file, cfg.student.name, cfg.student.options, "student")
    _check_lora(cfg, student, file)
    _check_strategy(cfg, info, student, file, notes)
    _check_quantize(cfg, info, student, file, notes)
    report = DryRun(cfg.knowledge_label, None, cfg.student.name,
                    student_params=sum(p.numel() for p in student.parameters()), notes=notes)
    _check_peers(cfg, info, file, report)
    teacher = _teacher(cfg, info, file, teacher_records, report)
    if cfg.student.init_from_teacher:
        student = student_from_teacher(cfg, teacher, info, file)
        report.student_params = sum(p.numel() for p in student.parameters())
    _check_on_policy(cfg, info, student, file)
    teacher = _check_chain(cfg, info, teacher, file)
    modules = _knowledge(cfg, teacher, student, file, report)
    _forward(cfg, info, teacher, student, modules, file, report)
    return report


def _check_chain(cfg: RunConfig, info: Any, teacher: Teacher | None, file: str | Path | None) -> Teacher | None:
    """``scheme: assistant``: every stage as it will run, each assistant taught by the model before it with the run's
    knowledge terms (their layers must exist in both); returns the student's teacher, the last assistant."""
    if cfg.scheme.type != "assistant":
        return teacher
    for j, m in enumerate(cfg.scheme.chain):
        net = _build(cfg, info, file, m.name, m.options, f"scheme.chain.{j}")
        scratch = DryRun(cfg.knowledge_label, None, m.name)
        try:
            modules = _knowledge(cfg, teacher, net, file, scratch)
            _forward(cfg, info, teacher, net, modules, file, scratch)
        except ConfigError as e:
            raise ConfigError([(f"scheme.chain.{j}", f"assistant {j} ({m.name}), taught by "
                                f"{'the teacher' if j == 0 else f'assistant {j - 1}'}: {msg}")
                               for _, msg in e.errors], file) from None
        teacher = Teacher([net])
    return teacher


def _check_lora(cfg: RunConfig, student: Classifier, file: str | Path | None) -> None:
    """``student.peft``: the adapters must find their layers in this student."""
    if cfg.student.peft is None:
        return
    from kdray.models.lora import LoraUnavailable, apply_lora

    try:
        apply_lora(student.net, **cfg.student.peft.model_dump())
    except LoraUnavailable as e:
        field = "student.peft.target_modules" if "target" in str(e).lower() else "student.peft"
        raise ConfigError(str(e), file, field) from None


def _check_strategy(cfg: RunConfig, info: Any, student: Classifier, file: str | Path | None,
                    notes: list[str]) -> None:
    """``resources.strategy: fsdp`` shards a causal LM's decoder layers, with the training step as the root
    (:mod:`kdray.train.sharding`): what has no decoder layers, or trains another step, is refused."""
    if cfg.resources.strategy != "fsdp":
        return
    from kdray.train.sharding import decoder_layers

    if not info.causal_lm:
        raise ConfigError(f"fsdp shards a causal language model's decoder layers; data set {cfg.dataset.name!r} is "
                          "for classifiers (use ddp)", file, "resources.strategy")
    if decoder_layers(student) is None:
        raise ConfigError(f"fsdp shards a Hugging Face causal LM's decoder layers; student {cfg.student.name!r} "
                          "has no layer list", file, "student.name")
    if cfg.student.peft is not None:
        raise ConfigError("fsdp with LoRA adapters is not built yet (a LoRA student's frozen base fits one device "
                          "in bf16 far more often than a fully trained one): use ddp", file, "student.peft")
    if cfg.scheme.type in ("dml", "born_again", "assistant"):
        raise ConfigError(f"scheme {cfg.scheme.type} with fsdp is not built yet (it trains several students in "
                          "turn or at once): use ddp", file, "scheme.type")
    if cfg.train.precision == "fp16":
        raise ConfigError("fsdp with fp16 loss scaling is not built yet: use bf16 (or fp32)", file,
                          "train.precision")
    if cfg.resources.num_workers == 1:
        notes.append("resources.strategy: fsdp with one worker: nothing to shard, the student runs whole")


def _check_quantize(cfg: RunConfig, info: Any, student: Classifier, file: str | Path | None,
                    notes: list[str]) -> None:
    """``student.quantize: int8`` (:mod:`kdray.models.quantize`): a classifier traced by FX, whose intermediate layers
    lose their names (logit knowledge only), delivered as an int8 model that runs on the CPU."""
    if not cfg.student.quantize:
        return
    if info.causal_lm:
        raise ConfigError("int8 students are classifiers for now: a causal LM's token loss reads its head's weight "
                          "outside the traced forward", file, "student.quantize")
    for i, k in enumerate(cfg.knowledge):
        if KNOWLEDGE.get(k["type"]).family != "response":
            raise ConfigError(f"{spec_name(cfg, i)}: an int8 student is traced by FX, which inlines its blocks, so "
                              "there is no named layer to tap: use logit knowledge (kd, dkd, dist, ctkd, mlkd)", file,
                              f"knowledge.{i}.type")
    if cfg.scheme.type in ("dml", "born_again", "assistant"):
        raise ConfigError(f"scheme {cfg.scheme.type} with an int8 student is not built yet (its peers or later "
                          "stages would be taught by, or be, int8 models)", file, "scheme.type")
    if cfg.latency.device != "cpu":
        raise ConfigError("an int8 student runs on PyTorch's CPU int8 kernels: its latency is measured on the CPU",
                          file, "latency.device")
    from kdray.models.quantize import backend, example_input, prepare_int8

    try:
        prepare_int8(copy.deepcopy(student.net), example_input(student.preprocess))
    except Exception as e:  # noqa: BLE001 - FX's tracing errors are of many kinds
        raise ConfigError(f"student {cfg.student.name!r} cannot be traced for quantisation-aware training (FX "
                          f"symbolic tracing: {type(e).__name__}: {str(e)[:300]})", file, "student.quantize") from None
    notes.append(f"student.quantize: int8: trained with fake quantisation; validation, latency, the champion and "
                 f"exports are the int8 model's ({backend()} CPU kernels)")


def dropout_rates(config: Any) -> list[float]:
    """The dropout rates a Hugging Face config sets above 0, whatever their names (``dropout``, ``attention_dropout``,
    ``resid_pdrop``, ...): families such as OPT drop out with ``nn.functional.dropout``, no module to find. Not the
    heads a causal LM does not run (``classifier_dropout``, GPT-2's ``summary_first_dropout``)."""
    if config is None:
        return []
    items = config.to_dict().items() if hasattr(config, "to_dict") else vars(config).items()
    return [float(v) for k, v in items if ("dropout" in k or k.endswith("pdrop")) and isinstance(v, float) and v > 0
            and not k.startswith(("classifier", "summary"))]


def _check_on_policy(cfg: RunConfig, info: Any, student: Classifier, file: str | Path | None) -> None:
    """``scheme: on_policy`` completes the data's prompts: it needs prompt/answer rows, and the student's positions
    must hold a prompt and its ``max_new_tokens``."""
    from kdray.models.hf_lm import max_positions
    from kdray.train.on_policy import prompt_rows_error

    why = prompt_rows_error(cfg, info)
    if why:
        raise ConfigError(why, file, "scheme.type")
    if any(k["type"] == "tkd" and k["divergence"] == "rkl_sampled" for k in cfg.knowledge):
        if cfg.student.peft is not None and cfg.student.peft.dropout > 0:
            raise ConfigError(f"rkl_sampled weighs each sampled token by log q(y) of the distribution it was drawn "
                              f"from, but the LoRA adapters drop out ({cfg.student.peft.dropout}): set it to 0 or use "
                              "rkl", file, "student.peft.dropout")
        hf = getattr(student.net, "hf", None)
        rates = [m.p for m in student.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        rates += dropout_rates(getattr(hf, "config", None))
        if rates:  # the samples are drawn without dropout, the loss's log q(y) would be taken with it
            raise ConfigError(f"rkl_sampled weighs each sampled token by log q(y) of the distribution it was drawn "
                              f"from, but the student has dropout ({max(rates)}): set it to 0 (e.g. options "
                              "{config: {resid_pdrop: 0, embd_pdrop: 0, attn_pdrop: 0}}) or use rkl", file,
                              "student.options")
    if cfg.scheme.type != "on_policy" or not cfg.scheme.max_new_tokens:
        return
    hf = getattr(student.net, "hf", None)
    limit = max_positions(hf.config) if hf is not None else None
    length = info.prompt_len + cfg.scheme.max_new_tokens - 1
    if limit is not None and length > limit:
        raise ConfigError(f"a prompt of {info.prompt_len} tokens and {cfg.scheme.max_new_tokens} new ones make "
                          f"{length} positions; the student has {limit}", file, "scheme.max_new_tokens")


def _data_info(cfg: RunConfig, file: str | Path | None) -> Any:
    try:
        return describe_dataset(cfg.dataset)
    except ConfigError as e:  # the data set named the field itself
        raise e.with_file(file) if file else e from None
    except DatasetUnavailable as e:
        raise ConfigError(str(e), file, "dataset.download" if "download" in str(e) else "dataset.options") from None
    except ValueError as e:
        raise ConfigError(str(e), file, "dataset.options") from None


def _build(cfg: RunConfig, info: Any, file: str | Path | None, name: str, options: dict[str, Any],
           where: str) -> Classifier:
    try:
        return build_model(name, info.num_classes, info.preprocess(), options)
    except SequenceTooLong as e:
        raise ConfigError(f"model {name!r}: {e}", file, "dataset.seq_len") from None
    except TypeError as e:
        raise ConfigError(f"bad options for model {name!r}: {e}", file, f"{where}.options") from None
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"model {name!r} cannot be used on data set {cfg.dataset.name!r}: {e}", file,
                          f"{where}.name") from None


def _check_peers(cfg: RunConfig, info: Any, file: str | Path | None, report: DryRun) -> None:
    """dml: every peer must build and run on this data (classifiers: peers exchange their class distributions)."""
    if cfg.scheme.type == "dml" and info.causal_lm:
        raise ConfigError("dml is for classifiers; a language model's peers are not supported", file, "scheme.type")
    for j, peer in enumerate(cfg.scheme.peers):
        net = _build(cfg, info, file, peer.name, peer.options, f"scheme.peers.{j}")
        try:
            with torch.no_grad():
                out = net.eval()(to_float(info.example_input(2)))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"model {peer.name!r} fails on inputs of shape {tuple(info.model_input)}: {e}", file,
                              f"scheme.peers.{j}.name") from None
        if out.shape != (2, info.num_classes):
            raise ConfigError(f"peer outputs {tuple(out.shape[1:])}, expected ({info.num_classes},)", file,
                              f"scheme.peers.{j}.name")
        report.peers.append((peer.name, sum(p.numel() for p in net.parameters())))


def _teacher(cfg: RunConfig, info: Any, file: str | Path | None, records: list[dict[str, Any]] | None,
             report: DryRun) -> Teacher | None:
    """The teacher: ready-made records checked against the data set (classes, inputs, split), or the model a sweep
    trains, built untrained."""
    if cfg.teacher is None:
        return None
    if not cfg.teacher.ready_made:
        t = cfg.teacher.train.model
        teacher = Teacher([_build(cfg, info, file, t.name, t.options, "teacher.train.model")])
        report.teacher = t.name
        report.teacher_params = sum(p.numel() for p in teacher.members[0].parameters())
        return teacher
    records = records if records is not None else load_teacher_records(cfg, file)
    members = []
    for i, rec in enumerate(records):
        where = ("teacher.name" if cfg.teacher.name else "teacher.mlflow" if cfg.teacher.mlflow else
                 "teacher.checkpoint" if len(records) == 1 else f"teacher.checkpoint.{i}")
        if rec["num_classes"] != info.num_classes and not rec.get("tokenizer"):  # its own tokenizer: its own ids
            raise ConfigError(f"the teacher predicts {rec['num_classes']} classes but data set "
                              f"{cfg.dataset.name!r} has {info.num_classes}", file, where)
        if not rec["preprocess"].get("passthrough") and tuple(rec["preprocess"]["shape"]) != tuple(info.model_input):
            raise ConfigError(f"the teacher takes inputs of shape {tuple(rec['preprocess']['shape'])} "
                              f"but data set {cfg.dataset.name!r} gives {info.model_input}", file, where)
        if (rec.get("model_options") or {}).get("quantize"):
            raise ConfigError("the teacher is an int8 student: its packed weights run only on the CPU and FX left it "
                              "no named layers to tap; teach with a float model", file, where)
        # A kdray checkpoint knows its split; a model by name or from MLflow was trained elsewhere.
        diff = cfg.dataset.split_differences(rec.get("dataset") or {}) if cfg.teacher.checkpoint else []
        if diff and not cfg.teacher.allow_split_mismatch:
            raise ConfigError(
                f"the teacher was trained on another train/validation split ({'; '.join(diff)}): it has "
                "seen this run's validation samples, which favours distillation in selection. Retrain it "
                "on this split, or set teacher.allow_split_mismatch: true to accept that", file, where)
        members.append(model_from_record(rec))
    teacher = Teacher(members, **cfg.teacher.ensemble.model_dump())
    report.teacher = "+".join(r["model"] for r in records)
    report.teacher_params = sum(p.numel() for p in teacher.members[0].parameters())
    return teacher


def _knowledge(cfg: RunConfig, teacher: Teacher | None, student: Classifier, file: str | Path | None,
               report: DryRun) -> dict[int, Knowledge]:
    """Each knowledge type built with its layers resolved (a layer a model lacks names the field and the valid
    ones), then shown the two networks (OFD watches the teacher's BatchNorms)."""
    t_layout = ModelLayout.of(teacher.feature_model) if teacher else ModelLayout((), "")
    s_layout = ModelLayout.of(student)
    modules = {}
    lm = bool(getattr(student, "causal_lm", False))
    for i, spec in enumerate(cfg.knowledge):
        cls = KNOWLEDGE.get(spec["type"])
        if not lm and cls.family == "cross_token":
            raise ConfigError(f"{spec_name(cfg, i)} aligns the answer tokens of two causal language models (a teacher "
                              "of another tokenizer); a classifier's logits are distilled by kd, dist, dkd, ...", file,
                              f"knowledge.{i}.type")
        if lm and cls.family == "response":
            raise ConfigError(f"{spec_name(cfg, i)} distils a classifier's logits; a language model's next-token "
                              "distributions are distilled per token by tkd (divergence fkl is KD per token)", file,
                              f"knowledge.{i}.type")
        try:
            k = cls.from_params({p: v for p, v in spec.items() if p != "type"}, t_layout, s_layout)
        except ValueError as e:
            raise ConfigError(str(e), file, f"knowledge.{i}") from None
        try:
            check_layers(teacher.feature_model.net, k.teacher_layers, report.teacher)
        except LayerNotFound as e:
            raise ConfigError(f"teacher {e}", file, _layer_field(i, spec, e.missing, "teacher")) from None
        try:
            check_layers(student.net, k.student_layers, cfg.student.name)
        except LayerNotFound as e:
            raise ConfigError(f"student {e}", file, _layer_field(i, spec, e.missing, "student")) from None
        modules[i] = k
    if teacher is not None:  # before the dry forward pass, which a type may watch
        for i, k in modules.items():
            try:
                k.bind_models(teacher.feature_model.net, student.net)
            except Exception as e:  # noqa: BLE001 - a layer the loss cannot use is a config problem
                raise ConfigError(f"{spec_name(cfg, i)} cannot use these models: {e}", file,
                                  f"knowledge.{i}") from None
    return modules


def _forward(cfg: RunConfig, info: Any, teacher: Teacher | None, student: Classifier, modules: dict[int, Knowledge],
             file: str | Path | None, report: DryRun) -> None:
    """Two samples through the student (and MLKD's strong view), the teacher, and every loss: shapes, connectors and
    scalar values, as the first training step would see them."""
    x = to_float(info.example_input(2))  # as training batches hold them: 8-bit images as floats in [0, 1]
    lm = info.causal_lm
    student.eval()
    with torch.no_grad():
        s_taps = FeatureTaps(student.net, [n for k in modules.values() for n in k.student_layers])
        try:
            s_out = s_taps.run(student, x, states=lm)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"model {cfg.student.name!r} fails on inputs of shape {tuple(info.model_input)}: {e}",
                              file, "student.name") from None
        x_strong = _strong_view(cfg, modules, x, file)
        if x_strong is not None:
            s_out = s_out._replace(strong=s_taps.run(student, x_strong))
        s_taps.remove()
        _check_outputs(cfg, info, s_out, file)
        report.student_shapes = {k: tuple(v.shape[1:]) for k, v in s_out.features.items()}
        if teacher is None:
            return
        teacher.tap([n for k in modules.values() for n in k.teacher_layers])
        try:
            t_out = teacher(x)
            if x_strong is not None:
                t_out = t_out._replace(strong=teacher(x_strong))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"the teacher fails on inputs of shape {tuple(info.model_input)}: {e}", file,
                              "teacher") from None
        if lm and any(isinstance(k, ULD) for k in modules.values()):  # the dry rows: answers from position 0
            t = t_out.logits
            whole = torch.full((len(x),), x.shape[1], dtype=torch.long)
            t_out = t_out._replace(logits=AlignedTokens(t.hidden, t.head, torch.zeros_like(whole), whole))
        elif lm and modules:
            _check_vocabularies(cfg, s_out, t_out, file)
        report.teacher_shapes = {k: tuple(v.shape[1:]) for k, v in t_out.features.items()}
        for i, k in modules.items():
            _dry_loss(cfg, i, k, s_out, t_out, file, report)


def _check_outputs(cfg: RunConfig, info: Any, s_out: TapOutputs, file: str | Path | None) -> None:
    """A classifier outputs one logit per class; a causal LM its hidden states per position and a head over at
    least the tokenizer's ids."""
    if not info.causal_lm:
        if s_out.logits.shape != (2, info.num_classes):
            raise ConfigError(f"student outputs {tuple(s_out.logits.shape[1:])}, expected ({info.num_classes},)",
                              file, "student.name")
        return
    if not isinstance(s_out.logits, TokenStates):
        raise ConfigError(f"data set {cfg.dataset.name!r} is for causal language models (next-token prediction); "
                          f"{cfg.student.name!r} is not one (use hf-lm/..., tiny_llama, tiny_qwen3, tiny_gpt2)", file,
                          "student.name")
    if cfg.train.label_smoothing:
        raise ConfigError("label smoothing is for classifiers; a language model's next-token loss has none here",
                          file, "train.label_smoothing")
    if s_out.logits.head.vocab < info.num_classes:
        raise ConfigError(f"the student's vocabulary ({s_out.logits.head.vocab}) is smaller than the tokenizer's "
                          f"({info.num_classes})", file, "student.name")


def _check_vocabularies(cfg: RunConfig, s_out: TapOutputs, t_out: TapOutputs, file: str | Path | None) -> None:
    s, t = s_out.logits, t_out.logits
    if not isinstance(t, TokenStates):
        raise ConfigError("the student is a causal language model but the teacher is not", file, "teacher")
    if t.head.vocab != s.head.vocab:
        raise ConfigError(f"the teacher's vocabulary has {t.head.vocab} tokens and the student's {s.head.vocab}: "
                          "token-level knowledge compares distributions over one vocabulary, so teacher and student "
                          "need the same tokenizer", file, "teacher")


def _check_tokenizers(cfg: RunConfig, info: Any, file: str | Path | None, notes: list[str]) -> None:
    """Every ``hf-lm/<folder>`` model that ships a tokenizer must share the data set's vocabulary, or extend it (the
    data's tokens at the same ids: a padded or extended vocabulary, said in ``notes``); a teacher of another
    tokenizer is distilled by ``uld`` alone (:func:`_check_cross_teacher`), and ``uld`` is for such a teacher only."""
    if not info.causal_lm or not info.tokenizer:
        return
    from kdray.data.lm import load_tokenizer
    from kdray.data.retokenize import OTHER, PREFIX, own_tokenizer_folder, vocabulary_relation

    names = [("student.name", cfg.student.name)]
    if cfg.teacher is not None:
        names.append(("teacher.name" if cfg.teacher.name else "teacher.train.model.name", cfg.teacher.model_name))
    data_tok = None
    cross = False
    for where, name in names:
        folder = own_tokenizer_folder(name)
        if folder is None or folder.resolve() == Path(str(info.tokenizer)).expanduser().resolve():
            continue
        data_tok = data_tok or load_tokenizer(str(info.tokenizer))
        own = load_tokenizer(str(folder), where)
        relation = vocabulary_relation(own, data_tok)
        if relation == PREFIX:
            notes.append(f"{where} {name}: its tokenizer extends the data set's ({len(own)} tokens, the first "
                         f"{len(data_tok)} the data's own at the same ids): a shared vocabulary prefix, the loss is "
                         "over it")
        elif relation == OTHER and where == "teacher.name":
            _check_cross_teacher(cfg, info, name, f"{len(own)} vs {len(data_tok)} tokens", file)
            notes.append(f"teacher.name {name}: its own tokenizer ({len(own)} tokens, not the data set's "
                         f"{len(data_tok)} nor an extension of it): each row is re-read in its tokens and uld aligns "
                         "the two models' answers")
            cross = True
        elif relation == OTHER:
            raise ConfigError(f"{name} comes with a tokenizer whose vocabulary differs from the data set's "
                              f"({len(own)} vs {len(data_tok)} tokens, from {info.tokenizer}, not a prefix of it): "
                              "the model would read other tokens than it was trained on; tokenise the data with the "
                              "model's own (dataset.tokenizer)", file, "dataset.tokenizer")
    uld = [i for i, k in enumerate(cfg.knowledge) if k["type"] == "uld"]
    if uld and not cross:
        raise ConfigError("uld is for a teacher of another tokenizer (teacher.name: hf-lm/<folder> whose own "
                          "tokenizer is not the data set's); this teacher reads the data's tokens, so tkd compares "
                          "the two distributions token by token, exactly", file, f"knowledge.{uld[0]}.type")


def _check_serve(cfg: RunConfig, info: Any, file: str | Path | None) -> None:
    """``teacher.serve``: the actors answer with a language model's top-k per position, which token terms read and
    nothing else does (hidden states, the teacher's weights or its generations stay with the actors)."""
    if cfg.teacher is None or cfg.teacher.serve is None:
        return
    if not info.causal_lm:
        raise ConfigError("a served teacher answers with a language model's next-token top-k; this data set is "
                          "not for causal language models", file, "teacher.serve")
    if len(cfg.teacher.checkpoints) > 1:
        raise ConfigError("a served teacher is one model (an ensemble is not served yet)", file, "teacher.serve")
    if not cfg.cache.top_k:
        raise ConfigError("a served teacher sends its top-k tokens per position: set cache.top_k (e.g. 64)", file,
                          "cache.top_k")
    for i, k in enumerate(cfg.knowledge):
        if KNOWLEDGE.get(k["type"]).family != "token":
            raise ConfigError(f"{spec_name(cfg, i)}: a served teacher sends only its top-k next-token "
                              "log-probabilities, which token-level types (tkd) read", file, f"knowledge.{i}.type")
    if cfg.scheme.type != "distill":
        raise ConfigError(f"scheme {cfg.scheme.type}: a served teacher scores the data's rows only (not yet the "
                          "student's generations, its own, or later stages)", file, "scheme.type")
    if cfg.student.init_from_teacher:
        raise ConfigError("a served teacher's weights stay on its actors", file, "student.init_from_teacher")


def _check_cross_teacher(cfg: RunConfig, info: Any, name: str, sizes: str, file: str | Path | None) -> None:
    """A teacher of another tokenizer: its next-token distributions are over other tokens at other positions, so
    only ``uld`` compares them; what needs one vocabulary or the teacher's own generations is refused."""
    why = (f"the teacher {name} has another tokenizer ({sizes}, not an extension of the data set's): its "
           "distributions are over other tokens at other positions")
    for i, k in enumerate(cfg.knowledge):
        if k["type"] != "uld":
            raise ConfigError(f"{spec_name(cfg, i)}: {why}, which only uld compares (sorted probabilities over the "
                              "aligned answer tokens); a token-level or hidden-state type needs one tokenizer",
                              file, f"knowledge.{i}.type")
    if cfg.knowledge and not info.prompt_len:
        raise ConfigError(f"{why}; uld aligns the two models' answers one per row, and data set "
                          f"{cfg.dataset.name!r} packs its text into blocks (several answers, or none, per block): "
                          "use prompt/answer rows (lm_tasks)", file, "dataset")
    if cfg.scheme.type in ("on_policy", "seq_kd"):
        raise ConfigError(f"scheme {cfg.scheme.type}: {why}; the teacher would score or generate tokens the "
                          "student cannot read", file, "scheme.type")
    if cfg.scheme.type in ("born_again", "assistant"):
        raise ConfigError(f"scheme {cfg.scheme.type}: {why}; its later stages are taught by models of the data's "
                          "tokens, which uld is not for (not supported yet)", file, "scheme.type")
    if cfg.student.init_from_teacher:
        raise ConfigError(f"{why}: its embeddings and head are for its own tokens", file,
                          "student.init_from_teacher")


def _strong_view(cfg: RunConfig, modules: dict[int, Knowledge], x: torch.Tensor,
                 file: str | Path | None) -> torch.Tensor | None:
    """MLKD's strong augmentation runs both models on a RandAugment copy of each batch: images only."""
    strong = next((i for i, k in modules.items() if k.wants_strong_view), None)
    if strong is None:
        return None
    from kdray.data.views import ViewKey, strong_view

    try:
        return strong_view(x, torch.arange(len(x)), ViewKey(cfg.seed, 1))
    except ValueError as e:
        raise ConfigError(f"{spec_name(cfg, strong)}: strong_augment {e}", file, f"knowledge.{strong}") from None


def _dry_loss(cfg: RunConfig, i: int, k: Knowledge, s_out: TapOutputs, t_out: TapOutputs, file: str | Path | None,
              report: DryRun) -> None:
    y = torch.zeros(2, *(s_out.logits.hidden.shape[1:2] if isinstance(s_out.logits, TokenStates) else ()),
                    dtype=torch.long)
    try:
        # Without loading the data set its training split's size is unknown: the dry batch stands in (a two-row
        # memory bank for CRD, K capped at 1) and no labels (CRD: uniform negatives).
        k.bind_data(2)
        k.bind(t_out.features, s_out.features)
        value = k.compute(s_out, t_out, y, index=torch.arange(2)) if k.uses_index else k.compute(s_out, t_out, y)
    except Exception as e:  # noqa: BLE001 - a shape mismatch in a loss is a config problem
        raise ConfigError(f"{spec_name(cfg, i)} cannot combine these layers: {e}", file, f"knowledge.{i}") from None
    if value.dim() != 0:
        raise ConfigError(f"{spec_name(cfg, i)} returned a {tuple(value.shape)} tensor, not a scalar", file,
                          f"knowledge.{i}")
    reg = getattr(k, "regressor", None)
    if reg is not None:
        report.connectors[k.name] = f"{reg.kind} {reg.student_shape} -> {reg.teacher_shape}"
