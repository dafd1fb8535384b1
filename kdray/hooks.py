"""Entry points that Ray calls in its own processes, at the top of kdray's layers (they see every registry).

``worker_setup`` is each worker's ``worker_process_setup_hook`` (:func:`kdray.plugins.runtime_env` names it): the
built-in registries first, then the driver's plugins, before the worker reads a registry.
"""
from __future__ import annotations

import os

from kdray import data, knowledge, models  # noqa: F401  (the built-in entries first: a plugin may import from them)
from kdray.plugins import ENV, import_plugins, load_entry_points


def worker_setup() -> None:
    """Import the driver's plugins (named in ``KDRAY_PLUGINS``) and installed entry points in a Ray worker."""
    names = [n for n in os.environ.get(ENV, "").split(",") if n]
    if names:
        import_plugins(names, where=ENV)
    load_entry_points()
