"""``kdray``: the command line.

Every command validates its input completely (YAML, schema, models, layers, shapes, resources) before
it starts Ray or touches MLflow; a bad input exits with status 2 and a message naming the file and
field. Runtime failures exit with status 1. Commands import only what they need: the query commands
(``best``, ``compare``) answer without importing torch.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kdray.cli.runs import cmd_check, cmd_distill, cmd_layers, cmd_list, cmd_teacher
from kdray.cli.sweeps import add_sweep_commands
from kdray.errors import ConfigError, KdrayError

EPILOG = """\
typical use:
  kdray list                          what can be distilled: knowledge types, models, data sets
  kdray teacher configs/mnist1d_teacher.yaml
  kdray distill configs/mnist1d_kd.yaml
  kdray sweep                         the default sweep (search_spaces/default.yaml)
  kdray best --json                   the champion of the latest sweep
  kdray compare                       every trial, and each knowledge type against labels only
  kdray final --seeds 5               the champion vs labels only, retrained over seeds, with a t-test
"""


def _print_err(msg: str) -> None:
    print(f"kdray: error: {msg}", file=sys.stderr, flush=True)


# -- parser ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kdray",
        description="Find the best distilled student for a teacher: knowledge-distillation sweeps on Ray "
        "Train + Tune, driven by Optuna, tracked in MLflow.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"kdray {_version()}")
    p.add_argument("--plugin", action="append", dest="plugin_top", metavar="MODULE", default=[],
                   help=PLUGIN_HELP)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("list", help="list the registered knowledge types, models and data sets")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("layers", help="print the tappable layers of a model (for hint / relational knowledge)")
    s.add_argument("model", help="a registered model name")
    s.add_argument("--dataset", help="build it for this data set's inputs (default: the model's example input)")
    s.add_argument("--all", action="store_true", help="every submodule, not only the first two levels")
    s.set_defaults(fn=cmd_layers)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage", help="folder (or s3:// URI for sweeps) for checkpoints, teachers and run "
                        "state (default ./kdray_runs)")
    common.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of starting a local Ray")
    one_run = argparse.ArgumentParser(add_help=False)
    one_run.add_argument("--resume", action="store_true", help="continue an interrupted run from its last "
                         "checkpoint (the newest run of this config's name, or --run-name); without it every "
                         "run starts fresh")
    one_run.add_argument("--run-name", help="with --resume: the run to continue (printed when it started)")

    s = sub.add_parser("check", help="validate a run config or a search space and dry-run the shapes, "
                       "without training")
    s.add_argument("config", help="a run config (kdray distill/teacher) or a search space (kdray sweep)")
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("teacher", parents=[common, one_run], help="train a teacher on labels and save its checkpoint",
                       description="Train a model on labels alone with the Ray Train loop and save it as a "
                       "checkpoint that `teacher.checkpoint` of a distillation config can name.")
    s.add_argument("config", help="YAML with name, dataset, model, train, resources, output")
    s.add_argument("--output", help="checkpoint path (default: the config's output, else kdray_runs/teachers/NAME.pt)")
    s.add_argument("--local", action="store_true", help="run in this process (Ray Train local mode), one worker")
    s.set_defaults(fn=cmd_teacher)

    s = sub.add_parser("distill", parents=[common, one_run], help="run one teacher -> student distillation",
                       description="Distil one student from a teacher with Ray Train (DDP over "
                       "resources.num_workers workers), printing progress every epoch and the final "
                       "validation accuracy. The student is saved as OUTPUT/student.pt.")
    s.add_argument("config", help="YAML with dataset, teacher, student, knowledge, train, resources")
    s.add_argument("--teacher-checkpoint", help="use this teacher checkpoint instead of the config's teacher")
    s.add_argument("--seed", type=int, help="override the config's seed")
    s.add_argument("--output", help="folder for student.pt, config.yaml and result.json")
    s.add_argument("--test", action="store_true", help="also evaluate the final student on the test split")
    s.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    s.add_argument("--local", action="store_true", help="run in this process (Ray Train local mode), one worker")
    s.set_defaults(fn=cmd_distill)

    add_sweep_commands(sub, common)
    for command in sub.choices.values():  # `kdray sweep --plugin M` as well as `kdray --plugin M sweep`
        command.add_argument("--plugin", action="append", dest="plugin", metavar="MODULE", default=[],
                             help=PLUGIN_HELP)
    return p


PLUGIN_HELP = ("import this Python module first (repeatable): it registers your own models, data sets or "
               "knowledge types; it is imported in every Ray worker too")


def import_cli_plugins(args: argparse.Namespace) -> None:
    """``--plugin`` modules and installed ``kdray.plugins`` entry points, before any config is read."""
    from kdray import plugins

    names = list(getattr(args, "plugin_top", []) or []) + list(getattr(args, "plugin", []) or [])
    try:
        plugins.load_entry_points()
        plugins.import_plugins(names, where="--plugin", search=[Path.cwd()])
    except plugins.PluginError as e:
        raise ConfigError(e.reason, field=e.field) from None


def _version() -> str:
    from kdray.version import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    # MLflow draws a progress bar for every small artifact it reads (configs, records): noise in a terminal
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        import_cli_plugins(args)
        return int(args.fn(args) or 0)
    except KdrayError as e:  # the one root: a bad input exits 2 (ConfigError), a runtime failure 1
        _print_err(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        _print_err("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
