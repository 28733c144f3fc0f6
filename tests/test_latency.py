"""Measured speed (metanet/latency.py): paired, interleaved medians that order models by their real
cost, threads fixed and given back, bad settings refused."""

import time

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from metanet.latency import LatencySettings, compare, fixed_threads, interleaved_ms
from zoo.batch.latency import LATENCY_LIMITS


class Sleeper(nn.Module):
    """A forward pass that costs ``ms`` milliseconds, whatever the input."""

    def __init__(self, ms: float):
        super().__init__()
        self.ms = ms
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        time.sleep(self.ms / 1000)
        return x * self.scale


def test_interleaved_medians_measure_each_models_own_cost():
    slow, fast = interleaved_ms([Sleeper(6.0), Sleeper(1.5)], torch.zeros(1, 3), warmup=1, repeats=5)
    assert 6.0 <= slow < 30 and 1.5 <= fast < slow  # a swap of models or rounds would break the order


def test_compare_gives_the_pruned_networks_speed_up_at_both_batches():
    timed = compare(Sleeper(8.0), Sleeper(2.0), (1, 3), LatencySettings(batch=4, warmup=1, repeats=5))
    assert 2.0 < timed["latency_speedup"] < 4.5 and 2.0 < timed["latency_speedup_batch"] < 4.5
    assert timed["latency_ms_before"] > timed["latency_ms"] >= 2.0
    assert timed["latency_device"].startswith("cpu: ") and timed["latency_device"].endswith("1 thread")


def test_a_wider_convolution_takes_longer():
    """Real layers, not sleeps: a network with 4x the channels costs more per forward pass."""
    torch.manual_seed(0)

    def net(width):
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))

    timed = compare(net(128), net(32), (1, 3, 32, 32), LatencySettings(batch=8, warmup=2, repeats=5))
    assert timed["latency_speedup"] > 1.5 and timed["latency_speedup_batch"] > 1.5


def test_threads_are_fixed_while_timing_and_given_back():
    before = torch.get_num_threads()
    with fixed_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("field, value", [("batch", 1), ("repeats", 2), ("threads", 0), ("warmup", -1)])
def test_bad_settings_are_refused_and_the_flags_share_the_bounds(field, value):
    with pytest.raises(ValidationError, match=field):
        LatencySettings(**{field: value})
    bounds = LATENCY_LIMITS[f"latency_{field}"]
    assert bounds["ge"] > value  # prune_batch refuses the same value before it prunes anything
