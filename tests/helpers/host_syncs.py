"""Counting the host synchronisations of a training step: every ``Tensor`` method that reads a value on the host
(``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``, ``float(t)``, ``bool(t)``, ``int(t)``), recorded with the
(epoch, step) the loop's step hook last announced."""
from __future__ import annotations

import sys

READS = ("item", "tolist", "numpy", "cpu", "__float__", "__bool__", "__int__")


def count_host_syncs(monkeypatch, exempt: tuple[str, ...] = ("torch/optim",)):
    """Patch the reads; return (calls, step_hook): ``calls`` fills with (name, (epoch, step) or None) for every read
    whose caller's file is not under one of ``exempt`` (torch's optimizers read their own step counters on the CPU,
    as the plain loop does)."""
    import torch

    calls: list = []
    where: list = [None]

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if not any(e in caller for e in exempt):
                calls.append((name, where[0]))
            return original(self, *a, **k)
        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))

    def hook(epoch: int, step: int) -> None:
        where[0] = (epoch, step)

    return calls, hook, where
