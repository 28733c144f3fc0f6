"""``ray start --address 127.0.0.1:PORT`` for a second node on this machine, kept on 127.0.0.1.

    python -m distributed.join_node --address=127.0.0.1:6379 --num-cpus=1 --block [other ray start flags]

Two things in Ray 2.60 stop a second node from joining a head on 127.0.0.1: ``ray start --address``
rewrites a loopback address to the machine's public IP before connecting (ray-project/ray#59110,
open; the head listens only on 127.0.0.1, so the node never reaches it), and
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (set for every local start here, to keep Ray on loopback)
also refuses to join another node. This runs Ray's own ``ray start`` with those two decisions
changed and nothing else: the address stays as given and the node may join;
``--node-ip-address=127.0.0.1`` is added unless given. Used by tests/test_cluster.py.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import ray._private.ray_constants as ray_constants
    import ray._private.services as services
    from ray.scripts.scripts import main as ray_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("--address") for a in argv):
        raise SystemExit("join_node: --address=HOST:PORT of the head is required")
    if not any(a.startswith("--node-ip-address") for a in argv):
        argv.append("--node-ip-address=127.0.0.1")
    ray_constants.ENABLE_RAY_CLUSTER = True  # this node may join another
    resolve = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host if host in ("127.0.0.1", "localhost") else resolve(host)
    sys.argv = ["ray", "start", *argv]
    ray_cli()


if __name__ == "__main__":
    main()
