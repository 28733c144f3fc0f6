"""Starting or joining Ray so that a local run never leaves 127.0.0.1.

Local by default: a Ray instance inside this process with this machine's cores, its services on
loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray from advertising another address) and
no dashboard. With ``address`` (or ``RAY_ADDRESS``) it joins that existing cluster instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``RAY_ADDRESS``, else None (start a local one)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """Starts (or joins) Ray once per process; returns the cluster's resources."""
    if not ray.is_initialized():
        address = cluster_address(address)
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # address="local": a new instance even if another Ray runs (or ran) on this machine
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus,
                     include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    return ray.cluster_resources()


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
