"""The commands about one run and the registries: ``list``, ``layers``, ``check``, ``teacher``, ``distill``.

Every command validates its input completely (YAML, schema, models, layers, shapes, resources) before
it starts Ray or touches MLflow; a bad input exits with status 2 and a message naming the file and
field. Runtime failures exit with status 1.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from kdray.errors import KdrayError
from kdray.storage import resolve_storage


def cmd_list(args: argparse.Namespace) -> int:
    from kdray import DATASETS, KNOWLEDGE, MODELS, plugins
    from kdray.config import SchemeConfig

    if args.json:
        print(json.dumps({
            "knowledge": {n: {"family": c.family, "summary": c.summary, "paper": c.paper(),
                              "from": KNOWLEDGE.origin(n), "params": list(c.Params.model_fields)}
                          for n, c in KNOWLEDGE.items()},
            "models": {n: {"family": s.family, "description": s.description, "from": MODELS.origin(n)}
                       for n, s in MODELS.items()},
            "model_sources": {f"{p}/": d for p, d in MODELS.sources()},
            "datasets": {n: {"offline": s.offline, "description": s.description, "from": DATASETS.origin(n)}
                         for n, s in DATASETS.items()},
            "schemes": SchemeConfig.catalogue(),
            "plugins": plugins.imported(),
        }, indent=2))
        return 0

    def origin(registry, n: str) -> str:
        o = registry.origin(n)
        return "" if o == "kdray" else f"  [{o}]"

    print("knowledge types (use in `knowledge:` or as sweep choices; `none` = labels only):")
    papers = {n: c.paper() or "-" for n, c in KNOWLEDGE.items()}
    width = max(map(len, papers.values()), default=0)
    for n, c in KNOWLEDGE.items():
        params = ", ".join(p for p in c.Params.model_fields if p != "weight")
        print(f"  {n:<8} {c.family:<10} {papers[n]:<{width}}  {c.summary}  "
              f"[weight{', ' + params if params else ''}]{origin(KNOWLEDGE, n)}")
    print("\nschemes (who teaches whom: `scheme: {type: ...}` in a run config, or a sweep choice `dml` / "
          "`born_again+kd`):")
    for n, info in SchemeConfig.catalogue().items():
        print(f"  {n:<10} {info['paper']:<{width}}  {info['summary']}  [{', '.join(info['params'])}]")
    print("\nmodels (built into kdray unless marked [plugin MODULE]):")
    for n, s in MODELS.items():
        print(f"  {n:<20} {s.family:<12} {s.description}{origin(MODELS, n)}")
    print("\nmodels from other libraries, by prefix:")
    for p, d in MODELS.sources():
        print(f"  {p + '/<name>':<20} {d}")
    print("\ndata sets:")
    for n, s in DATASETS.items():
        print(f"  {n:<14} {'offline' if s.offline else 'download':<9} {s.description}{origin(DATASETS, n)}")
    if plugins.imported():
        print(f"\nplugins imported: {', '.join(plugins.imported())}")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    import torch

    from kdray.config import DatasetConfig, ModelConfig, validate
    from kdray.data import describe_dataset
    from kdray.models import FeatureTaps, build_model, layer_names

    model_cfg = validate(ModelConfig, {"name": args.model}, "command line")
    if args.dataset:
        info = describe_dataset(validate(DatasetConfig, {"name": args.dataset}, "command line"))
        num_classes, pre, x = info.num_classes, info.preprocess(), info.example_input(2)
    else:
        from kdray import MODELS
        from kdray.models import Preprocess

        spec = MODELS.get(args.model)
        tokens = spec.example_dtype == "int64"
        num_classes, pre = 10, Preprocess(spec.example_input, passthrough=tokens)
        x = torch.ones(2, *spec.example_input, dtype=torch.int64) if tokens else torch.zeros(2, *spec.example_input)
    model = build_model(model_cfg.name, num_classes, pre).eval()
    names = layer_names(model.net)
    taps = FeatureTaps(model.net, names)
    with torch.no_grad():
        out = taps.run(model, x)
    net = model.net
    print(f"{args.model}: default hint layers {getattr(net, 'kd_feature_layers', [])}, "
          f"embedding {getattr(net, 'kd_embedding_layer', '')!r}; input {pre.shape}")
    for n in names:
        if args.all or n.count(".") <= 1:
            shape = tuple(out.features[n].shape[1:]) if n in out.features else "?"
            print(f"  {n:<40} {shape}")
    return 0


# -- teacher / distill / check -----------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    from kdray.check import check_resources, dry_run
    from kdray.config import RunConfig, TeacherRunConfig, load_config, read_yaml

    data = read_yaml(args.config)
    if "space" in data or "base" in data:
        from kdray.sweep.space import check_space

        space = check_space(args.config)
        print(f"{args.config}: search space {space.name!r} is valid")
        for line in space.check_report:
            print(line)
        return 0
    if "model" in data and "student" not in data:
        tcfg = load_config(args.config, TeacherRunConfig)
        cfg = tcfg.as_run()
    else:
        cfg = load_config(args.config, RunConfig)
    check_resources(cfg, file=args.config)
    report = dry_run(cfg, file=args.config)
    print(f"{args.config}: valid")
    for line in report.lines():
        print(line)
    return 0


def _check_local(args: argparse.Namespace, storage: str) -> None:
    """``--local`` keeps checkpoints on this disk, in this process: remote storage cannot hold them there."""
    from kdray.config import ConfigError
    from kdray.storage import is_remote

    if getattr(args, "local", False) and is_remote(storage):
        raise ConfigError(f"--local runs in this process and keeps its checkpoints on this disk; {storage} is remote: "
                          "give a local --storage or drop --local", field="--storage")


def _start_ray(address: str | None, local: bool) -> None:
    if local:
        return
    from kdray.ray_setup import init_ray

    print("[kdray] starting Ray" if not address else f"[kdray] joining the Ray cluster at {address}", flush=True)
    init_ray(address)


def cmd_teacher(args: argparse.Namespace) -> int:
    from kdray.check import check_resources, dry_run
    from kdray.config import TeacherRunConfig, load_config

    tcfg = load_config(args.config, TeacherRunConfig)
    if not args.address:
        check_resources(tcfg.as_run(), file=args.config)
    dry_run(tcfg.as_run(), file=args.config)
    from kdray.storage import is_remote, join
    from kdray.teachers import train_teacher

    storage = resolve_storage(args.storage)
    _check_local(args, storage)
    output = args.output or tcfg.output or join(storage, "teachers", f"{tcfg.name}.pt")
    if not is_remote(output):
        output = str(Path(output).expanduser().resolve())
    run_name = _run_name(args, storage, tcfg.name)
    _start_ray(args.address, args.local)
    print(f"[kdray] run {run_name} in {storage} (continue it after an interruption with --resume --run-name "
          f"{run_name})", flush=True)
    t0 = time.time()
    record = train_teacher(tcfg, storage_path=storage, output=output, local=args.local, run_name=run_name)
    _print_final(record, tcfg.dataset, time.time() - t0, "teacher")
    print(f"[kdray] teacher saved to {output}")
    return 0


def _run_name(args: argparse.Namespace, storage: str, prefix: str) -> str:
    """A new Ray Train run, unless ``--resume`` names one (or finds the newest of ``prefix`` in a folder)."""
    from kdray.config import ConfigError
    from kdray.storage import is_remote
    from kdray.train.runner import new_run_name

    if not args.resume:
        if args.run_name:
            raise ConfigError("--run-name names a run to continue; it needs --resume", field="--run-name")
        return new_run_name(prefix)
    if args.run_name:
        return args.run_name
    root = Path(storage)
    runs = [] if is_remote(storage) or not root.is_dir() else \
        [p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix + "-")]
    if not runs:
        raise ConfigError(f"--resume found no run of {prefix!r} in {storage}; name it with --run-name",
                          field="--run-name")
    return max(runs, key=lambda p: p.stat().st_mtime).name


def _print_final(record: dict[str, Any], dataset_cfg, seconds: float, what: str) -> None:
    import torch

    from kdray.data import load_dataset
    from kdray.data.evaluate import evaluate_model
    from kdray.models import model_from_record

    m = record["metrics"]
    msg = f"[kdray] {what} finished in {seconds:.0f} s: validation accuracy {m.get('val_accuracy', float('nan')):.4f}"
    if "val_nll" in m:
        msg += f", validation NLL {m['val_nll']:.4f} nats/token"
    if what == "teacher":
        # A teacher is not selected on the test split, so reporting it here selects nothing.
        test = evaluate_model(model_from_record(record), load_dataset(dataset_cfg).test, 512, torch.device("cpu"))
        msg += f", test accuracy {test['accuracy']:.4f}" + (f", test NLL {test['nll']:.4f}" if "nll" in test else "")
    print(msg, flush=True)


def cmd_distill(args: argparse.Namespace) -> int:
    import yaml

    from kdray.check import check_resources, dry_run
    from kdray.config import RunConfig, TeacherConfig, load_config
    from kdray.data import load_dataset
    from kdray.teachers import load_teacher_records

    cfg: RunConfig = load_config(args.config, RunConfig)
    overrides: dict[str, Any] = {}
    if args.teacher_checkpoint:
        overrides["teacher"] = TeacherConfig(checkpoint=args.teacher_checkpoint)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if overrides:
        cfg = cfg.model_copy(update=overrides)
    if not args.address:
        check_resources(cfg, file=args.config)
    records = load_teacher_records(cfg, args.config) if cfg.teacher and cfg.teacher.ready_made else None
    dry_run(cfg, file=args.config, teacher_records=records)

    from kdray.storage import is_remote, join

    storage = resolve_storage(args.storage)
    _check_local(args, storage)
    runs = join(storage, "runs")
    run_name = _run_name(args, runs, cfg.name)
    out_dir = Path(args.output or cfg.output_dir or (Path("kdray_runs") if is_remote(storage) else Path(storage))
                   / "runs" / run_name).expanduser().resolve()
    _start_ray(args.address, args.local)
    print(f"[kdray] run {run_name} in {runs} (continue it after an interruption with --resume --run-name "
          f"{run_name})", flush=True)
    from kdray.teachers import teacher_records
    from kdray.train.runner import final_student, fit

    t0 = time.time()
    if records is None:
        records = teacher_records(cfg, storage, local=args.local)
    print(f"[kdray] distilling {cfg.knowledge_label}: {cfg.teacher and '+'.join(r['model'] for r in records)} -> "
          f"{cfg.student.name} on {cfg.dataset.name}, {cfg.resources.num_workers} worker(s)", flush=True)
    result = fit(cfg, records, storage_path=runs, name=run_name, local=args.local, serve_teacher=True)
    if result.failed:
        raise KdrayError(f"the run failed: {result.failed}")
    record = final_student(result)
    from kdray.models import save_model

    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(record, out_dir / "student.pt")
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    summary = {"val_accuracy": result.metrics["val_accuracy"], "student": str(out_dir / "student.pt")}
    if "val_nll" in result.metrics:
        summary["val_nll"] = result.metrics["val_nll"]
    if result.metrics.get("teacher_source", "none") != "none":  # where the teacher's outputs came from, and why
        summary["teacher_source"] = result.metrics["teacher_source"]
        summary["teacher_reason"] = result.metrics.get("teacher_reason", "")
    if "strategy" in result.metrics:  # resources.strategy: fsdp, as the workers ran it
        summary["strategy"] = result.metrics["strategy"]
    if args.test:
        import torch

        from kdray.data.evaluate import evaluate_model
        from kdray.models import model_from_record

        test = evaluate_model(model_from_record(record), load_dataset(cfg.dataset).test, 512, torch.device("cpu"))
        summary["test_accuracy"] = test["accuracy"]
        if "nll" in test:
            summary["test_nll"] = test["nll"]
        if "exact_match" in test:
            summary["test_exact_match"] = test["exact_match"]
    if "val_exact_match" in result.metrics:
        summary["val_exact_match"] = result.metrics["val_exact_match"]
    (out_dir / "result.json").write_text(json.dumps(summary, indent=2))
    print(f"[kdray] finished in {time.time() - t0:.0f} s: validation accuracy {summary['val_accuracy']:.4f}"
          + (f", validation NLL {summary['val_nll']:.4f}" if "val_nll" in summary else "")
          + (f", test accuracy {summary['test_accuracy']:.4f}" if "test_accuracy" in summary else "")
          + (f", test NLL {summary['test_nll']:.4f}" if "test_nll" in summary else "")
          + (f", test exact match {summary['test_exact_match']:.4f}" if "test_exact_match" in summary else ""),
          flush=True)
    if "teacher_source" in summary:
        print(f"[kdray] teacher outputs: {summary['teacher_source']} ({summary['teacher_reason']})")
    if "strategy" in summary:
        print(f"[kdray] student sharded: {summary['strategy']}")
    print(f"[kdray] student saved to {out_dir / 'student.pt'}")
    if args.json:
        print(json.dumps(summary))
    return 0
