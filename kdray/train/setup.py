"""Everything one training run holds, built once before its first epoch (:func:`build_run`): the data, the frozen
teacher, the student (and dml peers) from their own seeded generators, the objective with its connectors, the
teacher's outputs (shared cache or live), the module DDP wraps, the optimizer and its schedule.

The run's per-step choices are made here, once (channels-last, autocast, loss scaling, gradient clipping, a
strong view): the epoch loop (:mod:`kdray.train.loop`) only reads them.
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdray.cache import TeacherOutputs
from kdray.cache.served import ServedOutputs
from kdray.config import RunConfig, TrainConfig
from kdray.data import Batches, DataBundle, load_dataset
from kdray.data.loaders import to_float
from kdray.knowledge import DistillObjective, ModelLayout, TapOutputs
from kdray.knowledge.token import TeacherView
from kdray.models import Classifier, FeatureTaps, Teacher, build_model
from kdray.models.cost import parameter_count, student_cost
from kdray.models.lora import has_lora, merged_copy
from kdray.models.quantize import convert_int8, example_input, is_quantized, prepare_int8
from kdray.ray_setup import resolve_ref
from kdray.train.mutual import MutualStep
from kdray.train.on_policy import OnPolicyBatches, on_policy_batches
from kdray.train.session import Session
from kdray.train.sharding import is_sharded, outside, shard


class DistillStep(nn.Module):
    """Student + objective (with its connectors) as one module, so DDP syncs both in one go."""

    def __init__(self, student: Classifier, objective: DistillObjective, taps: FeatureTaps) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.taps = taps
        self.lm = student.causal_lm

    def forward(self, x: Tensor, y: Tensor, teacher_out: TapOutputs | None, idx: Tensor | None = None,
                x_strong: Tensor | None = None, token_scale: Tensor | None = None,
                mean_scale: float = 1.0, sampled: bool = False) -> tuple[dict[str, Tensor], Tensor | None]:
        """``idx``: the batch's positions in the training split, for the terms that need them (CRD);
        ``x_strong``: a strongly augmented view of the batch, for the terms that align it too (MLKD).
        A classifier on a transfer set: ``token_scale`` is the cross-entropy's ``label_scale`` (its ``_backward``).
        A causal LM's step returns no logits (they are never made whole): its terms carry ``_correct`` and
        ``_count``; ``token_scale`` and ``mean_scale`` normalise its loss, ``sampled`` says the targets are the
        student's own samples (:meth:`DistillObjective._lm_terms`)."""
        if self.lm:
            s_out = self.taps.run(self.student, x, states=True)
            return self.objective(s_out, teacher_out, y, token_scale=token_scale, mean_scale=mean_scale,
                                  sampled=sampled), None
        s_out = self.taps.run(self.student, x)
        if x_strong is not None:
            s_out = s_out._replace(strong=self.taps.run(self.student, x_strong))
        return self.objective(s_out, teacher_out, y, index=idx, label_scale=token_scale), s_out.logits

    def outside(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``: what calls the student outside :meth:`forward` (validation, generation). Under
        FSDP this counts as a forward of the root, which gathers its parameters (:mod:`kdray.train.sharding`)."""
        return fn(*args, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule, stepped once after each epoch, from torch's own schedulers:
    a linear warm-up over ``warmup_epochs`` (epoch e of it at lr·e/W), then cosine to 0 over the remaining
    epochs, steps of ``gamma`` after each of ``step_epochs``, or constant. Its state is checkpointed."""
    from torch.optim import lr_scheduler as sched

    w = train.warmup_epochs
    if train.scheduler == "cosine":
        main: sched.LRScheduler = sched.CosineAnnealingLR(optimizer, T_max=max(1, train.epochs - w))
    elif train.scheduler == "step":  # epoch e runs at lr·gamma^(number of step epochs before e)
        main = sched.MultiStepLR(optimizer, milestones=[m - w for m in train.step_epochs], gamma=train.gamma)
    else:
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if w == 0:
        return main
    warm = sched.LinearLR(optimizer, start_factor=1.0 / w, end_factor=1.0, total_iters=max(w - 1, 0))
    return sched.SequentialLR(optimizer, [warm, main], milestones=[w])


def make_optimizer(params, train: TrainConfig) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW with PyTorch's fused kernels wherever every parameter allows them (floating point,
    on a CPU or a CUDA device): the same update as the per-tensor loop, up to float rounding, in one kernel
    instead of ~10 ops per parameter tensor, which is most of an optimizer step for small students
    (a 2×100 MLP's Adam step: 59 µs fused, 177 µs as torch's CPU default; ``benchmarks/bench_epoch.py``)."""
    params = list(params)
    from torch.distributed.tensor import DTensor

    # FSDP's sharded parameters (DTensors) have no fused SGD (PyTorch registers no sharding rule for it): foreach
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                 and not isinstance(p, DTensor) for p in params)
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, nesterov=train.nesterov,
                               weight_decay=train.weight_decay, fused=fused or None)
    cls = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=train.lr, weight_decay=train.weight_decay, fused=fused or None)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that have it (fp16 + loss scaling otherwise); fp32 on CPU unless asked."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every device's generator, CUDA included


@contextmanager
def seeded_init(seed: int, peer: int = 0) -> Iterator[None]:
    """Build a model from a generator of its own, seeded by (seed, peer), and leave the global RNG as it was.

    So "the same seed" means "the same initial student" whatever was built before it: a teacher, an ensemble
    or nothing (building the teacher first consumed the global RNG, and ``none`` and ``kd`` trials of one
    seed started from different weights). Model construction runs on the CPU, whose generator is the one
    forked here."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + 7_919 * peer) % 2**63)
        yield


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of every RNG (dropout, any random op) on ``rank`` in ``epoch``.

    Re-seeding at each epoch's start makes the RNG state a pure function of (seed, rank, epoch): a run
    resumed from the checkpoint of epoch k replays epoch k+1 exactly as the uninterrupted run did, with no
    RNG state to save, and ranks draw different dropout masks."""
    return ((seed * 1_000_003 + rank) * 10_007 + epoch) % 2**63  # torch takes seeds below 2**64


def node_info() -> dict[str, str]:
    """The Ray node this process runs on (recorded per trial, so multi-node placement is visible)."""
    try:
        import ray

        if ray.is_initialized():
            return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    except Exception:  # noqa: BLE001 - local mode without a runtime context
        pass
    return {}


def move_small_splits(data: DataBundle, device: torch.device, budget_bytes: int = 2 * 1024**3) -> None:
    """On a GPU, keep small in-memory splits on the device: batches are then sliced there (no copies)."""
    if device.type != "cuda":
        return
    for split in (data.train, data.val):
        if split.in_memory and split.x.numel() * split.x.element_size() < budget_bytes:
            split.x, split.y = split.x.to(device), split.y.to(device)


@dataclass
class RunState:
    """One run, from :func:`build_run` to its last epoch."""

    cfg: RunConfig
    session: Session
    device: torch.device
    data: DataBundle
    records: list[dict[str, Any]]
    teacher: Teacher | None
    student: Classifier
    peers: list[nn.Module]  # the student first; dml's peers after it
    peer_cfgs: list[Any]
    costs: list[dict[str, float]]  # per peer: parameters and latency (rank 0)
    objective: DistillObjective
    s_taps: FeatureTaps
    train_batches: Batches
    teacher_out: Any  # TeacherOutputs or ViewCacheOutputs
    step_module: nn.Module  # DistillStep or MutualStep, in DDP with several ranks
    params: list[Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    channels_last: bool
    progress: bool
    step_hook: Callable[[int, int], None] | None = None
    on_policy: OnPolicyBatches | None = None  # scheme on_policy: which batches are the student's samples
    raw_input: dict[str, Any] = field(default_factory=dict)  # what one stored sample is: exports trace it
    where: dict[str, str] = field(default_factory=dict)  # the node, and any teacher split mismatch
    start_epoch: int = 1
    resumed_from: int = 0
    budget_tokens: float = 0.0  # a causal LM: tokens trained on and generated so far (see loop.budget_metrics)

    @property
    def lm(self) -> bool:
        """A causal language model: loss and metrics per target token."""
        return self.data.info.causal_lm

    @property
    def rank(self) -> int:
        return self.session.rank

    @property
    def world(self) -> int:
        return self.session.world_size

    def outside(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, which calls the student outside the step's forward (see
        :func:`kdray.train.sharding.outside`)."""
        return outside(self.step_module, fn, *args, **kwargs)

    @property
    def sharded(self) -> bool:
        """The student is sharded by FSDP (``resources.strategy: fsdp`` on several ranks)."""
        return is_sharded(self.step_module)

    def autocast(self) -> Any:
        """The forward passes' precision context (autocast on GPUs, nothing in fp32)."""
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()


def build_run(config: dict[str, Any], cfg: RunConfig, session: Session) -> RunState:
    """Set up one run: determinism, device, data, models, objective, teacher outputs, optimization."""
    session.keep_checkpoints = cfg.train.keep_checkpoints
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    seed_everything(cfg.seed)  # the same initial weights on every rank
    # cudnn.benchmark picks the fastest kernels, which may differ between runs; deterministic trades speed
    # for bit-identical reruns. Set (and reset) for every run: a trial process may be reused by the next.
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
    torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg.train.deterministic
    torch.backends.cudnn.deterministic = cfg.train.deterministic
    device = session.device(cfg.resources.use_gpu)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    data = load_dataset(cfg.dataset)
    move_small_splits(data, device)
    servers = resolve_ref(config.get("teacher_servers")) or []  # teacher.serve: the teacher lives on its actors
    # a served teacher's records (its weights) stay in the object store: nothing here reads them
    records = [] if servers else [resolve_ref(r) for r in config.get("teacher_records") or []]
    teacher, student, peers, peer_cfgs = _models(cfg, data, records, device, served=bool(servers))
    generations = _seq_kd(config, cfg, data, records, teacher, device)
    # What the student costs to serve (rank 0 reports): a search may trade accuracy against it. With dml peers,
    # each one's: an epoch reports the cost of the peer it keeps (the one a checkpoint and the champion hold).
    sharding = session.world_size > 1 and cfg.resources.strategy == "fsdp"
    if session.rank == 0 and sharding:
        # a student sharded because it is large: timing it whole on one CPU thread would take the other ranks' time
        costs = [{"student_params": parameter_count(student)}]
    elif session.rank == 0:
        samples = data.train.head(64)
        costs = [student_cost(deliverable(m, samples), samples, cfg.latency.device, cfg.latency.threads)
                 for m in peers]
    else:
        costs = [{} for _ in peers]
    if session.world_size > 1 and cfg.train.sync_batchnorm:  # before any hook is placed on its modules
        peers = [nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in peers]
        student = peers[0]
    objective = DistillObjective.from_specs(
        cfg.knowledge, ModelLayout.of(teacher.feature_model) if teacher else ModelLayout((), ""),
        ModelLayout.of(student), cfg.ce_weight, cfg.train.label_smoothing,
        TeacherView(cfg.cache.top_k, cfg.cache.tail), cfg.train.token_chunk,
    )
    objective.partial_labels = not data.info.causal_lm and bool((data.train.y == -100).any())  # a transfer set
    s_taps = FeatureTaps(student.net, objective.student_layers)
    if teacher is not None:
        teacher.tap(objective.teacher_layers)
    channels_last = bool(cfg.train.channels_last if cfg.train.channels_last is not None else device.type == "cuda")
    channels_last = channels_last and len(data.info.model_input) == 3
    if channels_last:
        peers = [m.to(memory_format=torch.channels_last) for m in peers]
        student = peers[0]
    train_batches = Batches(data.train, cfg.train.batch_size, train=True, rank=session.rank, world=session.world_size,
                            seed=cfg.seed, device=device, augment=data.augment,
                                num_workers=cfg.resources.loader_workers)
    # seq_kd trains on the teacher's rows: the shared cache holds the data's, so its token terms score them live
    cache = None if cfg.scheme.type == "seq_kd" else resolve_ref(config.get("teacher_cache"))
    if servers:
        teacher_out: Any = ServedOutputs(servers, cfg.cache.top_k, device, session.rank)
    else:
        teacher_out = TeacherOutputs.create(teacher, cache, records, data,
                                            objective.teacher_layers, device,
                                            copy_to_device=cfg.resources.gpus_per_worker >= 1, seed=cfg.seed,
                                            top_k=cfg.cache.top_k if data.info.causal_lm else None)
    _bind(objective, data, teacher, student, s_taps, device, teacher_out)
    step_module: nn.Module = DistillStep(student, objective, s_taps) if len(peers) == 1 else MutualStep(
        peers, mutual_weight=cfg.scheme.mutual_weight, temperature=cfg.scheme.temperature,
        ce_weight=cfg.ce_weight, label_smoothing=cfg.train.label_smoothing)
    if sharding:
        step_module = shard(step_module, student, device, session.world_size)
    elif session.world_size > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.train)
    amp = autocast_dtype(cfg.train.precision, device)
    st = RunState(cfg, session, device, data, records, teacher, student, peers, peer_cfgs, costs, objective, s_taps,
                  train_batches, teacher_out, step_module, params, optimizer, make_scheduler(optimizer, cfg.train),
                  torch.amp.GradScaler(device.type, enabled=amp == torch.float16), amp, channels_last,
                  progress=bool(config.get("progress", False)) and session.rank == 0,
                  step_hook=config.get("step_hook"),  # callable(epoch, step) before each step: tests inject faults
                  raw_input={"shape": list(data.info.input_shape),
                             "dtype": str(data.train.x.dtype).removeprefix("torch.") if data.train.in_memory
                             else "float32"},
                  where={**node_info(), **generations},
                  on_policy=on_policy_batches(cfg, data.info, device, session.rank))
    if st.sharded:  # reported, so a run says it was sharded (not only that it was asked to be)
        st.where["strategy"] = f"fsdp over {session.world_size} ranks"
    if objective.needs_teacher:
        split = sorted({d for r in records for d in cfg.dataset.split_differences(r.get("dataset") or {})})
        if split:  # only reachable with teacher.allow_split_mismatch (checked before the run)
            st.where["teacher_split_mismatch"] = "; ".join(split)
    return st


def _seq_kd(config: dict[str, Any], cfg: RunConfig, data: DataBundle, records: list[dict[str, Any]],
            teacher: Teacher | None, device: torch.device) -> dict[str, str]:
    """``scheme: seq_kd``: the training split becomes the teacher's answers to its prompts (the sweep's, made once
    and shared, else made here). Returns what the run reports about them."""
    if cfg.scheme.type != "seq_kd":
        return {}
    from kdray.train.on_policy import prompt_rows_error
    from kdray.train.seq_kd import as_split, teacher_rows

    why = prompt_rows_error(cfg, data.info)
    if why:
        raise ValueError(f"scheme.type: {why}")
    from kdray.cache.keys import cache_key

    rows = resolve_ref(config.get("teacher_generations"))
    note = "shared"
    if rows is not None and rows.get("key") != cache_key(records, data):  # a searched data option, another split
        rows, note = None, "made here (the sweep's answers are for another teacher or data)"
    if rows is None:
        info = data.info
        rows = teacher_rows(teacher.members[0], data.train, info.prompt_len, info.eos_token_id,
                            info.pad_token_id or 0, device=device)
        note = "made here" if note == "shared" else note
    data.train = as_split(rows, data.info.prompt_len)
    move_small_splits(data, device)
    return {"teacher_generations": note}


def deliverable(model: nn.Module, samples: Tensor | None = None) -> nn.Module:
    """The model a run delivers (what is served, so what is measured): a LoRA student with its adapters merged, a
    fake-quantised one converted to int8 (``samples`` calibrate a copy that has not trained yet)."""
    if has_lora(model):
        return merged_copy(model)
    return convert_int8(model, samples) if is_quantized(model) else model


def _models(cfg: RunConfig, data: DataBundle, records: list[dict[str, Any]], device: torch.device,
            served: bool = False) -> tuple[Teacher | None, Classifier, list[nn.Module], list[Any]]:
    """The frozen teacher (when the run distils or starts from it, and no actor serves it), the student and dml's
    peers."""
    info = data.info
    teacher = None
    if (cfg.knowledge or cfg.student.init_from_teacher or cfg.scheme.type == "seq_kd") and not served:
        if not records:
            raise ValueError("this run has knowledge terms but was given no teacher")
        # an ensemble's rule and feature member; a later born-again / assistant stage has one teacher record
        ensemble = cfg.teacher.ensemble.model_dump() if cfg.teacher is not None and len(records) > 1 else {}
        teacher = Teacher.from_records(records, **ensemble).to(device)
    if cfg.student.init_from_teacher:  # the same on every rank: copied from the same teacher weights
        from kdray.models.hf_lm import init_from_teacher

        with seeded_init(cfg.seed):
            student = Classifier(info.preprocess(), init_from_teacher(teacher.members[0],
                                                                      cfg.student.init_from_teacher))
        if not cfg.knowledge and cfg.scheme.type != "seq_kd":  # the teacher only gave the initial weights
            teacher = None
    else:
        with seeded_init(cfg.seed):
            student = build_model(cfg.student.name, info.num_classes, info.preprocess(), cfg.student.options)
    if cfg.student.quantize:  # fake quantisation in the graph: it trains against the rounding it will have
        student.net = prepare_int8(student.net, example_input(student.preprocess))
    if cfg.student.peft is not None:  # the adapters' random halves: the same on every rank
        from kdray.models.lora import apply_lora

        with seeded_init(cfg.seed):
            apply_lora(student.net, **cfg.student.peft.model_dump())
    student = student.to(device)
    # Deep mutual learning: the student and its peers, each from its own generator seeded by (seed, k).
    peer_cfgs = [cfg.student, *cfg.scheme.peers] if cfg.scheme.type == "dml" else [cfg.student]
    peers: list[nn.Module] = [student]
    for k, p in enumerate(peer_cfgs[1:], start=1):
        with seeded_init(cfg.seed, k):
            peers.append(build_model(p.name, info.num_classes, info.preprocess(), p.options).to(device))
    return teacher, student, peers, peer_cfgs


def _bind(objective: DistillObjective, data: DataBundle, teacher: Teacher | None, student: Classifier,
          s_taps: FeatureTaps, device: torch.device, teacher_out: Any = None) -> None:
    """Per-sample state (CRD's memory bank) sized by the training split; connector shapes (FitNets' regressor)
    from one dry forward pass on two real samples."""
    objective.bind_data(len(data.train), data.train.y)
    if objective.needs_teacher:
        x0 = to_float(data.train.head(2).to(device))
        student.eval()
        with torch.no_grad():
            if teacher is not None:
                objective.bind_models(teacher.feature_model.net, student.net)  # before the pass: OFD watches it
            if teacher is None:  # served by its actors: token terms only, no feature maps
                t_feats = {}
            elif teacher_out is not None and teacher_out.cross:  # another tokenizer: the rows in its own tokens
                t_feats = teacher_out(torch.arange(2), x0).features
            else:
                t_feats = teacher(x0).features
            objective.bind(t_feats, s_taps.run(student, x0, states=student.causal_lm).features)
        student.train()
    objective.to(device)
