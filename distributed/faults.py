"""A testing hook that kills a Ray Train worker mid-run, as an OOM kill or a lost node would:
``METAPRUNE_FAULT_INJECT=kill-worker:<epoch>:<marker dir>`` (the tests set it; users never do)."""

from __future__ import annotations

import os
import time
from pathlib import Path

FAULT_ENV = "METAPRUNE_FAULT_INJECT"


def inject_fault(fault: str | None, epoch: int, rank: int, world: int) -> None:
    """The last worker (``rank == world - 1``) dies in epoch ``epoch``, once (a marker file in the
    marker dir remembers). It first waits a dozen of Ray Train's polls
    (``distributed.ray_env.TRAIN_HEALTH_CHECK_S``) so that the controller has registered the
    previous epoch's checkpoint: a worker lost sooner restarts from the checkpoint before that one."""
    parts = (fault or "").split(":")
    if len(parts) == 3 and parts[0] == "kill-worker" and int(parts[1]) == epoch and rank == world - 1:
        marker = Path(parts[2]) / f"killed-worker-epoch{epoch}"
        if not marker.exists():
            marker.touch()
            time.sleep(3)
            os._exit(1)
