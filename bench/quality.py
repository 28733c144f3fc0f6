"""Does the metanetwork beat the baselines? Accuracy against MAC speed-up, honestly selected.

1. The zoo that ``make zoo`` builds (``--zoo``): its ``train`` members meta-train the metanetwork,
   its ``val`` members select the checkpoint, its held-out ``test`` members are pruned. (``--smoke``
   builds a small digits zoo with ``pipelines/make_zoo.py`` first.)
2. Meta-train on the training members; every ``select_every`` epochs score the checkpoint on the
   validation members (metanetwork -> finetune -> prune -> finetune -> validation accuracy) and
   keep the best. The test split is never looked at for this.
3. Each held-out network is pruned to each target speed-up with the method (``meta``) and the
   baselines (``none``: no metanetwork; ``depgraph``: sparse learning), the same finetuning budget
   for all, over several seeds.
4. A table (test accuracy mean +- std) and a plot of accuracy against speed-up, right after
   pruning (no finetuning: the paper's diagnostic) and after finetuning.

    make zoo ZOO_ARGS="--spec zoo/specs/cifar10.yaml --set dataset.root=DIR/cifar10-jpeg"
    python bench/quality.py --zoo runs/zoo-cifar10                         # about 25 minutes
    python bench/quality.py --zoo runs/zoo-cifar10 --config runs/tune-cifar10/best_config.yaml
    python bench/quality.py --smoke                                        # digits, a few minutes
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metanet.meta_training import MetaTrainConfig, make_member, meta_train, snapshot  # noqa: E402
from metanet.metanetwork import MetaNetConfig, MetaNetwork  # noqa: E402
from metanet.recipe import METHODS, RecipeConfig, prune_with_method, recipe_from_settings, selection_score  # noqa: E402
from zoo.arch import build_model  # noqa: E402
from zoo.data import TaskData  # noqa: E402
from zoo.store import Zoo  # noqa: E402


# ------------------------------------------------------------------------------ settings
# Names as in pipelines/meta_train.py and pipelines/prune_batch.py, so a Tune best_config.yaml applies.
def settings(smoke: bool) -> dict:
    if smoke:
        return dict(seeds=2, targets=[2.0, 4.0], select_members=1, select_every=1, select_target=2.0, epochs=3,
                    lr=1e-3, reg=3e-3, alpha=16.0, residual=0.02, hidden=16, layers=2, batches_per_step=2,
                    batch_size=256, weight_decay=5e-4, before_epochs=1, before_lr=0.01, after_epochs=1,
                    after_lr=0.01)
    return dict(seeds=3, targets=[2.0, 4.0, 8.0], select_members=2, select_every=3, select_target=4.0, epochs=12,
                lr=1e-3, reg=3e-3, alpha=16.0, residual=0.02, hidden=32, layers=4, batches_per_step=4,
                batch_size=256, weight_decay=5e-4, before_epochs=2, before_lr=0.01, after_epochs=2, after_lr=0.01)


def apply_config(s: dict, path: str) -> None:
    """Takes the meta_train and prune_batch sections of a config file (a Tune best_config.yaml)."""
    with open(path) as f:
        loaded = yaml.safe_load(f) or {}
    for section in ("meta_train", "prune_batch"):
        for key, value in (loaded.get(section) or {}).items():
            if key in s and key != "targets":  # the benchmark keeps its own targets
                s[key] = value


# ------------------------------------------------------------------------- worker plumbing
_DATA: TaskData | None = None


def _init(data: TaskData) -> None:
    global _DATA
    torch.set_num_threads(1)
    _DATA = data


def prune_job(arch: dict, state: dict, method: str, cfg: RecipeConfig, metanet_state: dict | None,
              metanet_cfg: dict | None) -> dict:
    model = build_model(arch)
    model.load_state_dict(state)
    metanet = None
    if metanet_state is not None:
        metanet = MetaNetwork(MetaNetConfig(**metanet_cfg))
        metanet.load_state_dict(metanet_state)
    torch.manual_seed(cfg.before.seed)
    _, record = prune_with_method(model.eval(), _DATA, method, cfg, metanet)
    return record


def _pool(workers: int, data: TaskData):
    return cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init, initargs=(data,))


def smoke_zoo(out: Path) -> str:
    """A small digits zoo (8 members: 4 train, 2 val, 2 test), built by make_zoo.py."""
    zoo = out / "zoo"
    cmd = [sys.executable, str(ROOT / "pipelines/make_zoo.py"), "--out", str(zoo), "--members", "8", "--no-mlflow",
           "--set", "val_members=0.25", "--set", "test_members=0.25", "--set", "train.epochs=6",
           "--set", "finetune.epochs=1"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"quality: building the smoke zoo failed:\n{result.stderr[-2000:]}")
    return str(zoo)


# ------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", help="a zoo built by make zoo (with train, val and test members)")
    parser.add_argument("--data-root", help="the dataset folder, if not where the zoo was built from")
    parser.add_argument("--smoke", action="store_true", help="build a small digits zoo and run a tiny budget")
    parser.add_argument("--config", help="a config file (Tune's best_config.yaml): its meta_train and prune_batch "
                        "settings replace the defaults")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set residual=0.1 --set epochs=40")
    args = parser.parse_args()
    s = settings(args.smoke)
    if args.config:
        if not os.path.exists(args.config):
            raise SystemExit(f"--config: file not found: {args.config}")
        apply_config(s, args.config)
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in s:
            raise SystemExit(f"--set: unknown setting {key!r}; known: {', '.join(sorted(s))}")
        s[key] = yaml.safe_load(value)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.zoo and not args.smoke:
        raise SystemExit("--zoo PATH is required (a zoo built by make zoo); or --smoke for digits")
    zoo = Zoo(args.zoo or smoke_zoo(out))
    data = zoo.dataset(args.data_root)
    finetune = zoo.finetune_settings()
    records = [r for r in zoo if r.status == "ok"]
    by_role = {role: [r for r in records if r.role == role] for role in ("train", "val", "test")}
    missing = [role for role, rs in by_role.items() if not rs]
    if missing:
        raise SystemExit(f"{zoo.root}: no members with role(s) {missing}: build it with val_members and test_members")
    print(f"data: {data.name}, train {len(data.train[1])}, val {len(data.val[1])}, test {len(data.test[1])}; zoo "
          f"{zoo.root}: {len(by_role['train'])} train, {len(by_role['val'])} val, {len(by_role['test'])} held-out "
          f"members (val acc {statistics.mean(r.metrics['val_acc'] for r in records):.3f} mean)")
    _init(data)
    torch.set_num_threads(max(1, args.workers))

    # 1. meta-training with checkpoint selection on validation members
    meta_cfg = MetaTrainConfig(epochs=s["epochs"], batches_per_step=s["batches_per_step"], lr=s["lr"], reg=s["reg"],
                               alpha=s["alpha"], batch_size=s["batch_size"], weight_decay=s["weight_decay"],
                               milestones=(int(s["epochs"] * 0.75),))
    members = [make_member(r.id, r.arch, r.graph, meta_cfg) for r in by_role["train"]]
    val_models = [r.network() for r in by_role["val"][:s["select_members"]]]
    net_cfg = MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=s["hidden"], layers=s["layers"],
                            residual=s["residual"])
    metanet = MetaNetwork(net_cfg)
    select_cfg = recipe_from_settings(s, **finetune, target=s["select_target"])
    select_cfg.before.epochs = select_cfg.after.epochs = 1
    scores: list[tuple[int, float]] = [(-1, selection_score(metanet, val_models, data, select_cfg))]
    best = (scores[0][1], -1, snapshot(metanet))
    print(f"selection score before meta-training (val acc after finetune, prune to {s['select_target']}x, "
          f"finetune): {scores[0][1]:.3f}")

    def on_epoch(epoch, metrics, net):
        nonlocal best
        print(f"  epoch {epoch}: task {metrics['task_loss']:.3f} sparsity {metrics['sparsity_loss']:.3f} "
              f"({metrics['seconds']:.0f} s)")
        if (epoch + 1) % s["select_every"] == 0 or epoch == meta_cfg.epochs - 1:
            score = selection_score(net, val_models, data, select_cfg)
            scores.append((epoch, score))
            print(f"  epoch {epoch}: selection score {score:.3f}")
            if score > best[0]:
                best = (score, epoch, snapshot(net))

    history = meta_train(metanet, members, data, meta_cfg, on_epoch=on_epoch)
    print(f"chosen checkpoint: epoch {best[1]} (validation score {best[0]:.3f}); "
          f"{time.perf_counter() - t0:.0f} s so far")

    # 2. prune the held-out networks with every method
    from tqdm import tqdm

    jobs = []
    for h, member in enumerate(by_role["test"]):
        state = member.network().state_dict()
        for target in s["targets"]:
            for seed in range(s["seeds"]):
                cfg = recipe_from_settings(s, **finetune, seed=seed, target=target)
                for method in METHODS:
                    meta_state = best[2] if method == "meta" else None
                    jobs.append(((h, seed), (member.arch, state, method, cfg, meta_state, net_cfg.to_dict())))
    results = []
    with _pool(args.workers, data) as pool:
        futures = {pool.submit(prune_job, *a): key for key, a in jobs}
        for f in tqdm(cf.as_completed(futures), total=len(futures), desc="pruning held-out networks"):
            h, seed = futures[f]
            results.append(dict(f.result(), network=h, seed=seed))
    total = time.perf_counter() - t0
    report(results, s, scores, best, history, out, total, data.name)


def _ms(values) -> str:
    values = [100 * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} +- {sd:4.2f}"


def report(records, s, scores, best, history, out: Path, total: float, dataset: str) -> None:
    print(f"\n{dataset}: held-out networks x {s['seeds']} seeds; finetuning budget {s['before_epochs']}+"
          f"{s['after_epochs']} epochs "
          "for every method; accuracy in %, test split (selection used the validation split only)")
    head = f"{'method':<10}{'target':>7}{'reached':>9}{'pruned, no ft (test)':>23}{'final (test)':>17}{'final (val)':>17}{'time s':>8}"
    print(head)
    print("-" * len(head))
    for target in s["targets"]:
        for method in METHODS:
            rs = [r for r in records if r["method"] == method and r["target"] == target]
            if not rs:
                continue
            print(f"{method:<10}{target:>7.1f}{statistics.mean(r['speedup'] for r in rs):>9.2f}"
                  f"{_ms([r['test_acc_pruned'] for r in rs]):>23}{_ms([r['test_acc'] for r in rs]):>17}"
                  f"{_ms([r['val_acc'] for r in rs]):>17}{statistics.mean(r['seconds'] for r in rs):>8.0f}")
    print(f"\nmetanetwork checkpoint chosen on validation members: epoch {best[1]} (score {best[0]:.3f}); "
          f"scores by epoch: {[(e, round(v, 3)) for e, v in scores]}")
    print(f"total wall time {total / 60:.1f} min")
    (out / "results.json").write_text(json.dumps({"records": records, "settings": s, "selection": scores,
                                                  "chosen_epoch": best[1], "meta_history": history}, indent=1))
    plot(records, s, out / "quality.png", dataset)
    print(f"wrote {out / 'results.json'} and {out / 'quality.png'}")


def plot(records, s, path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, key, title in ((axes[0], "test_acc_pruned", "right after pruning (no finetuning)"),
                           (axes[1], "test_acc", "after finetuning")):
        for method, marker in zip(METHODS, "os^"):
            xs, ys, es = [], [], []
            for target in s["targets"]:
                rs = [r for r in records if r["method"] == method and r["target"] == target]
                if rs:
                    xs.append(statistics.mean(r["speedup"] for r in rs))
                    vals = [100 * r[key] for r in rs]
                    ys.append(statistics.mean(vals))
                    es.append(statistics.stdev(vals) if len(vals) > 1 else 0)
            ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("MAC speed-up")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{dataset}: metanetwork (meta) vs no metanetwork (none) vs sparse learning (depgraph)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
