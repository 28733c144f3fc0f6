"""Build a zoo of trained networks, one Ray task per member (`make zoo`).

Each task trains a network from scratch, prunes it to the initial speed-up, finetunes it,
evaluates it, converts it to its graph and writes ``members/<id>.arrow`` (atomically) under the
output. Members already written are skipped, so killing the driver and running the same command
again resumes. A task that dies is retried (``--max-retries``); a member that fails for good is
written as a ``failed`` row with its error, and the run goes on.

    python pipelines/make_zoo.py                                  # the embedded digits zoo
    python pipelines/make_zoo.py --spec zoo/specs/cifar10.yaml --set dataset.root=/data/cifar10-jpeg
    RAY_ADDRESS=ray://head:10001 python pipelines/make_zoo.py --out s3://bucket/zoo   # a cluster

One MLflow run per build: the spec as params, counts/accuracy distribution/wall time as metrics,
the manifest, a table of all members and an accuracy histogram as artifacts. (One table rather
than a nested run per member: the members are rows to compare, and a run per member would mean
dozens of tiny runs and as many database writes.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.cli import run_cli  # noqa: E402
from distributed.fanout import fan_out  # noqa: E402
from distributed.locks import exclusive  # noqa: E402
from distributed.ray_env import check_fits, cluster_address, preflight, init_ray, ray, shutdown  # noqa: E402
from zoo.data import DatasetError  # noqa: E402
from zoo.integrity import inspect  # noqa: E402
from zoo.spec import DEFAULT_SPEC, MemberSpec, SpecError, load_spec, members, role_of  # noqa: E402
from zoo.store import Zoo, ZooFormatError, ZooRecord  # noqa: E402

FAULT_ENV = "METAPRUNE_FAULT_INJECT"  # testing hook: "crash-once:<index>:<marker dir>" / "error:<index>"


def _inject_fault(fault: str | None, member: MemberSpec) -> None:
    """Testing hook for the retry and failure paths (see tests/test_make_zoo.py)."""
    for item in (fault or "").split(","):
        parts = item.split(":")
        if len(parts) >= 2 and int(parts[1]) == member.index:
            if parts[0] == "crash-once":
                marker = Path(parts[2]) / f"crashed-{member.index}"
                if not marker.exists():
                    marker.touch()
                    os._exit(1)  # the worker process dies, as on OOM kill
            elif parts[0] == "error":
                raise RuntimeError(f"injected failure for member {member.index}")


def run_member(spec: dict, member: MemberSpec, data, out: str, fault: str | None, threads: int) -> dict:
    """One Ray task: build the member and write it; returns its summary."""
    import torch

    from zoo.build import build_member

    torch.set_num_threads(max(1, threads))
    _inject_fault(fault, member)
    record = build_member(spec, member, data)
    Zoo(out).write(member.id, [record], manifest=False)
    return {"id": record.id, "status": record.status, "error": record.error,
            "node": ray.get_runtime_context().get_node_id()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=DEFAULT_SPEC, help="zoo spec (YAML or TOML) (default: the digits zoo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. train.epochs=4 (default: none)")
    p.add_argument("--members", type=int, help="number of members (default: the spec's)")
    p.add_argument("--out", help="output directory or URI (default: the spec's 'output')")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--cpus-per-member", type=float, default=1, help="CPUs per member task (default: 1)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="give each member task a GPU (default: when the cluster has GPUs)")
    p.add_argument("--max-retries", type=int, default=2, help="retries of a task whose worker died (default: 2)")
    p.add_argument("--move-roles", action="store_true",
                   help="the spec's val/test fractions changed: move built members to their new roles (default: refuse)")
    p.add_argument("--shared-output", action="store_true",
                   help="on a cluster: the local output path is on storage every node shares (default: off)")
    p.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True,
                   help="log the build to MLflow (default: on)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = list(args.set)
    if args.members is not None:
        overrides.append(f"members={args.members}")
    if args.out is not None:
        overrides.append(f"output={args.out}")
    spec = load_spec(args.spec, overrides)  # validated before anything is read or written
    if not (args.cpus_per_member > 0 and args.max_retries >= 0):
        raise SystemExit(f"make_zoo: --cpus-per-member must be > 0 and --max-retries >= 0, not "
                         f"{args.cpus_per_member:g} and {args.max_retries}")
    out = spec["output"]
    if cluster_address(args.address) and "://" not in out and not args.shared_output:
        raise SystemExit(f"make_zoo: on a cluster, output {out!r} would be a path on each node: give a URI every "
                         "node can reach (s3://..., or a shared path with --shared-output)")
    flag = f"make_zoo: --cpus-per-member {args.cpus_per_member:g}"
    preflight(args.cpus_per_member, flag, args.address, args.num_cpus)  # before anything is written
    if args.mlflow:
        from distributed.tracking import check_server

        check_server()
    start = time.perf_counter()
    from zoo.data import load_from_config

    data = load_from_config(spec["dataset"])  # a missing dataset root fails here, before the output is touched
    plan = members(spec, data.in_channels, data.num_classes, data.image_size)
    with exclusive(out, "make_zoo") if "://" not in out else nullcontext():
        zoo = Zoo.create(out)
        zoo.skip_unreadable = True
        previous = _previous_spec(zoo, spec, args.move_roles)
        meta = zoo.metadata() if zoo.files() else None
        done = set(meta.query("status == 'ok'")["id"]) if meta is not None else set()
        done -= _damaged(zoo, plan, spec["name"])  # rebuilt: the manifest written at the end must not bless them
        for path, error in zoo.unreadable.items():
            print(f"zoo {spec['name']}: member file {path} is unreadable ({error}); it is rebuilt if the spec "
                  "has that member")
        moved = meta is not None and previous is not None and _split(previous) != _split(spec)
        if moved:
            _move_roles(zoo, meta, spec)
        todo = [m for m in plan if m.id not in done]
        zoo.write_spec(spec)
        print(f"zoo {spec['name']}: {len(plan)} members, {len(plan) - len(todo)} already built, {len(todo)} to build "
              f"-> {out}")
        summaries = []
        if todo:
            resources = init_ray(args.address, args.num_cpus)
            check_fits(args.cpus_per_member, 1 if args.gpu else 0, flag)
            print(f"ray: {resources.get('CPU', 0):.0f} CPUs, {resources.get('GPU', 0):.0f} GPUs "
                  f"on {len([n for n in ray.nodes() if n['Alive']])} node(s)")
            summaries = _run_tasks(spec, todo, data, out, args)
            nodes = {s["node"] for s in summaries if s.get("node")}
            print(f"tasks ran on {len(nodes)} node(s)")
            shutdown()
        manifest = zoo.write_manifest()
    wall = time.perf_counter() - start
    _print_summary(zoo, manifest, wall)
    if args.mlflow and (todo or moved):
        _log_mlflow(spec, zoo, manifest, wall, out)
    elif args.mlflow:
        print("mlflow: nothing built or moved, no new run")
    return {"manifest": manifest, "built": summaries, "seconds": wall, "failed": manifest["counts"]["failed"]}


def _damaged(zoo: Zoo, plan: list[MemberSpec], name: str) -> set[str]:
    """The planned members whose files are damaged (``zoo.integrity.inspect``): each is said and
    rebuilt. A damaged file that is no member of the plan is left out of the manifest, and said. A
    file that only lacks a manifest entry is an interrupted build's, kept."""
    planned = {m.id for m in plan}
    rebuild = set()
    damage, _ = inspect(zoo)
    for d in damage:
        if d.unlisted:
            continue
        stem = d.file.removesuffix(".arrow")
        if stem in planned:
            print(f"zoo {name}: member {stem}: members/{d.file}: {d.what}; it is rebuilt")
            rebuild.add(stem)
        else:
            print(f"zoo {name}: members/{d.file}: {d.what}; it is no member of this spec: left out of the manifest "
                  "(remove it)")
            zoo.exclude({f"{zoo.members_dir}/{d.file}": d.what})
    return rebuild


def _split(spec: dict) -> tuple:
    return float(spec.get("val_members", 0.0)), float(spec.get("test_members", 0.0)), bool(spec.get("held_out"))


SPLIT_KEYS = ("val_members", "test_members", "held_out")  # change roles only; --move-roles allows them


def _previous_spec(zoo: Zoo, spec: dict, move_roles: bool) -> dict | None:
    """The spec the zoo was built from (None for a new zoo). Refuses, naming the keys that differ,
    another spec (other than more or fewer members: its members would be mixed with these), and
    changed split fractions without ``--move-roles`` (members would change role)."""
    try:
        previous = zoo.spec()
    except FileNotFoundError:
        return None
    differ = sorted(k for k in set(previous) | set(spec) if k not in ("members", "output")
                    and previous.get(k) != spec.get(k))
    others = [k for k in differ if k not in SPLIT_KEYS]
    if others:
        raise SystemExit(f"make_zoo: {spec['output']} holds a zoo built from another spec (different "
                         f"{', '.join(others)}); give another --out")
    if differ and not move_roles:
        raise SystemExit(f"make_zoo: {spec['output']} was built with other {', '.join(differ)}: built members would "
                         "change role (train/val/test); pass --move-roles to move them, or give another --out")
    return previous


def _move_roles(zoo: Zoo, meta, spec: dict) -> None:
    """The spec's val/test fractions changed: every member takes the role its id gives under the
    new fractions (``zoo.spec.role_of``), and each move is printed."""
    val, test, held_out = _split(spec)
    roles = {i: role_of(i, val, test, held_out) for i in meta.id}
    moves = [(i, old, roles[i]) for i, old in zip(meta.id, meta.role) if roles[i] != old]
    zoo.set_roles(roles)
    print(f"zoo {spec['name']}: the spec's train/val/test fractions changed: {len(moves)} built member(s) move")
    for i, old, new in moves:
        print(f"  {i}: {old} -> {new}")


def _run_tasks(spec: dict, todo: list[MemberSpec], data, out: str, args) -> list[dict]:
    data_ref = ray.put(data)
    threads = max(1, int(args.cpus_per_member))
    use_gpu = args.gpu if args.gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    fault = os.environ.get(FAULT_ENV)
    summaries: list[dict] = []

    def done(member: MemberSpec, summary: dict) -> dict:
        summaries.append(summary)
        failed = sum(s["status"] != "ok" for s in summaries)
        return {"done": len(summaries) - failed, "failed": failed}

    def lost(member: MemberSpec, error: str) -> dict:  # the worker died on every retry: a failed member
        Zoo(out).write(member.id, [ZooRecord(member.id, member.arch, spec["dataset"]["name"], member.seed, None,
                                             status="failed", error=error, role=member.role)], manifest=False)
        return done(member, {"id": member.id, "status": "failed", "error": error})

    fan_out(run_member, [((spec, m, data_ref, out, fault, threads), m) for m in todo],
            options={"num_cpus": args.cpus_per_member, "num_gpus": 1 if use_gpu else 0,
                     "max_retries": args.max_retries, "retry_exceptions": False},
            desc="building zoo", unit="member", on_result=done, on_death=lost)
    return summaries


def _print_summary(zoo: Zoo, manifest: dict, wall: float) -> None:
    meta = zoo.metadata()
    ok = meta[meta.status == "ok"]
    c = manifest["counts"]
    print(f"\n{c['ok']} members ok, {c['failed']} failed, {wall:.0f} s")
    if len(ok):
        print(f"test accuracy: mean {ok.test_acc.mean():.3f}, min {ok.test_acc.min():.3f}, max {ok.test_acc.max():.3f}; "
              f"initial speed-up {ok.speedup.mean():.2f}x")
    for _, row in meta[meta.status != "ok"].iterrows():
        print(f"  failed {row.id}: {row.error}")


def _log_mlflow(spec: dict, zoo: Zoo, manifest: dict, wall: float, out: str) -> None:
    from distributed.tracking import log_run
    from metanet.plotting import pyplot

    meta = zoo.metadata()
    ok = meta[meta.status == "ok"]
    metrics = {"members_ok": manifest["counts"]["ok"], "members_failed": manifest["counts"]["failed"],
               "wall_seconds": wall}
    for col in ("train_acc", "val_acc", "test_acc"):
        if len(ok):
            metrics.update({f"{col}_mean": ok[col].mean(), f"{col}_min": ok[col].min(), f"{col}_max": ok[col].max()})
    figures = {}
    if len(ok):
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(100 * ok.test_acc, bins=min(20, max(5, len(ok))), color="tab:blue", alpha=0.8)
        ax.set_xlabel("test accuracy (%)")
        ax.set_ylabel("members")
        ax.set_title(f"zoo {spec['name']}: {len(ok)} members")
        fig.tight_layout()
        figures["accuracy_histogram.png"] = fig
    with tempfile.TemporaryDirectory() as tmp:  # the manifest as an artifact, wherever the zoo lives
        path = Path(tmp) / "manifest.json"
        path.write_text(json.dumps(manifest, indent=1))
        uri = log_run(f"zoo-{spec['name']}", out if "://" not in out else "runs", run_name=f"zoo-{spec['name']}",
                      params=spec, metrics=metrics, artifacts=[str(path)], figures=figures,
                      tables={"members.json": meta.drop(columns=["arch"])})
    for fig in figures.values():
        pyplot().close(fig)
    print(f"mlflow: run logged to {uri} (experiment zoo-{spec['name']})")


# the errors a user's input can cause: one line and exit code 2 (distributed.cli)
KNOWN_ERRORS = (SpecError, ZooFormatError, DatasetError)


def cli(argv=None) -> None:
    run_cli(main, "make_zoo", KNOWN_ERRORS, argv)


if __name__ == "__main__":
    cli()
