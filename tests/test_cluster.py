"""A two-node Ray cluster on this machine (a head and a second `ray start --address` node, each
with one CPU, both on 127.0.0.1): `make_zoo` and `prune_batch` run tasks on both nodes, with the
zoo on a path both see. The nodes are stopped by the process groups this test started."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from distributed.ray_env import NODE_ENV

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# Ray 2.60's `ray start` turns on token authentication: every node and driver sends ~/.ray/auth_token
ENV = {**os.environ, **NODE_ENV, "RAY_AUTH_MODE": "token"}
ENV.pop("RAY_ADDRESS", None)
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(*args: str, log: Path, join: bool = False) -> subprocess.Popen:
    """``ray start --block`` in its own session (its process group holds every service it starts);
    every port not fixed here is free, so it never meets another Ray on the machine. A joining node
    runs through ``distributed.join_node``: Ray's ``ray start`` with the two changes that let it
    join a head on 127.0.0.1 (see there)."""
    start = [sys.executable, "-m", "distributed.join_node"] if join else [RAY, "start"]
    cmd = [*start, "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats",
           f"--dashboard-agent-listen-port={_port()}", f"--dashboard-agent-grpc-port={_port()}",
           f"--metrics-export-port={_port()}", f"--runtime-env-agent-port={_port()}", *args]
    return subprocess.Popen(cmd, env=ENV, cwd=ROOT, start_new_session=True, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def _wait_for_nodes(address: str, n: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    if any(p.poll() is not None for p in procs):
        raise AssertionError("a Ray node exited at start; see head.log / worker.log")
    probe = ("import ray, time, sys\n"
             f"ray.init(address='{address}', log_to_driver=False)\n"
             f"deadline = time.time() + {timeout}\n"
             f"while len([x for x in ray.nodes() if x['Alive']]) < {n} and time.time() < deadline:\n"
             "    time.sleep(1)\n"
             f"sys.exit(0 if len([x for x in ray.nodes() if x['Alive']]) >= {n} else 1)\n")
    out = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=timeout + 60)
    assert out.returncode == 0, f"the cluster did not reach {n} nodes: {out.stderr[-2000:]}"


def _stop(procs: list[subprocess.Popen], tmp_path: Path) -> None:
    """Each node's process group: SIGTERM, then SIGKILL, until none of it is left (local_head.stop)."""
    from distributed import local_head

    for i, p in enumerate(procs):
        pidfile = tmp_path / f"node{i}.pid"
        pidfile.write_text(str(p.pid))
        local_head.stop(str(pidfile))
        p.wait(timeout=30)


@pytest.mark.timeout(1200)
def test_make_zoo_and_prune_batch_use_both_nodes(tmp_path):
    port = _port()
    address = f"127.0.0.1:{port}"
    head = _node("--head", f"--port={port}", "--include-dashboard=false", log=tmp_path / "head.log")
    procs = [head]
    try:
        time.sleep(3)
        procs.append(_node(f"--address={address}", log=tmp_path / "worker.log", join=True))
        _wait_for_nodes(address, 2, procs)
        spec = yaml.safe_load((ROOT / "zoo/specs/digits.yaml").read_text())
        spec.update(members=2, output=str(tmp_path / "zoo"), val_members=0.0, test_members=0.0)
        spec["families"] = [{"family": "resnet", "depths": [8], "stage_widths": [[4], [6], [8]]}]
        spec["train"]["epochs"], spec["finetune"]["epochs"] = 2, 1
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        zoo = subprocess.run([sys.executable, str(ROOT / "pipelines/make_zoo.py"), "--spec", str(tmp_path / "spec.yaml"),
                              "--address", address, "--shared-output", "--no-mlflow"],
                             env=ENV, capture_output=True, text=True, timeout=600)
        assert zoo.returncode == 0, (zoo.stdout + zoo.stderr)[-3000:]
        assert "on 2 node(s)" in zoo.stdout and "tasks ran on 2 node(s)" in zoo.stdout
        assert "2 members ok, 0 failed" in zoo.stdout
        pruned = subprocess.run([sys.executable, str(ROOT / "pipelines/prune_batch.py"), "--zoo", str(tmp_path / "zoo"),
                                 "--split", "train", "--methods", "none", "--targets", "1.5", "--before-steps", "2",
                                 "--after-steps", "2", "--address", address, "--out", str(tmp_path / "pruned"),
                                 "--no-mlflow"], env=ENV, capture_output=True, text=True, timeout=600)
        assert pruned.returncode == 0, (pruned.stdout + pruned.stderr)[-3000:]
        rows = pd.read_parquet(tmp_path / "pruned/results.parquet")
        assert (rows.status == "ok").all() and len(rows) == 2 and rows.node.nunique() == 2
        assert "tasks ran on 2 node(s)" in pruned.stdout
    finally:
        _stop(procs, tmp_path)
    for p in procs:
        with pytest.raises(ProcessLookupError):
            os.killpg(p.pid, 0)  # each node and everything it started are gone
