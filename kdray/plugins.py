"""Plugins: a user's own models, data sets and knowledge types, registered without forking kdray.

A plugin is a Python module that registers entries with the usual decorators (``register_model``,
``register_dataset``, ``register_knowledge``). It is named in a config (``plugins: [my_project.models]``),
on the command line (``--plugin my_project.models``) or by an installed package's entry point in the group
``kdray.plugins``. YAML only names modules; importing them is the one place user code runs, and it runs
before any registry is read.

On a cluster the same modules must be imported in every Ray worker, or a name registered in the driver
would be unknown in the trial that builds the model. ``runtime_env()`` gives what ``ray.init`` needs:
the module list in ``KDRAY_PLUGINS``, Ray's ``worker_process_setup_hook`` that imports them as each worker
process starts, and ``py_modules`` that ship the plugins which are not installed (a file or package next
to the user's config) to every node.
"""
from __future__ import annotations

import importlib
import sys
import sysconfig
from pathlib import Path
from typing import Any

from kdray.errors import KdrayError

ENV = "KDRAY_PLUGINS"
ENTRY_POINT_GROUP = "kdray.plugins"

_imported: list[str] = []  # every plugin module imported in this process, in order
_entry_points_loaded = False


class PluginError(KdrayError, ImportError):
    """A plugin module that cannot be imported: ``field`` says where it was listed, ``reason`` what failed."""

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}" if field else reason)


def imported() -> list[str]:
    """The plugin modules imported so far in this process (config, command line and entry points)."""
    return list(_imported)


def import_plugins(modules: list[str] | tuple[str, ...], *, where: str = "plugins",
                   search: list[str | Path] | None = None) -> list[str]:
    """Import ``modules`` (once each); ``where`` names their origin (``plugins.0``, ``--plugin``) in errors.

    ``search``: folders tried after ``sys.path`` (the config file's folder and the working directory), so a
    plugin next to the config imports without installing it or setting PYTHONPATH.
    """
    for i, name in enumerate(modules):
        field = f"{where}.{i}" if where == "plugins" else where
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\ ") or name.endswith(".py"):
            raise PluginError(field, f"{name!r} is not a Python module name (write my_project.models, "
                              "not a file path)")
        if name in _imported:
            continue
        try:
            _import(name, search or [])
        except PluginError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure inside the user's module is reported as theirs
            raise PluginError(field, f"cannot import plugin module {name!r}: {type(e).__name__}: {e}") from e
        _imported.append(name)
    return list(modules)


def _import(name: str, search: list[str | Path]) -> None:
    try:
        importlib.import_module(name)
        return
    except ModuleNotFoundError as e:
        if e.name is None or not name.startswith(e.name):  # a missing dependency *inside* the plugin
            raise
    for folder in search:
        folder = str(Path(folder).resolve())
        if (Path(folder) / (name.split(".")[0] + ".py")).is_file() or (Path(folder) / name.split(".")[0]).is_dir():
            if folder not in sys.path:
                sys.path.append(folder)
            importlib.invalidate_caches()
            importlib.import_module(name)
            return
    importlib.import_module(name)  # raises the ModuleNotFoundError with Python's own message


def load_entry_points() -> list[str]:
    """Import every installed package's ``kdray.plugins`` entry points (once per process)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return []
    from importlib.metadata import entry_points

    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", "?")
        module = ep.value.split(":")[0].strip()
        if module in _imported:
            continue
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001
            raise PluginError("", f"entry point {ep.name!r} of package {dist!r} (group {ENTRY_POINT_GROUP}): "
                              f"cannot import {ep.value!r}: {type(e).__name__}: {e}") from e
        _imported.append(module)
        names.append(module)
    _entry_points_loaded = True  # only once all loaded: a failing one is retried (and reported) next time
    return names


def _installed(path: str) -> bool:
    """True for modules that every node has as well: the standard library and installed packages."""
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
    return any(path.startswith(r) for r in roots)


def local_sources() -> list[str]:
    """Files or package folders of the imported plugins that are not installed: what Ray must ship."""
    out: list[str] = []
    for name in _imported:
        top = sys.modules.get(name.split(".")[0])
        if top is None:
            continue
        path = getattr(top, "__file__", None)
        if path is None:  # a namespace package
            locations = list(getattr(top, "__path__", []))
            src = locations[0] if locations else None
        else:
            src = str(Path(path).parent) if Path(path).name == "__init__.py" else path
        if src and not _installed(src) and src not in out:
            out.append(src)
    return out


def runtime_env() -> dict[str, Any]:
    """The part of Ray's job ``runtime_env`` that makes every worker import this process's plugins."""
    if not _imported:
        return {}
    env: dict[str, Any] = {"env_vars": {ENV: ",".join(_imported)},
                           "worker_process_setup_hook": "kdray.hooks.worker_setup"}
    sources = local_sources()
    if sources:
        env["py_modules"] = sources
    return env
