"""The per-run training loop: the same function on Ray Train workers, in a Tune trial, or in-process.

``train_run`` reads as its phases: set up (:func:`kdray.train.setup.build_run`) -> restore a checkpoint -> for each
epoch: train (:func:`train_epoch`), measure (:func:`epoch_metrics`), checkpoint and report (:func:`report_epoch`).

One epoch: student (and connectors) in DDP, the frozen teacher outside it under ``no_grad`` (or its outputs read
from the shared cache by sample index), every loss term kept on the device and summed once per epoch; then
validation on the unwrapped student, all-reduced across ranks, so the reported accuracy is that of the whole
validation split; then a resumable checkpoint and one report. Nothing in a step waits for the device: the only
host synchronisations are at the epoch's end (``tests/e2e/test_loop.py`` counts them).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdray.config import RunConfig
from kdray.data.evaluate import evaluate, evaluate_lm
from kdray.data.views import ViewKey, strong_view
from kdray.knowledge.token import IGNORE
from kdray.models import model_record, unwrap
from kdray.models.checkpoint import atomic_torch_save
from kdray.models.lora import has_lora, trainable_state
from kdray.models.quantize import is_quantized
from kdray.ray_setup import resolve_ref  # noqa: F401 (re-exported)
from kdray.runfiles import PLANNED_EPOCHS, STATE_FILE, STUDENT_FILE, ran_all_epochs  # noqa: F401 (re-exported)
from kdray.train.generations import run_generations
from kdray.train.session import Session, scratch_dir
from kdray.train.setup import (  # noqa: F401 (re-exported: the loop's public helpers)
    DistillStep,
    RunState,
    autocast_dtype,
    build_run,
    deliverable,
    epoch_seed,
    make_optimizer,
    make_scheduler,
    node_info,
    seed_everything,
    seeded_init,
)
from kdray.train.sharding import full_state, load_full_state, split_state

# What a causal LM's validation adds (as val_<name>): per target token, at T = 1.
LM_METRICS = ("nll", "ppl", "kl_teacher", "rkl_teacher", "top1_agree", "kl_true", "exact_match")


def train_run(config: dict[str, Any], session: Session) -> dict[str, Any]:
    """Train one student (or a teacher, when there is no knowledge) and report every epoch.

    ``config``: ``run`` (a RunConfig as a dict), ``teacher_records`` (model records or object refs),
    ``teacher_cache`` (optional TeacherCache or ref), ``progress`` (print a line per epoch), ``step_hook``
    (optional callable(epoch, step) run before every step, e.g. a test's fault injection).
    Returns the last metrics. A NaN/inf loss ends the run with a final report whose ``failed`` field
    gives the reason; it is not raised, so Ray does not retry a deterministic failure.
    """
    cfg = RunConfig.model_validate(config["run"])
    if cfg.scheme.stages > 1 and "_generation" not in config:  # born-again generations, teacher assistants
        return run_generations(config, session, train_run)  # which calls this function once per generation
    st = build_run(config, cfg, session)
    restore(st)
    last: dict[str, Any] = {}
    report_latency = 0.0
    for epoch in range(st.start_epoch, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        lr = st.optimizer.param_groups[0]["lr"]
        sums, seen = train_epoch(st, epoch)
        st.scheduler.step()  # the next epoch's learning rate (saved with the checkpoint below)
        metrics = epoch_metrics(st, epoch, sums, seen, lr, t0)
        if metrics.get("failed"):
            if st.progress:
                print(f"[kdray] {metrics['failed']}; stopping this run", flush=True)
            session.report_failure(metrics)
            return metrics
        metrics["report_latency_s"] = report_latency  # of the previous report: what reporting costs
        report_latency = report_epoch(st, epoch, metrics)
        last = metrics
    st.s_taps.remove()
    return last


def restore(st: RunState) -> None:
    """Continue from the session's checkpoint, if it has one: weights, objective (connectors, CRD's banks),
    optimizer, loss scaler and schedule, then the epoch after it."""
    with st.session.restored_checkpoint() as ckpt_dir:
        if not ckpt_dir:
            return
        # a sharded run's whole state stays on the CPU: each rank's shard of it goes to its device
        state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu" if st.sharded else st.device,
                           weights_only=True, mmap=st.sharded)
        if state.get("whole_state"):  # written by a sharded run: whole tensors, the optimizer's keyed by name
            record = torch.load(Path(ckpt_dir) / STUDENT_FILE, map_location="cpu", weights_only=True)
            model = {**{f"student.{k}": v for k, v in record["state_dict"].items()},
                     **{f"objective.{k}": v for k, v in state["objective"].items()}}
            load_full_state(st.step_module, st.optimizer, model, state["optimizer"])
        else:
            _load_unsharded(st, ckpt_dir, state)
        st.scaler.load_state_dict(state["scaler"])
        if "scheduler" in state:
            st.scheduler.load_state_dict(state["scheduler"])
        else:  # a checkpoint from before the schedule was saved: replay it to this epoch
            for _ in range(int(state["epoch"])):
                st.scheduler.step()
        st.budget_tokens = float(state.get("budget_tokens", 0.0))
        st.start_epoch = st.resumed_from = int(state["epoch"])
        st.start_epoch += 1
        if st.progress:
            print(f"[kdray] resumed from the checkpoint of epoch {state['epoch']}", flush=True)


def _load_unsharded(st: RunState, ckpt_dir: str, state: dict[str, Any]) -> None:
    """The weights, objective and optimizer of a checkpoint written by an unsharded run."""
    if len(st.peers) > 1:  # student.pt holds the best peer; every peer's weights are in the state
        for m, sd in zip(st.peers, state["peers"]):
            m.load_state_dict(sd)
    elif "student" in state:  # a LoRA student: student.pt holds it merged, the state its adapters apart
        st.student.load_state_dict(state["student"])
    else:
        record = torch.load(Path(ckpt_dir) / STUDENT_FILE, map_location=st.device, weights_only=True)
        st.student.load_state_dict(record["state_dict"])
    st.objective.load_state_dict(state["objective"])
    st.optimizer.load_state_dict(state["optimizer"])


def _groups(batches: Any, size: int) -> Any:
    """The epoch's batches in groups of ``size`` (gradient accumulation; the last group may be shorter)."""
    if size == 1:
        for b in batches:
            yield (b,)
        return
    group: list = []
    for b in batches:
        group.append(b)
        if len(group) == size:
            yield tuple(group)
            group = []
    if group:
        yield tuple(group)


def _token_scale(st: RunState, group: tuple) -> Tensor:
    """World size / the target tokens of a group of batches over every rank: a causal LM's loss sums times this
    is, after DDP's mean over ranks, the mean over every target token of the effective batch."""
    n = torch.stack([(y != IGNORE).sum() for _, _, y in group]).sum().double()
    if st.world > 1:
        n = st.session.all_reduce_sum(n)
    return (st.world / n.clamp_min(1.0)).float()


def _label_scale(st: RunState, group: tuple) -> Tensor:
    """A transfer set's cross-entropy: world size x batches in the group / the labelled samples of the group over every
    rank. The summed cross-entropy times this is, after the group's mean and DDP's mean over ranks, the mean over
    every labelled sample of the effective batch (each half's own mean would weigh a sparser half's labels more)."""
    n = torch.stack([(y != -100).sum() for _, _, y in group]).sum().double()
    if st.world > 1:
        n = st.session.all_reduce_sum(n)
    return (st.world * len(group) / n.clamp_min(1.0)).float()


def _on_policy_group(st: RunState, group: tuple, epoch: int, step: int) -> tuple[tuple, tuple[bool, ...]]:
    """The group's batches with each on-policy one (the draw at its step) replaced by the student's own rows."""
    out, sampled = [], []
    for m, (idx, x, y) in enumerate(group):
        if st.on_policy.draw(epoch, step + m):
            with st.autocast():
                x, y = st.outside(st.on_policy.rows, st.student, x, epoch, step + m)
            sampled.append(True)
        else:
            sampled.append(False)
        out.append((idx, x, y))
    return tuple(out), tuple(sampled)


def train_epoch(st: RunState, epoch: int) -> tuple[dict[str, Tensor], Any]:
    """One pass over this rank's shard of the training split. Returns each loss term's sum (weighted by batch
    size, or by target tokens for a causal LM) and the correct predictions, as device tensors, and the number of
    samples (target tokens) seen.

    Every per-run choice was made in :func:`build_run`; a step runs only what this run uses, and keeps its
    values on the device (no ``.item()``): they are summed once, at the end. With ``train.grad_accum_steps`` A,
    the gradients of A batches are summed (DDP syncs only the last) before one optimizer step."""
    cfg, objective, teacher_out = st.cfg, st.objective, st.teacher_out
    objective.set_epoch(epoch)
    st.train_batches.set_epoch(epoch)
    distil = objective.needs_teacher
    if distil:
        teacher_out.set_epoch(epoch)
    seed_everything(epoch_seed(cfg.seed, st.rank, epoch))
    st.step_module.train()
    strong, hook, channels_last, clip = objective.wants_strong_view, st.step_hook, st.channels_last, cfg.train.grad_clip
    scaled = st.scaler.is_enabled()
    optimizer, step_module, lm, accum = st.optimizer, st.step_module, st.lm, cfg.train.grad_accum_steps
    ddp = isinstance(step_module, nn.parallel.DistributedDataParallel)
    partial = objective.partial_labels
    labelled: list[Tensor] = []  # a transfer set: the labelled samples of each step (train accuracy's denominator)
    values: list[list[Tensor]] = []  # per step: every term, then the correct predictions
    sizes: list[Any] = []
    names: list[str] = []
    step = 0
    on_policy = st.on_policy
    if on_policy is not None:
        on_policy.reset()
    for group in _groups(st.train_batches, accum):
        optimizer.zero_grad(set_to_none=True)
        sampled = (False,) * len(group)
        if on_policy is not None:  # before the token count: the student's rows have their own targets
            group, sampled = _on_policy_group(st, group, epoch, step)
        token_scale = _token_scale(st, group) if lm else _label_scale(st, group) if partial else None
        last = len(group) - 1
        for m, (idx, x, y) in enumerate(group):
            if hook is not None:
                hook(epoch, step)
            step += 1
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            if distil:  # under the run's autocast, as the student (the losses take float32 from it)
                with st.autocast():  # the student's own rows are in no cache: the teacher scores them live
                    t_out = st.teacher(x) if sampled[m] else teacher_out(idx, x)
            else:
                t_out = None
            x_strong = None
            if strong:  # the teacher's outputs on this second view are not cached: it runs live on it
                x_strong = strong_view(x, idx, ViewKey(cfg.seed, epoch))
                with st.autocast():
                    t_out = t_out._replace(strong=st.teacher(x_strong))
            with step_module.no_sync() if ddp and m < last else nullcontext():
                with st.autocast():
                    if lm:
                        terms, logits = step_module(x, y, t_out, idx, x_strong, token_scale, 1.0 / len(group),
                                                    sampled[m])
                    else:
                        extra = (token_scale,) if partial else ()  # a transfer set's label_scale
                        terms, logits = step_module(x, y, t_out, idx, x_strong, *extra)
                loss = terms.pop("_backward") if lm or partial else terms["loss"]
                if len(group) > 1 and not lm:  # the mean over the group's batches (an LM's scale has it)
                    loss = loss / len(group)
                (st.scaler.scale(loss) if scaled else loss).backward()
            with torch.no_grad():  # one op for the terms, not a detach each; argmax needs no detach
                if lm:
                    correct, count = terms.pop("_correct"), terms.pop("_count")
                else:  # a hidden label (-100, a transfer set) is never the argmax: accuracy over the labelled
                    correct, count = (logits.argmax(1) == y).sum(), y.numel()
                    if partial:
                        labelled.append((y != -100).sum())
                if not names:
                    names = list(terms)
                values.append([torch.stack(list(terms.values())), correct])
            sizes.append(count)
        if scaled:  # fp16: loss scaling
            if clip:
                st.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(st.params, clip)
            st.scaler.step(optimizer)
            st.scaler.update()
        else:
            if clip:
                torch.nn.utils.clip_grad_norm_(st.params, clip)
            optimizer.step()
    if not values:
        return {}, 0
    # One stack per column and one weighted sum per epoch, on the device: each term weighted by its batch's size.
    table = torch.cat([torch.stack([v[0] for v in values]).double(),
                       torch.stack([v[1] for v in values]).double()[:, None]], dim=1)  # (steps, terms + 1)
    weights = (torch.stack(sizes) if lm else torch.tensor(sizes)).to(dtype=table.dtype, device=table.device)
    sums = torch.cat([(table[:, :-1] * weights[:, None]).sum(0), table[:, -1:].sum(0)])
    out = dict(zip([*names, "_correct"], sums.unbind()))
    if labelled:
        out["_labelled"] = torch.stack(labelled).sum().to(table.dtype)
    return out, (weights.sum() if lm else int(sum(sizes)))


def epoch_metrics(st: RunState, epoch: int, sums: dict[str, Tensor], seen: int, lr: float,
                  t0: float) -> dict[str, Any]:
    """The epoch's one sync (every term's sum, the accuracy and the count over all ranks), validation of every
    peer, and the report; ``failed`` says why when a term or the validation loss is not finite."""
    cfg, device = st.cfg, st.device
    names = [k for k in sums if k not in ("_correct", "_labelled")]
    labelled = sums.get("_labelled")
    packed = torch.stack([*(sums[k] for k in names), *([labelled] if labelled is not None else []), sums["_correct"],
                          torch.as_tensor(seen, dtype=torch.float64, device=device)]) if sums else \
        torch.zeros(2, dtype=torch.float64, device=device)
    packed = st.session.all_reduce_sum(packed)
    vals = packed.tolist()
    total = vals[-1] or 1.0
    judged = (vals[-3] or 1.0) if labelled is not None else total  # train accuracy: over the labelled samples
    means = {k: vals[i] / total for i, k in enumerate(names)}
    train_time = time.perf_counter() - t0
    bad = [k for k in names if not math.isfinite(means[k])]
    op = on_policy_metrics(st)  # every rank, failed or not: an all-reduce
    if bad:
        reason = (f"loss term{'s' if len(bad) > 1 else ''} {', '.join(bad)} became non-finite "
                  f"(NaN or inf) in epoch {epoch}")
        # the costs too: a two-objective search needs every objective in every report, a failed one included
        return {"epoch": epoch, **failed_values(st), "failed": reason, "lr": lr, **st.costs[0],
                **budget_metrics(st, total, op)}  # what the failed trial spent counts in the budget too
    peer_vals = []
    for m in st.peers:
        st.session.broadcast_buffers(m)  # validate exactly what rank 0 checkpoints
        if st.lm:
            # a teacher of another tokenizer cannot read the validation rows: no agreement metrics with it
            peer_vals.append(st.outside(evaluate_lm, m, st.data.val, cfg.train.batch_size, device, st.session,
                                        st.amp, None if st.teacher_out.cross else st.teacher, cfg.train.token_chunk,
                                        lockstep=st.sharded))
        elif is_quantized(m):  # the int8 model it delivers, on the CPU (int8 kernels), the whole split on every rank
            peer_vals.append(evaluate(deliverable(m), st.data.val, max(cfg.train.batch_size, 256),
                                      torch.device("cpu")))
        else:
            peer_vals.append(evaluate(m, st.data.val, max(cfg.train.batch_size, 256), device, st.session,
                                      st.channels_last, st.amp))
    best = max(range(len(st.peers)), key=lambda k: peer_vals[k]["accuracy"])  # the peer a checkpoint keeps
    val, distil = peer_vals[best], st.objective.needs_teacher
    metrics = {
        "epoch": epoch, PLANNED_EPOCHS: cfg.train.epochs, "world_size": st.world,
        "val_accuracy": val["accuracy"], "val_loss": val["loss"],
        **({f"val_{k}": val[k] for k in LM_METRICS if k in val} if st.lm else {}),
        "train_accuracy": vals[-2] / judged, "train_loss": means.pop("loss", float("nan")),
        **{f"loss_{k}": v for k, v in means.items()},
        **({"best_peer": best, **{f"val_accuracy_peer{k}": v["accuracy"] for k, v in enumerate(peer_vals)}}
           if len(st.peers) > 1 else {}),
        "lr": lr, "epoch_time_s": time.perf_counter() - t0, "train_time_s": train_time,
        "samples_per_s": total / train_time if train_time > 0 else 0.0,  # a causal LM: target tokens per second
        **({"tokens_per_s": total / train_time if train_time > 0 else 0.0} if st.lm else {}),
        "teacher_source": st.teacher_out.source if distil else "none",
        # may change mid-run: a lost teacher-output store turns a trial live
        **({"teacher_reason": st.teacher_out.reason, **st.teacher_out.epoch_stats()} if distil else {}),
        **st.costs[best], **st.where, **op, **budget_metrics(st, total, op),
        "_best": best,
    }
    if st.resumed_from:
        metrics["resumed_from_epoch"] = st.resumed_from
    if not math.isfinite(metrics["val_loss"]):
        metrics.update(failed=f"validation loss became non-finite in epoch {epoch}", **failed_values(st))
        metrics.pop("_best")
    return metrics


def on_policy_metrics(st: RunState) -> dict[str, float]:
    """``scheme: on_policy``: the epoch's on-policy batches (their fraction, on rank 0: every rank draws the same)
    and the tokens the student generated over every rank (its answers up to their end tokens)."""
    op = st.on_policy
    if op is None:
        return {}
    steps = max(1, len(st.train_batches))
    tokens = st.session.all_reduce_sum(op.tokens.clone())
    return {"on_policy_fraction": op.batches / steps, "generated_tokens": float(tokens)}


def budget_metrics(st: RunState, trained: float, op: dict[str, float]) -> dict[str, float]:
    """A causal LM's spend so far, for a budget in tokens (``scheduler.unit: tokens``): ``budget_tokens``, every
    target token trained on (over every rank) plus every token the student generated (on-policy batches: one forward
    pass each), and ``budget_epochs``, that in epochs of the training split's target tokens: an off-policy run's
    equals its epoch; a run that also generates reaches each epoch's worth of tokens sooner."""
    if not st.lm:
        return {}
    st.budget_tokens += float(trained) + float(op.get("generated_tokens", 0.0))
    per_epoch = max(1, int((st.data.train.y != IGNORE).sum()))
    return {"budget_tokens": st.budget_tokens, "budget_epochs": st.budget_tokens / per_epoch}


def failed_values(st: RunState) -> dict[str, float]:
    """What a failed run reports for the metrics a sweep may select on: the worst value of each (0 accuracy, an
    infinite NLL), so every searcher metric is in the report and no failure ranks above a measurement."""
    from kdray.goal import GOALS

    return {g.metric: g.worst for g in GOALS.values() if g.metric == "val_accuracy" or st.lm}


def report_epoch(st: RunState, epoch: int, metrics: dict[str, Any]) -> float:
    """Checkpoint (rank 0, every ``checkpoint_every`` epochs and the last) and report; a progress line about
    20 times a run. Returns how long reporting took."""
    cfg = st.cfg
    best = metrics.pop("_best")
    save = epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs
    t_report = time.perf_counter()
    whole = full_state(st.step_module, st.optimizer) if save and st.sharded else None  # every rank gathers
    if save and st.rank == 0:
        with scratch_dir() as d:
            write_checkpoint(d, st, epoch, metrics, best, whole)
            metrics["checkpoint_write_s"] = time.perf_counter() - t_report
            st.session.report(metrics, d)
    else:
        st.session.report(metrics, None)
    latency = time.perf_counter() - t_report
    every = max(1, cfg.train.epochs // 20)
    if st.progress and (epoch % every == 0 or epoch in (st.start_epoch, cfg.train.epochs)):
        what = (f"val_nll {metrics['val_nll']:.4f}  val_ppl {metrics['val_ppl']:.2f}  "
                f"val_acc {metrics['val_accuracy']:.4f}" if st.lm else
                f"val_acc {metrics['val_accuracy']:.4f}  val_loss {metrics['val_loss']:.4f}")
        speed = f"{metrics['tokens_per_s']:.0f} tokens/s" if st.lm else f"{metrics['samples_per_s']:.0f} samples/s"
        print(f"[kdray] epoch {epoch}/{cfg.train.epochs}  loss {metrics['train_loss']:.4f}  {what}  "
              f"({metrics['epoch_time_s']:.1f} s, {speed})", flush=True)
    return latency


def write_checkpoint(d: str, st: RunState, epoch: int, metrics: dict[str, Any], best: int,
                     whole: tuple[dict[str, Any], dict[str, Any]] | None = None) -> None:
    """``student.pt``: the model a run delivers (with ``dml``, the peer best on validation now); the state:
    what resuming needs, every peer's weights included. ``whole``: a sharded run's step and optimizer state dicts,
    gathered whole (:func:`kdray.train.sharding.full_state`)."""
    cfg, peers = st.cfg, st.peers
    step: nn.Module = unwrap(st.step_module)
    record = model_record(
        peers[best], model_name=st.peer_cfgs[best].name, model_options=st.peer_cfgs[best].options,
        num_classes=st.data.info.num_classes, dataset=cfg.dataset.model_dump(mode="json"),
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        config=cfg.model_dump(mode="json"), raw_input=st.raw_input,
        state_dict=split_state(whole[0], "student.") if whole else None,
    )
    atomic_torch_save(record, Path(d) / STUDENT_FILE)
    objective = split_state(whole[0], "objective.") if whole else step.objective.state_dict()
    atomic_torch_save(
        {"epoch": epoch, "objective": objective, "optimizer": whole[1] if whole else st.optimizer.state_dict(),
         **({"whole_state": True} if whole else {}),
         "budget_tokens": st.budget_tokens,
         "scaler": st.scaler.state_dict(), "scheduler": st.scheduler.state_dict(),
         **({"peers": [unwrap(m).state_dict() for m in peers]} if len(peers) > 1 else {}),
         **({"student": trainable_state(unwrap(peers[0]))} if has_lora(peers[0]) else {})},
        Path(d) / STATE_FILE,
    )
