"""The per-run training loop: the same function on Ray Train workers, in a Tune trial, or in-process.

One epoch: student (and connectors) in DDP, the frozen teacher outside it under ``no_grad`` (or its
outputs read from the shared cache by sample index), every loss term summed on the device and synced
once per epoch; then validation on the unwrapped student, all-reduced across ranks, so the reported
accuracy is that of the whole validation split; then a resumable checkpoint and one report.
"""
from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdray.config import RunConfig, TrainConfig
from kdray.data import Batches, DataBundle, Split, load_dataset
from kdray.data.views import ViewKey, strong_view
from kdray.knowledge import DistillObjective, ModelLayout, TapOutputs, nonfinite_terms
from kdray.models import Classifier, FeatureTaps, Teacher, build_model, model_record, unwrap
from kdray.models.checkpoint import atomic_torch_save
from kdray.models.cost import student_cost
from kdray.train.mutual import MutualStep
from kdray.train.session import Session, scratch_dir

STUDENT_FILE = "student.pt"  # a self-contained model record (kdray.models.checkpoint)
STATE_FILE = "train_state.pt"  # optimizer, scaler, epoch: what resuming needs besides the weights
PLANNED_EPOCHS = "epochs_planned"  # reported every epoch: a sweep may search train.epochs per trial


def ran_all_epochs(metrics: dict[str, Any], default_epochs: int) -> bool:
    """Did the run behind these (last reported) metrics reach the end of its own schedule?"""
    return int(metrics.get("epoch", 0)) >= int(metrics.get(PLANNED_EPOCHS, default_epochs))


class DistillStep(nn.Module):
    """Student + objective (with its connectors) as one module, so DDP syncs both in one go."""

    def __init__(self, student: Classifier, objective: DistillObjective, taps: FeatureTaps) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.taps = taps

    def forward(self, x: Tensor, y: Tensor, teacher_out: TapOutputs | None, idx: Tensor | None = None,
                x_strong: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        """``idx``: the batch's positions in the training split, for the terms that need them (CRD);
        ``x_strong``: a strongly augmented view of the batch, for the terms that align it too (MLKD)."""
        s_out = self.taps.run(self.student, x)
        if x_strong is not None:
            s_out = s_out._replace(strong=self.taps.run(self.student, x_strong))
        return self.objective(s_out, teacher_out, y, index=idx), s_out.logits


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
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, nesterov=train.nesterov,
                               weight_decay=train.weight_decay)
    cls = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=train.lr, weight_decay=train.weight_decay)


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


def resolve_ref(obj: Any) -> Any:
    """Values handed to workers may be Ray object references (shared through the object store)."""
    try:
        import ray

        if isinstance(obj, ray.ObjectRef):
            return ray.get(obj)
    except ImportError:  # pragma: no cover
        pass
    return obj


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, batch_size: int, device: torch.device, session: Session | None = None,
    channels_last: bool = False, amp: torch.dtype | None = None,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``split``, summed over all ranks exactly once."""
    rank, world = (session.rank, session.world_size) if session else (0, 1)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct, count, loss
    for _, x, y in Batches(split, batch_size, train=False, rank=rank, world=world, device=device):
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            logits = model(x)
        logits = logits.float()
        sums[0] += (logits.argmax(1) == y).sum()
        sums[1] += y.numel()
        sums[2] += F.cross_entropy(logits, y, reduction="sum")
    if session is not None:
        session.all_reduce_sum(sums)
    model.train(was_training)
    correct, count, loss = sums.tolist()
    return {"accuracy": correct / max(count, 1), "loss": loss / max(count, 1), "count": count}


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


def train_run(config: dict[str, Any], session: Session) -> dict[str, Any]:
    """Train one student (or a teacher, when there is no knowledge) and report every epoch.

    ``config``: ``run`` (a RunConfig as a dict), ``teacher_records`` (model records or object refs),
    ``teacher_cache`` (optional TeacherCache or ref), ``progress`` (print a line per epoch), ``step_hook``
    (optional callable(epoch, step) run before every step, e.g. a test's fault injection).
    Returns the last metrics. A NaN/inf loss ends the run with a final report whose ``failed`` field
    gives the reason; it is not raised, so Ray does not retry a deterministic failure.
    """
    from kdray.teacher_cache import TeacherOutputs  # local: the cache module imports this one

    cfg = RunConfig.model_validate(config["run"])
    if cfg.scheme.type == "born_again" and cfg.scheme.generations > 1 and "_generation" not in config:
        from kdray.train.generations import run_generations  # which calls this function once per generation

        return run_generations(config, session)
    session.keep_checkpoints = cfg.train.keep_checkpoints
    rank, world = session.rank, session.world_size
    progress = bool(config.get("progress", False)) and rank == 0
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
    info = data.info
    raw_input = {"shape": list(info.input_shape),  # what one stored sample is: exports are traced for it
                 "dtype": str(data.train.x.dtype).removeprefix("torch.") if data.train.in_memory else "float32"}
    teacher = None
    records = [resolve_ref(r) for r in config.get("teacher_records") or []]
    if cfg.knowledge or cfg.student.init_from_teacher:
        if not records:
            raise ValueError("this run has knowledge terms but was given no teacher")
        teacher = Teacher.from_records(records).to(device)
    if cfg.student.init_from_teacher:  # the same on every rank: copied from the same teacher weights
        from kdray.models.hf import init_from_teacher

        with seeded_init(cfg.seed):
            student = Classifier(info.preprocess(),
                                 init_from_teacher(teacher.members[0], cfg.student.init_from_teacher))
        student = student.to(device)
        if not cfg.knowledge:  # the teacher only gave the initial weights
            teacher = None
    else:
        with seeded_init(cfg.seed):
            student = build_model(cfg.student.name, info.num_classes, info.preprocess(), cfg.student.options)
        student = student.to(device)
    # Deep mutual learning: the student and its peers, each from its own generator seeded by (seed, k).
    peer_cfgs = [cfg.student, *cfg.scheme.peers] if cfg.scheme.type == "dml" else [cfg.student]
    peers = [student]
    for k, p in enumerate(peer_cfgs[1:], start=1):
        with seeded_init(cfg.seed, k):
            peers.append(build_model(p.name, info.num_classes, info.preprocess(), p.options).to(device))
    # What the student costs to serve (rank 0 reports): a search may trade accuracy against it. With dml peers,
    # each one's: an epoch reports the cost of the peer it keeps (the one a checkpoint and the champion hold).
    if rank == 0:
        samples = data.train.head(64)
        costs = [student_cost(m, samples, cfg.latency.device, cfg.latency.threads) for m in peers]
    else:
        costs = [{} for _ in peers]
    if world > 1 and cfg.train.sync_batchnorm:  # before any hook is placed on its modules
        peers = [nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in peers]
        student = peers[0]
    objective = DistillObjective.from_specs(
        cfg.knowledge, ModelLayout.of(teacher.members[0]) if teacher else ModelLayout((), ""),
        ModelLayout.of(student), cfg.ce_weight, cfg.train.label_smoothing,
    )
    s_taps = FeatureTaps(student.net, objective.student_layers)
    if teacher is not None:
        teacher.tap(objective.teacher_layers)

    channels_last = bool(cfg.train.channels_last if cfg.train.channels_last is not None else device.type == "cuda")
    channels_last = channels_last and len(info.model_input) == 3
    if channels_last:
        peers = [m.to(memory_format=torch.channels_last) for m in peers]
        student = peers[0]

    train_batches = Batches(data.train, cfg.train.batch_size, train=True, rank=rank, world=world, seed=cfg.seed,
                            device=device, augment=data.augment, num_workers=cfg.resources.loader_workers)
    teacher_out = TeacherOutputs.create(teacher, resolve_ref(config.get("teacher_cache")), records, data,
                                        objective.teacher_layers, device,
                                        copy_to_device=cfg.resources.gpus_per_worker >= 1, seed=cfg.seed)

    # Per-sample state (CRD's memory bank) is sized by the training split, indexed by the batches' idx.
    objective.bind_data(len(data.train), data.train.y)
    # One dry forward pass on two samples: connector shapes (FitNets' regressor) come from real taps.
    if objective.needs_teacher:
        x0 = data.train.head(2)
        from kdray.data.loaders import to_float

        x0 = to_float(x0.to(device))
        student.eval()
        with torch.no_grad():
            objective.bind_models(teacher.members[0].net, student.net)  # before the pass: OFD watches it
            objective.bind(teacher(x0).features, s_taps.run(student, x0).features)
        student.train()
    objective.to(device)

    step_module: nn.Module = DistillStep(student, objective, s_taps) if len(peers) == 1 else MutualStep(
        peers, mutual_weight=cfg.scheme.mutual_weight, temperature=cfg.scheme.temperature,
        ce_weight=cfg.ce_weight, label_smoothing=cfg.train.label_smoothing)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
        )
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    amp = autocast_dtype(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    start_epoch, where_resumed = 1, 0
    with session.restored_checkpoint() as ckpt_dir:
        if ckpt_dir:
            state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location=device, weights_only=True)
            if len(peers) > 1:  # student.pt holds the best peer; every peer's weights are in the state
                for m, sd in zip(peers, state["peers"]):
                    m.load_state_dict(sd)
            else:
                record = torch.load(Path(ckpt_dir) / STUDENT_FILE, map_location=device, weights_only=True)
                student.load_state_dict(record["state_dict"])
            objective.load_state_dict(state["objective"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            if "scheduler" in state:
                scheduler.load_state_dict(state["scheduler"])
            else:  # a checkpoint from before the schedule was saved: replay it to this epoch
                for _ in range(int(state["epoch"])):
                    scheduler.step()
            start_epoch = int(state["epoch"]) + 1
            where_resumed = int(state["epoch"])
            if progress:
                print(f"[kdray] resumed from the checkpoint of epoch {state['epoch']}", flush=True)

    strong = objective.wants_strong_view  # MLKD's strong augmentation: a second view of every batch
    step_hook = config.get("step_hook")  # callable(epoch, step) before each step: tests inject faults here
    progress_every = max(1, cfg.train.epochs // 20)  # about 20 progress lines per run
    report_latency = 0.0
    where = node_info()
    if objective.needs_teacher:
        split = sorted({d for r in records for d in cfg.dataset.split_differences(r.get("dataset") or {})})
        if split:  # only reachable with teacher.allow_split_mismatch (checked before the run)
            where["teacher_split_mismatch"] = "; ".join(split)
    last: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        objective.set_epoch(epoch)
        train_batches.set_epoch(epoch)
        if objective.needs_teacher:
            teacher_out.set_epoch(epoch)
        seed_everything(epoch_seed(cfg.seed, rank, epoch))
        step_module.train()
        names: list[str] = []
        acc: Tensor | None = None  # per-term sums (weighted by batch size), then correct predictions
        seen = 0
        for step, (idx, x, y) in enumerate(train_batches):
            if step_hook is not None:
                step_hook(epoch, step)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            t_out = teacher_out(idx, x) if objective.needs_teacher else None
            x_strong = None
            if strong:  # the teacher's outputs on this second view are not cached: it runs live on it
                x_strong = strong_view(x, idx, ViewKey(cfg.seed, epoch))
                with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                    t_out = t_out._replace(strong=teacher(x_strong))
            with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                terms, logits = step_module(x, y, t_out, idx, x_strong)
            loss = terms["loss"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.train.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            n = y.numel()
            seen += n
            # One stacked update per step (not two small ops per term): this loop runs thousands of times.
            step_vals = torch.stack([v.detach().float() for v in terms.values()] +
                                    [(logits.detach().argmax(1) == y).sum().float() / n]) * n
            if acc is None:
                names, acc = list(terms), step_vals
            else:
                acc += step_vals

        scheduler.step()  # the next epoch's learning rate (saved with the checkpoint below)
        # One sync per epoch: every term's sum, the accuracy and the count, over all ranks.
        packed = torch.cat([acc, torch.tensor([float(seen)], device=device)])
        packed = session.all_reduce_sum(packed.double())
        total = packed[-1].item()
        means = {k: packed[i].item() / total for i, k in enumerate(names)}
        bad = [k for k in names if not math.isfinite(means[k])]
        train_time = time.perf_counter() - t0

        if bad:
            reason = (f"loss term{'s' if len(bad) > 1 else ''} {', '.join(bad)} became non-finite "
                      f"(NaN or inf) in epoch {epoch}")
            # the costs too: a two-objective search needs every objective in every report, a failed one included
            last = {"epoch": epoch, "val_accuracy": 0.0, "failed": reason, "lr": lr, **costs[0]}
            if progress:
                print(f"[kdray] {reason}; stopping this run", flush=True)
            session.report_failure(last)
            return last

        peer_vals = []
        for m in peers:
            session.broadcast_buffers(m)  # validate exactly what rank 0 checkpoints
            peer_vals.append(evaluate(m, data.val, max(cfg.train.batch_size, 256), device, session, channels_last,
                                      amp))
        best = max(range(len(peers)), key=lambda k: peer_vals[k]["accuracy"])  # the peer a checkpoint keeps
        val = peer_vals[best]
        epoch_time = time.perf_counter() - t0
        metrics = {
            "epoch": epoch,
            PLANNED_EPOCHS: cfg.train.epochs,
            "world_size": world,
            "val_accuracy": val["accuracy"],
            "val_loss": val["loss"],
            "train_accuracy": packed[-2].item() / total,
            "train_loss": means.pop("loss"),
            **{f"loss_{k}": v for k, v in means.items()},
            **({"best_peer": best, **{f"val_accuracy_peer{k}": v["accuracy"] for k, v in enumerate(peer_vals)}}
               if len(peers) > 1 else {}),
            "lr": lr,
            "epoch_time_s": epoch_time,
            "train_time_s": train_time,
            "samples_per_s": total / train_time if train_time > 0 else 0.0,
            "teacher_source": teacher_out.source if objective.needs_teacher else "none",
            # may change mid-run: a lost teacher-output store turns a trial live
            **({"teacher_reason": teacher_out.reason} if objective.needs_teacher else {}),
            **(teacher_out.epoch_stats() if objective.needs_teacher else {}),
            **costs[best],
            **where,
        }
        if where_resumed:
            metrics["resumed_from_epoch"] = where_resumed
        if not math.isfinite(metrics["val_loss"]):
            metrics.update(failed=f"validation loss became non-finite in epoch {epoch}", val_accuracy=0.0)
            session.report_failure(metrics)
            return metrics
        metrics["report_latency_s"] = report_latency  # of the previous report: what reporting costs
        save = epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs
        t_report = time.perf_counter()
        if save and rank == 0:
            with scratch_dir() as d:
                _write_checkpoint(d, unwrap(step_module), optimizer, scaler, scheduler, epoch, cfg, info, metrics,
                                  raw_input, peers, peer_cfgs, best)
                metrics["checkpoint_write_s"] = time.perf_counter() - t_report
                session.report(metrics, d)
        else:
            session.report(metrics, None)
        report_latency = time.perf_counter() - t_report
        if progress and (epoch % progress_every == 0 or epoch in (start_epoch, cfg.train.epochs)):
            print(
                f"[kdray] epoch {epoch}/{cfg.train.epochs}  loss {metrics['train_loss']:.4f}  "
                f"val_acc {metrics['val_accuracy']:.4f}  val_loss {metrics['val_loss']:.4f}  "
                f"({epoch_time:.1f} s, {metrics['samples_per_s']:.0f} samples/s)",
                flush=True,
            )
        last = metrics
    s_taps.remove()
    return last


def _write_checkpoint(d: str, step: nn.Module, optimizer, scaler, scheduler, epoch: int, cfg: RunConfig, info,
                      metrics, raw_input: dict[str, Any], peers: list[nn.Module], peer_cfgs: list, best: int) -> None:
    """``student.pt``: the model a run delivers (with ``dml``, the peer best on validation now); the state:
    what resuming needs, every peer's weights included."""
    record = model_record(
        peers[best], model_name=peer_cfgs[best].name, model_options=peer_cfgs[best].options,
        num_classes=info.num_classes, dataset=cfg.dataset.model_dump(mode="json"),
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        config=cfg.model_dump(mode="json"), raw_input=raw_input,
    )
    atomic_torch_save(record, Path(d) / STUDENT_FILE)
    atomic_torch_save(
        {"epoch": epoch, "objective": step.objective.state_dict(), "optimizer": optimizer.state_dict(),
         "scaler": scaler.state_dict(), "scheduler": scheduler.state_dict(),
         **({"peers": [unwrap(m).state_dict() for m in peers]} if len(peers) > 1 else {})},
        Path(d) / STATE_FILE,
    )
