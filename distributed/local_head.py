"""Start and stop a local Ray head on 127.0.0.1, by the process group it started.

    python -m distributed.local_head start --pidfile runs/ray-head.pid [--num-cpus 2]
    python -m distributed.local_head stop --pidfile runs/ray-head.pid

``ray start --head --block`` runs in a new session whose process group holds every Ray service it
spawns; ``stop`` signals that group only, so other Ray instances on the machine are left alone
(``ray stop`` would stop them all). The dashboard (and the job server ``ray job submit`` talks
to) listens on 127.0.0.1, with Ray's token authentication: clients such as ``ray job submit``
need ``RAY_AUTH_MODE=token`` to send the token in ``~/.ray/auth_token``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# before Ray is imported (it reads this once): the job client sends the token in ~/.ray/auth_token
os.environ.setdefault("RAY_AUTH_MODE", "token")

from distributed.ray_env import NODE_ENV, forget_stopped_cluster  # noqa: E402


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def start(pidfile: str, num_cpus: int | None, port: int, dashboard_port: int, timeout: float = 120) -> str:
    env = {**os.environ, **NODE_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # jobs run this venv's python
    # the job agent's HTTP port is fixed (52365) unless given: a second Ray on the machine (a
    # make_zoo build, say) holds it, and this head's agent then never starts ("No available agent")
    cmd = [_ray_bin(), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
           f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    Path(pidfile).parent.mkdir(parents=True, exist_ok=True)
    log = open(f"{pidfile}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    Path(pidfile).write_text(str(proc.pid))
    url = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ray head exited with code {proc.returncode}; see {pidfile}.log")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                break
        except urllib.error.HTTPError:  # answering (Ray's token auth says 401): it is up
            break
        except OSError:
            time.sleep(1)
    else:
        stop(pidfile)
        raise SystemExit(f"ray head did not come up within {timeout:.0f} s; see {pidfile}.log")
    if not _jobs_accepted(url, deadline):
        stop(pidfile)
        raise SystemExit(f"ray head's job agent did not come up within {timeout:.0f} s; see {pidfile}.log")
    return url


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _jobs_accepted(url: str, deadline: float) -> bool:
    """Waits until the head runs a job: the dashboard answers before the node's job agent is up,
    and a job submitted then fails with "No available agent to submit job" (seen on a loaded
    2-core machine). Submits a no-op job until one succeeds."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    while time.time() < deadline:
        try:
            client = JobSubmissionClient(url)
            job = client.submit_job(entrypoint="python -c pass")
        except (RuntimeError, ConnectionError):  # no agent yet
            time.sleep(1)
            continue
        while time.time() < deadline:
            status = client.get_job_status(job)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return status == JobStatus.SUCCEEDED
            time.sleep(0.5)
    return False


def stop(pidfile: str, timeout: float = 30) -> None:
    path = Path(pidfile)
    if not path.exists():
        return
    pgid = int(path.read_text())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + timeout
        while time.time() < deadline:
            _reap(pgid)
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            continue
        break
    path.unlink(missing_ok=True)
    forget_stopped_cluster()  # as ``ray stop`` does


def _reap(pid: int) -> None:
    """Collects the exit status of the group's leader when this process started it (a test's
    ``Popen``): a dead child that nobody waited for is a zombie, and a zombie keeps its process
    group "alive" to ``killpg(pgid, 0)`` until the timeout."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: init reaps it
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--pidfile", default="runs/ray-head.pid")
    p.add_argument("--num-cpus", type=int)
    p.add_argument("--port", type=int, default=6390)
    p.add_argument("--dashboard-port", type=int, default=8265)
    a = p.parse_args()
    if a.action == "start":
        print(start(a.pidfile, a.num_cpus, a.port, a.dashboard_port))
    else:
        stop(a.pidfile)


if __name__ == "__main__":
    main()
