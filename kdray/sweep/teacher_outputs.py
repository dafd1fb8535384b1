"""The teacher outputs a sweep shares: which teacher layers its trials tap, the one-pass cache for fixed inputs or
the per-(epoch, sample) cache for augmented ones (:mod:`kdray.cache`), and what the cache did, in the sweep's run."""
from __future__ import annotations

import time
from typing import Any

from kdray.config import RunConfig
from kdray.sweep.space import SearchSpace


def cache_summary(cache: Any, why_not: str = "") -> dict[str, Any] | None:
    if cache is None:
        return {"none": why_not} if why_not else None
    return {"samples": len(cache), "features": len(cache.features), "nbytes": cache.nbytes, "note": cache.note,
            "stats": dict(cache.stats), "tokens": cache.tokens is not None}


def _build_cache_task(records: list, dataset: dict[str, Any], layers: list[str], max_bytes: int, dtype: str,
                      use_gpu: bool, summarise: bool = False, tokens: dict[str, Any] | None = None,
                      feature_member: int = 0, members: bool = True):
    """The cache (and, with ``summarise``, its summary as a second return value: what the driver reads). A language
    model's (``tokens``: the top-k to keep, the tail rule, the k whose truncation is measured) holds each
    position's top-k (:mod:`kdray.cache.tokens`)."""
    import torch

    from kdray.cache import build_cache
    from kdray.config import DatasetConfig
    from kdray.data import load_dataset
    from kdray.ray_setup import resolve_ref

    records = [resolve_ref(r) for r in records]
    data = load_dataset(DatasetConfig.model_validate(dataset))
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    why_not = ""
    if tokens is not None:
        from kdray.cache.tokens import build_token_cache

        cache, why_not = build_token_cache(records, data, layers, max_bytes, device, **tokens)
        why_not = "" if cache is not None else why_not
    else:
        cache = build_cache(records, data, layers, max_bytes, dtype, device, feature_member=feature_member,
                            members=members)
    return (cache, cache_summary(cache, why_not)) if summarise else cache


def token_request(space: SearchSpace, base: RunConfig) -> dict[str, Any] | None:
    """What a language model's cache keeps: the largest top-k any trial reads (every token if one reads all), the
    base's tail rule, and the k whose truncation cost is measured. None for a classifier's sweep."""
    from kdray.data import describe_dataset

    if not describe_dataset(base.dataset).causal_lm:
        return None
    from kdray.sweep.space import NONE, Distribution

    def values(v: Any) -> list:
        if isinstance(v, Distribution):
            return list(v.choices) if v.type == "categorical" else [int(v.high)]
        return [v]

    where = [space.params] + [sub for c, sub in space.choices.items() if c != NONE]  # none reads no teacher
    ks = [k for sub in where if "cache.top_k" in sub for k in values(sub["cache.top_k"])]
    if "cache.top_k" not in space.params and not all("cache.top_k" in sub for sub in where[1:]):
        ks.append(base.cache.top_k)  # some trial keeps the base's value
    return {"want_k": None if any(k is None for k in ks) else max(ks), "tail": base.cache.tail,
            "truncation_ks": tuple(sorted({int(k) for k in ks if k}))}


def teacher_layers_needed(space: SearchSpace, records: list[dict[str, Any]]) -> list[str]:
    """Every teacher layer any trial of the space can tap (from its representative points)."""
    from kdray.knowledge import DistillObjective, ModelLayout
    from kdray.models import model_from_record

    member = space.base.get("teacher", {}) or {}
    member = int(((member.get("ensemble") or {}).get("feature_member")) or 0)
    t_layout = ModelLayout.of(model_from_record(records[min(member, len(records) - 1)]))
    layers: list[str] = []
    for point in space.representative_points():
        cfg = space.resolve(point)
        if not cfg.knowledge:
            continue
        from kdray.models import MODELS

        s_net = MODELS.get(cfg.student.name)
        from kdray.data import describe_dataset

        info = describe_dataset(cfg.dataset)
        student = s_net.build(info.num_classes, info.model_input, **cfg.student.options)
        obj = DistillObjective.from_specs(cfg.knowledge, t_layout, ModelLayout.of(student))
        layers.extend(n for n in obj.teacher_layers if n not in layers)
    return layers


def combines_members(space: SearchSpace, base: RunConfig) -> bool:
    """Whether some trial of the sweep combines an ensemble's members by a rule other than the mean (the base's rule,
    or one the space sets or searches): only then does the cache keep each member's logits (M times the logits)."""
    from kdray.sweep.space import Distribution

    rules = [base.teacher.ensemble.rule] if base.teacher is not None else []
    for sub in [space.params, *space.choices.values()]:
        v = sub.get("teacher.ensemble.rule")
        if v is not None:
            rules += list(v.choices) if isinstance(v, Distribution) and v.type == "categorical" else [v]
    return any(r != "mean" for r in rules)


def prepare_cache(space: SearchSpace, base: RunConfig, refs: list, records: list, say,
                  spill_dir: str | None = None, stats: dict[str, float] | None = None) -> tuple[Any, Any]:
    """Share teacher outputs across the trials, or say why the teacher runs live.

    Returns (what trials get, the per-epoch cache to stop at the end or None): a one-pass cache when training
    inputs are fixed; teacher outputs per (epoch, sample) (:mod:`kdray.cache`) when they are augmented. ``stats``
    receives what the one-pass cache measured (a language model's bytes per token and truncation KL per k and T).
    """
    import ray

    if base.teacher is None or base.cache.teacher_outputs == "off":
        say("teacher-output cache: off" + (" (cache.teacher_outputs: off)" if base.teacher else ""))
        return None, None
    if any(r.get("tokenizer") for r in records):
        say("teacher-output cache: off (the teacher has its own tokenizer: each trial re-reads the rows in its "
            "tokens and runs it live)")
        return None, None
    from kdray.data import load_dataset

    data = load_dataset(base.dataset)
    layers = teacher_layers_needed(space, records)
    t0 = time.time()
    if not data.deterministic:
        from kdray.cache import start_view_cache

        r = base.resources
        view_cache = start_view_cache(records, refs, data, base.dataset.model_dump(mode="json"), base.seed, layers,
                                      base.cache, space.max_epochs, spill_dir, r.use_gpu,
                                      trial_gpus=r.num_workers * r.gpus_per_worker if r.use_gpu else 0.0)
        say(f"teacher-output cache: augmented inputs, outputs shared per (epoch, sample): "
            f"{view_cache.handle.note}; memory {base.cache.max_bytes / 2**20:.0f} MiB, then spilled to storage")
        return view_cache.handle, view_cache
    args = (refs, base.dataset.model_dump(mode="json"), layers, base.cache.max_bytes, base.cache.dtype,
            base.resources.use_gpu)
    tokens = token_request(space, base)
    member = base.teacher.ensemble.feature_member  # this member's feature maps
    members = combines_members(space, base)  # every member's logits, if a trial combines them by another rule
    if base.resources.use_gpu:  # the teacher pass belongs on a GPU node: a Ray task there
        task = ray.remote(_build_cache_task).options(num_cpus=base.resources.cpus_per_worker,
                                                     num_gpus=min(1.0, base.resources.gpus_per_worker),
                                                     num_returns=2)
        ref, summary_ref = task.remote(*args, summarise=True, tokens=tokens, feature_member=member,
                                       members=members)
        summary = ray.get(summary_ref)  # a few numbers: the cache itself (up to max_bytes) stays in the store
    else:  # on CPU, here: no worker process to start for one pass over the data
        cache, summary = _build_cache_task(*args, summarise=True, tokens=tokens, feature_member=member,
                                           members=members)
        ref = ray.put(cache) if cache is not None else None
    if summary is None or "none" in summary:
        say("teacher-output cache: " + (summary["none"] if summary else "nothing fits the memory budget "
                                        "(cache.max_bytes)") + "; teachers run live")
        return None, None
    what = "blocks, each position's teacher tokens" if summary["tokens"] else "samples, logits"
    say(f"teacher-output cache: {summary['samples']} {what} + {summary['features']} feature maps "
        f"({summary['nbytes'] / 2**20:.1f} MiB, {summary['note']}) built in {time.time() - t0:.1f} s; shared by "
        "all trials")
    trunc = {k: v for k, v in summary.get("stats", {}).items() if k.startswith("truncation_kl")}
    if trunc:
        say("teacher-output cache: mean KL(teacher || its top-k) per token (nats), " + ", ".join(
            f"{k.removeprefix('truncation_kl.')} {v:.2e}" for k, v in sorted(trunc.items())))
    if stats is not None:  # logged to the sweep's run: its size, and what a language model's cache measured
        stats.update({"samples": float(summary["samples"]), "nbytes": float(summary["nbytes"]),
                      **(summary.get("stats") or {})})
    return ref, None


def report_view_cache(view_cache: Any, c: Any, parent_id: str, say) -> None:
    """What the per-epoch cache did, in the sweep's MLflow run and on the console."""
    s = view_cache.summary()
    err = view_cache.producer_error()
    total = s["rows_by_producer"] + s["rows_by_trials"]
    for k in ("rows_by_producer", "rows_by_trials", "rows_read", "blocks_spilled", "blocks_reloaded",
              "blocks_dropped", "peak_bytes", "bytes_per_sample", "mean_truncation_kl"):
        c.log_metric(parent_id, f"teacher_cache.{k}", float(s[k]))
    c.set_tag(parent_id, "kdray.teacher_cache", view_cache.handle.note)
    epochs = s["epochs_computed"]
    say(f"teacher-output cache: {total} teacher rows computed for epochs "
        f"{epochs[0] if epochs else 0}-{epochs[-1] if epochs else 0} ({s['rows_by_producer']} by the producer, "
        f"{s['rows_by_trials']} by trials ahead of it), {s['rows_read']} rows read from the store; peak "
        f"{s['peak_bytes'] / 2**20:.1f} MiB in memory, {s['blocks_spilled']} blocks spilled"
        + (f"; mean KL(teacher || top-k) {s['mean_truncation_kl']:.2e} nats" if s["mean_truncation_kl"] else "")
        + (f"; the producer failed ({err}), trials computed live" if err else ""))


def _generations_task(records: list, dataset: dict[str, Any], use_gpu: bool) -> dict[str, Any]:
    """The teacher's greedy answers to the training prompts (:mod:`kdray.train.seq_kd`)."""
    import torch

    from kdray.config import DatasetConfig
    from kdray.data import load_dataset
    from kdray.models import model_from_record
    from kdray.ray_setup import resolve_ref
    from kdray.train.seq_kd import teacher_rows

    data = load_dataset(DatasetConfig.model_validate(dataset))
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    from kdray.cache.keys import cache_key

    records = [resolve_ref(r) for r in records]
    teacher = model_from_record(records[0]).to(device).eval()
    info = data.info
    rows = teacher_rows(teacher, data.train, info.prompt_len, info.eos_token_id, info.pad_token_id or 0,
                        device=device)
    return {**rows, "key": cache_key(records, data)}  # which teacher and data they answer: trials compare


def prepare_generations(space: SearchSpace, base: RunConfig, refs: list, say) -> Any:
    """``seq_kd`` trials: the teacher's answers to the training prompts, made once (a Ray task on a GPU node when the
    trials use GPUs) and shared through the object store; None when no trial needs them."""
    import ray

    if not refs or not space.uses_scheme("seq_kd"):
        return None
    t0 = time.time()
    args = (refs, base.dataset.model_dump(mode="json"), base.resources.use_gpu)
    if base.resources.use_gpu:
        ref = ray.remote(_generations_task).options(num_cpus=base.resources.cpus_per_worker,
                                                    num_gpus=min(1.0, base.resources.gpus_per_worker)).remote(*args)
        rows = ray.get(ref)
    else:
        rows = _generations_task(*args)
        ref = ray.put(rows)
    say(f"teacher generations (seq_kd): the teacher's answers to {len(rows['x'])} training prompts made in "
        f"{time.time() - t0:.1f} s; shared by the seq_kd trials")
    return ref
