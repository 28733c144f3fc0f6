"""Does the metanetwork beat the baselines? Accuracy against MAC speed-up, honestly selected.

1. A small zoo: narrow ResNet-20-style and VGG-style networks of varied widths, each trained,
   pruned to about 1.3x and finetuned. Its members are split into meta-training members and
   validation members.
2. Meta-train the metanetwork on the training members; every ``--select-every`` epochs score the
   checkpoint on the validation members (metanetwork -> finetune -> prune -> validation accuracy)
   and keep the best. The test split is never looked at for this.
3. Held-out networks (not in the zoo), trained the same way, are pruned to each target speed-up
   with the method (``meta``) and the baselines (``none``: no metanetwork; ``depgraph``: sparse
   learning), the same finetuning budget for all, over several seeds.
4. A table (test accuracy mean +- std) and a plot of accuracy against speed-up, right after
   pruning (no finetuning: the paper's diagnostic) and after finetuning.

    python bench/quality.py --data ../shared/data/cifar10-jpeg.tar.gz   # CIFAR-10, about an hour
    python bench/quality.py --smoke                                     # digits, a few minutes
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metanet.graph import network_to_graph  # noqa: E402
from metanet.meta_training import MetaTrainConfig, make_member, meta_train, snapshot  # noqa: E402
from metanet.metanetwork import MetaNetConfig, MetaNetwork, edge_widths_of  # noqa: E402
from metanet.prune import prune_to_speedup  # noqa: E402
from metanet.recipe import METHODS, RecipeConfig, prune_with_method, selection_score  # noqa: E402
from zoo.arch import arch_spec, build_model, resnet_spec, vgg_spec  # noqa: E402
from zoo.data import TaskData, load_dataset  # noqa: E402
from zoo.train import TrainConfig, evaluate, train  # noqa: E402


# ------------------------------------------------------------------------------ settings
def settings(smoke: bool) -> dict:
    if smoke:
        return dict(zoo=4, val_members=1, held_out=1, seeds=2, targets=(2.0, 4.0), train_epochs=6, zoo_ft=1,
                    meta_epochs=3, select_every=1, before=1, after=1, hidden=16, layers=2, residual=0.02,
                    batches_per_step=2, meta_lr=1e-3, reg=0.1, select_target=2.0)
    return dict(zoo=10, val_members=2, held_out=2, seeds=3, targets=(2.0, 4.0, 8.0), train_epochs=12, zoo_ft=2,
                meta_epochs=12, select_every=3, before=2, after=2, hidden=32, layers=4, residual=0.02,
                batches_per_step=4, meta_lr=1e-3, reg=0.1, select_target=4.0)


def random_spec(rng: random.Random, data: TaskData) -> dict:
    base = dict(in_channels=data.in_channels, num_classes=data.num_classes)
    if rng.random() < 0.6:
        w = rng.choice([6, 8, 10, 12])
        return resnet_spec(20, (w, 2 * w, 4 * w), **base)
    return vgg_spec(11, width_mult=rng.choice([0.125, 0.1875, 0.25]), input_size=data.image_size, **base)


# ------------------------------------------------------------------------- worker plumbing
_DATA: TaskData | None = None


def _init(data: TaskData) -> None:
    global _DATA
    torch.set_num_threads(1)
    _DATA = data


def train_member(spec: dict, seed: int, epochs: int, ft: int) -> dict:
    """Train from scratch, prune to 1.3x, finetune: one zoo network (or a held-out one)."""
    data = _DATA
    torch.manual_seed(seed)
    model = build_model(spec)
    start = time.perf_counter()
    train(model, data, TrainConfig(epochs=epochs, lr=0.05, schedule="cosine", seed=seed))
    prune_to_speedup(model, torch.zeros(data.input_shape), 1.3)
    train(model, data, TrainConfig(epochs=ft, lr=0.01, schedule="cosine", seed=seed))
    val_acc, _ = evaluate(model, data, "val")
    return {"arch": arch_spec(model), "state": {k: v.clone() for k, v in model.state_dict().items()},
            "val_acc": val_acc, "seconds": time.perf_counter() - start, "seed": seed}


def prune_job(member: dict, method: str, cfg: RecipeConfig, metanet_state: dict | None, metanet_cfg: dict | None) -> dict:
    data = _DATA
    model = build_model(member["arch"])
    model.load_state_dict(member["state"])
    metanet = None
    if metanet_state is not None:
        metanet = MetaNetwork(MetaNetConfig(**metanet_cfg))
        metanet.load_state_dict(metanet_state)
    torch.manual_seed(cfg.before.seed)
    _, record = prune_with_method(model, data, method, cfg, metanet)
    return record


def _pool(workers: int, data: TaskData):
    return cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init, initargs=(data,))


# ----------------------------------------------------------------------------------- data
def load(args) -> TaskData:
    if args.smoke:
        return load_dataset("digits")
    if not args.data:
        raise SystemExit("--data PATH is required (the CIFAR-10 JPEG archive or its extracted folder); "
                         "or --smoke for digits")
    root = Path(args.data)
    if not root.exists():
        raise SystemExit(f"--data: {root} does not exist")
    if root.is_file():
        target = Path(args.out) / "data"
        folder = target / "cifar10-jpeg"
        if not folder.exists():
            print(f"extracting {root} to {target} ...")
            target.mkdir(parents=True, exist_ok=True)
            with tarfile.open(root) as tar:
                tar.extractall(target, filter="data")
        root = folder
    return load_dataset("imagefolder", str(root), size=16, train_subset=args.train_subset,
                        test_subset=args.test_subset, seed=0)


# ------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="CIFAR-10 JPEG archive (.tar.gz) or its extracted folder")
    parser.add_argument("--smoke", action="store_true", help="digits, tiny budget: a few minutes")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set residual=0.1 --set meta_epochs=40")
    args = parser.parse_args()
    s = settings(args.smoke)
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in s:
            raise SystemExit(f"--set: unknown setting {key!r}; known: {', '.join(sorted(s))}")
        s[key] = type(s[key])(json.loads(value)) if not isinstance(s[key], tuple) else tuple(json.loads(value))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = load(args)
    print(f"data: {data.name}, train {len(data.train[1])}, val {len(data.val[1])}, test {len(data.test[1])}, "
          f"input {data.input_shape}")
    rng = random.Random(0)
    specs = [random_spec(rng, data) for _ in range(s["zoo"] + s["held_out"])]

    # 1. the zoo and the held-out networks
    from tqdm import tqdm

    cache = out / "trained-networks.pt"  # the zoo and held-out networks, reused while the recipe is tuned
    cache_key = json.dumps([specs, s["train_epochs"], s["zoo_ft"], data.name, len(data.train[1])])
    trained = None
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == cache_key:
            trained = saved["trained"]
            print(f"reusing {len(trained)} trained networks from {cache}")
    if trained is None:
        with _pool(args.workers, data) as pool:
            futures = [pool.submit(train_member, spec, 100 + i, s["train_epochs"], s["zoo_ft"])
                       for i, spec in enumerate(specs)]
            for _ in tqdm(cf.as_completed(futures), total=len(futures), desc="training zoo and held-out networks"):
                pass
            trained = [f.result() for f in futures]
        torch.save({"key": cache_key, "trained": trained}, str(cache) + ".tmp")
        os.replace(str(cache) + ".tmp", cache)
    zoo, held_out = trained[:s["zoo"]], trained[s["zoo"]:]
    print(f"zoo: {len(zoo)} networks, val acc {statistics.mean(m['val_acc'] for m in zoo):.3f} mean; "
          f"{time.perf_counter() - t0:.0f} s so far")
    _init(data)
    torch.set_num_threads(max(1, args.workers))

    # 2. meta-training with checkpoint selection on validation members
    meta_cfg = MetaTrainConfig(epochs=s["meta_epochs"], batches_per_step=s["batches_per_step"], lr=s["meta_lr"],
                               reg=s["reg"], milestones=(int(s["meta_epochs"] * 0.75),))
    graphs, models = [], []
    for m in zoo:
        model = build_model(m["arch"])
        model.load_state_dict(m["state"])
        models.append(model.eval())
        graphs.append(network_to_graph(model, torch.zeros(data.input_shape)))
    n_val = s["val_members"]
    members = [make_member(f"zoo-{i}", zoo[i]["arch"], graphs[i], meta_cfg) for i in range(n_val, len(zoo))]
    val_models = models[:n_val]
    net_cfg = MetaNetConfig(edge_widths=edge_widths_of(graphs), hidden=s["hidden"], layers=s["layers"],
                            residual=s["residual"])
    metanet = MetaNetwork(net_cfg)
    select_cfg = RecipeConfig(target=s["select_target"], before=TrainConfig(epochs=1, lr=0.01, schedule="constant"),
                              after=TrainConfig(epochs=1, lr=0.01, schedule="constant"))
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

    # 3. prune held-out networks with every method
    jobs = []
    for h, member in enumerate(held_out):
        for target in s["targets"]:
            for seed in range(s["seeds"]):
                cfg = RecipeConfig(target=target,
                                   before=TrainConfig(epochs=s["before"], lr=0.01, schedule="constant", seed=seed),
                                   after=TrainConfig(epochs=s["after"], lr=0.01, schedule="cosine", seed=seed))
                for method in METHODS:
                    state = best[2] if method == "meta" else None
                    jobs.append(((h, target, seed, method), (member, method, cfg, state, net_cfg.to_dict())))
    records = []
    with _pool(args.workers, data) as pool:
        futures = {pool.submit(prune_job, *a): key for key, a in jobs}
        for f in tqdm(cf.as_completed(futures), total=len(futures), desc="pruning held-out networks"):
            h, target, seed, method = futures[f]
            rec = f.result()
            rec.update(network=h, seed=seed)
            records.append(rec)
    total = time.perf_counter() - t0
    report(records, s, scores, best, history, out, total, data.name)


def _ms(values) -> str:
    values = [100 * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} +- {sd:4.2f}"


def report(records, s, scores, best, history, out: Path, total: float, dataset: str) -> None:
    print(f"\n{dataset}: held-out networks x {s['seeds']} seeds; finetuning budget {s['before']}+{s['after']} epochs "
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
