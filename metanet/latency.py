"""Measured speed: how long a forward pass takes, pruned against unpruned, on the device at hand.

MACs are what pruning is asked for; time is what a user gets. The two differ (Torch-Pruning's most
repeated complaint is "no latency gain after pruning"): small layers are bound by memory and
launch overheads, not arithmetic, and a layer that lost channels can still cost most of its time.

Timing is paired and interleaved: each round runs every model once, in turn, so a slow moment
(another process, a clock change) lands on all of them and not on one; the median over rounds
resists the rounds it hit. Warm-up passes come first (allocator, caches, lazy kernels); threads are
fixed for the measurement and restored afterwards (a thread count chosen by the machine's load
would change the answer between runs). On CUDA the device is synchronised around each pass.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from typing import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class LatencySettings(BaseModel):
    """How a forward pass is timed: at batch 1 and at ``batch`` inputs, ``warmup`` untimed passes,
    then the median of ``repeats`` interleaved rounds, with ``threads`` CPU threads."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    batch: int = Field(64, ge=2, le=4096)
    warmup: int = Field(3, ge=0, le=100)
    repeats: int = Field(15, ge=3, le=1000)
    threads: int = Field(1, ge=1, le=256)


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _timed(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds of one forward pass of ``model`` on ``x`` (the device synchronised before and after)."""
    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    model(x)
    if cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


def interleaved_ms(models: list[nn.Module], x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """The median milliseconds of one forward pass of each of ``models`` on ``x``, timed in
    ``repeats`` rounds that run every model once, in turn, after ``warmup`` untimed rounds."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for r in range(warmup + repeats):
            for i, model in enumerate(models):
                t = _timed(model, x)
                if r >= warmup:
                    times[i].append(t)
    return [1000 * statistics.median(t) for t in times]


def device_label(device: torch.device | str, threads: int) -> str:
    """Where a timing was made, as a row records it: the GPU's name, or the CPU and its threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {threads} thread{'s' * (threads > 1)}"


def compare(unpruned: nn.Module, pruned: nn.Module, input_shape: tuple[int, ...], settings: LatencySettings,
            device: torch.device | str = "cpu") -> dict:
    """The pruned network's measured time against the unpruned one's, interleaved, at batch 1 and at
    ``settings.batch``: ``latency_ms`` / ``latency_ms_before`` / ``latency_speedup`` (batch 1) and
    the same with ``_batch`` (larger batch), and ``latency_device``. ``input_shape``: one input's
    shape with its batch dimension (any size: it is replaced). The models are put in eval mode on
    ``device`` and left there."""
    models = [unpruned.to(device).eval(), pruned.to(device).eval()]
    out = {}
    with fixed_threads(settings.threads):
        for size, tag in ((1, ""), (settings.batch, "_batch")):
            x = torch.randn((size, *input_shape[1:]), device=device)
            before, after = interleaved_ms(models, x, settings.warmup, settings.repeats)
            out.update({f"latency_ms{tag}": after, f"latency_ms_before{tag}": before,
                        f"latency_speedup{tag}": before / after})
    out["latency_device"] = device_label(device, settings.threads)
    return out
