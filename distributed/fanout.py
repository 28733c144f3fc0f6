"""One loop for work fanned out as Ray tasks: submit every job, collect results as they finish,
show progress, and turn a task that died for good (its worker lost after every retry) into a
failure the caller records, so the run goes on."""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from distributed.ray_env import ray


def died(err: BaseException) -> str:
    """One line for a task that died: its own exception (a RayTaskError wraps it), no colours."""
    cause = getattr(err, "cause", None) or err
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip()
    first = " ".join(text.splitlines()[0].split()) if text else ""
    return f"{type(cause).__name__}: {first[:400]}"


def fan_out(fn: Callable, jobs: Sequence[tuple[tuple, Any]], *, options: dict, desc: str, unit: str,
            on_result: Callable[[Any, Any], dict | None], on_death: Callable[[Any, str], dict | None]) -> None:
    """Runs ``fn(*args)`` as one Ray task (``options``: num_cpus, num_gpus, max_retries, ...) per
    ``(args, job)`` in ``jobs``. As each finishes, ``on_result(job, value)``; for a task that died
    for good, ``on_death(job, died(error))``. Either may return a dict shown beside the progress bar."""
    from distributed.progress import progress

    task = ray.remote(fn).options(**options)
    pending = {task.remote(*args): job for args, job in jobs}
    bar = progress(total=len(pending), desc=desc, unit=unit)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ready[0])
        try:
            value = ray.get(ready[0])
        except Exception as err:  # the task died for good (every retry): the caller records it, the run goes on
            shown = on_death(job, died(err))
        else:
            shown = on_result(job, value)
        bar.update(1)
        if shown:
            bar.set_postfix(running=len(pending), **shown)
    bar.close()
