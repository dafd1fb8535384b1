"""A language-model run in a process group of its own: kdray's training loop (``train_run``) on ``world`` gloo ranks on
127.0.0.1, for the test that 2 ranks learn exactly what one process learns on the whole batch."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def run_rank(rank: int, world: int, port: int, run: dict[str, Any], records: list, out: str,
             resume_from: str | None = None) -> None:
    """One rank: join the group, train (from the checkpoint ``resume_from``, if given), and (rank 0) save the final
    weights and the reports."""
    import torch
    import torch.distributed as dist

    from kdray.train.loop import train_run
    from kdray.train.session import Session

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        session = Session(checkpoint_root=Path(out) / f"rank{rank}", resume_from=resume_from)
        train_run({"run": run, "teacher_records": records}, session)
        if rank == 0:
            from kdray.runfiles import STUDENT_FILE

            record = torch.load(session.last_checkpoint / STUDENT_FILE, weights_only=True)
            torch.save({"state_dict": record["state_dict"], "reports": session.reports}, Path(out) / "result.pt")
    finally:
        if world > 1:
            dist.destroy_process_group()
