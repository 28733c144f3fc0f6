"""Starting or joining Ray so that a local run never leaves 127.0.0.1.

Local by default: a Ray instance inside this process with this machine's cores, its services on
loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray from advertising another address) and
no dashboard. With ``address`` (or ``RAY_ADDRESS``) it joins that existing cluster instead.
"""

from __future__ import annotations

import os
import socket

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402

# The environment of a Ray node this project starts (``local_head``, the tests' nodes): loopback
# only, and no drain on SIGTERM. Ray 2.60 drains a node for up to 30 s when ``ray start --block``
# gets SIGTERM, so that Serve proxies can quiesce; our nodes are stopped when their work is done.
# Jobs on such a node inherit its environment: no Ray Train preemption watcher (``train_env``).
NODE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def forget_stopped_cluster() -> None:
    """Removes Ray's note of the machine's "current" cluster (``<ray temp>/ray_current_cluster``,
    written by ``ray start``) when it names a loopback address nothing listens on any more. Ray's
    State API reads that note before anything else: Ray Train's placement-group cleaner then waits
    40 s for a dead head and delays the end of every training run by 12 s (measured)."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            host, _, port = f.read().strip().rpartition(":")
    except OSError:
        return
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        return  # another machine's cluster: not ours to judge
    with socket.socket() as sock:
        sock.settimeout(1)
        if sock.connect_ex((host, int(port))) == 0:
            return  # alive
    try:
        os.unlink(path)
    except OSError:
        pass


# Ray Train's controller polls its workers every 2 s by default, and a reported epoch waits for
# the poll: ``python bench/meta_train.py --polls 2 0.25 --epochs 6`` measured 27 -> 24 s of training
# on the demo's zoo (2 s epochs) and 25 -> 14 s on a zoo of tiny ResNet-8s (0.1 s was no faster
# than 0.25 s). Polling two workers 4 times a second costs nothing measurable.
TRAIN_HEALTH_CHECK_S = "0.25"


def train_env(local: bool) -> dict[str, str]:
    """Ray Train settings for a run (a user's own environment wins): the controller's poll
    interval; on a Ray started in this process also no preemption watcher (one actor process
    more, and an error-level log line at start, for a machine nobody will preempt)."""
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": TRAIN_HEALTH_CHECK_S}
    if local:
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return {k: os.environ.get(k, v) for k, v in env.items()}


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``RAY_ADDRESS``, else None (start a local one)."""
    return address or os.environ.get("RAY_ADDRESS") or None


CONNECT_TIMEOUT_S = 5.0  # how long a cluster or server address may take to answer before we say so


def check_reachable(address: str, what: str, hint: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """One line (``SystemExit``) when nothing answers at ``address`` (``host:port``, with or
    without a scheme) within ``timeout`` seconds: Ray retries a GCS connection for minutes, MLflow
    an HTTP request for as long, both silently."""
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        port = "443" if address.startswith("https://") else "80" if address.startswith("http://") else ""
        host = hostport
    if not port:
        raise SystemExit(f"{what} address {address!r}: expected host:port")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise SystemExit(f"{what} at {address} does not answer ({reason}, waited up to {timeout:g} s): {hint}") from None


def preflight(cpus: float, flag: str, address: str | None = None, num_cpus: int | None = None) -> None:
    """Before anything is written: the cluster to join answers (``check_reachable``), or the local
    Ray to start (``num_cpus`` or this machine's cores) can hold a task of ``cpus`` CPUs (``flag``
    names the setting that asked for them). A cluster's nodes are checked once joined (``check_fits``)."""
    if num_cpus is not None and num_cpus < 1:
        raise SystemExit(f"--num-cpus {num_cpus}: must be at least 1")
    joined = cluster_address(address)
    if joined and joined != "auto":
        check_reachable(joined, "Ray cluster", REACH_HINT)
    elif not joined and cpus > (num_cpus or os.cpu_count() or 1):
        raise SystemExit(f"{flag}: a task asks for {cpus:g} CPU(s), but the local Ray has "
                         f"{num_cpus or os.cpu_count()}: it could never run")


REACH_HINT = "start it (ray start --head), or unset RAY_ADDRESS / --address to run on a local Ray"


def check_fits(cpus: float, gpus: float, flag: str) -> None:
    """Refuses a task request no node of the running cluster can ever hold (Ray would queue the task
    forever): ``flag`` names the setting that asked for it."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    best_cpu = max((n.get("CPU", 0) for n in nodes), default=0)
    best_gpu = max((n.get("GPU", 0) for n in nodes), default=0)
    if cpus > best_cpu or gpus > best_gpu:
        raise SystemExit(f"{flag}: a task asks for {cpus:g} CPU(s) and {gpus:g} GPU(s), but the largest node of the "
                         f"cluster has {best_cpu:g} CPU(s) and {best_gpu:g} GPU(s): it could never run")


def check_total(cpus: float, gpus: float, flag: str) -> None:
    """Refuses a gang of tasks (Ray Train's workers) the whole cluster cannot hold at once: Ray
    Train would wait for the resources forever. ``flag`` names the setting that asked for them."""
    have = ray.cluster_resources()
    for kind, need in (("CPU", cpus), ("GPU", gpus)):
        if have.get(kind, 0) < need:
            raise SystemExit(f"{flag}: needs {need:g} {kind}(s) at once, the cluster has {have.get(kind, 0):g}")


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """Starts (or joins) Ray once per process; returns the cluster's resources. An address nothing
    answers at is one line after ``CONNECT_TIMEOUT_S``, not minutes of silent retries."""
    if not ray.is_initialized():
        address = cluster_address(address)
        if address:
            if address != "auto":
                check_reachable(address, "Ray cluster", REACH_HINT)
            ray.init(address=address, log_to_driver=True)
        else:
            forget_stopped_cluster()
            # address="local": a new instance even if another Ray runs (or ran) on this machine
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus,
                     include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    return ray.cluster_resources()


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
