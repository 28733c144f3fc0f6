"""Does the metanetwork beat the baselines? A paired benchmark that says when it cannot tell.

1. Networks: the zoo that ``make zoo`` builds (``--zoo``): its ``train`` members meta-train the
   metanetwork, its ``val`` members select the checkpoint; the networks pruned are the zoo's held-out
   ``test`` members plus every member of the ``--heldout`` zoos (specs of networks unlike any zoo
   member, e.g. ``zoo/specs/digits-heldout.yaml``). The test split is never used for selection.
2. Meta-training of the default objective's metanetwork (``metanet.objectives``: the
   learned criterion; ``--set objective=paper``: the paper's), with the diagnostics of
   ``metanet.diagnostics`` on the validation members after every ``select_every`` epochs
   (selectivity of the edit, accuracy after BatchNorm recalibration, the recalibrated pruning curve
   and its area) and the selection score of its objective (``metanet.selection.default_selection``,
   measured by ``bench/selection.py``): a learned criterion's curve area, or for an edit the short
   recipe (metanetwork -> finetune -> prune to 2x -> finetune, ``select_steps`` each, validation
   accuracy). The best-scoring checkpoint is kept.
3. Every held-out network x seed x method (``--methods``, default the registered methods with ``benchmarked`` set (``metanet.methods``):
   ``meta``, magnitude ``none``, Torch-Pruning's other criteria ``taylor``, ``bn_scale``, ``lamp``,
   ``fpgm``, ``hessian``, ``random``, ``depgraph``, and ``curve``, the per-network optimisation of
   the curve objective): the method's preparation and its selectivity (for ``meta`` also the curve
   right after the edit; for ``none`` also the unedited network's curve), then one pruning run
   through every target (1.5/2/3/4x), at each: BatchNorm recalibrated (the accuracy right after
   pruning, i.e. the recalibrated curve, "0 steps"), then finetuned for each budget (20 and 80
   steps, each on its own copy). Same network, seed and budget for every method: paired.
4. Tables per budget: each method's mean with a 95% interval over networks; paired differences
   with 95% intervals against ``none`` and against the best hand-crafted criterion, chosen per
   target and budget on validation accuracy (``metanet.paired.with_best``); seconds per pruned
   network; selectivity. The sensitivity check: if ``curve - none`` right after pruning has no
   interval above zero, the benchmark says it cannot tell methods apart on these networks.
5. Resuming: each finished job is appended to ``--out``'s ``jobs.jsonl`` with a key of what
   produced it (the network's weights and architecture, method, seed, the recipe's settings, the
   dataset, for ``meta`` the metanetwork's weights); the chosen metanetwork is saved with a key of
   its settings and members. A rerun (after a kill, or with more methods) reuses what is unchanged.

    python bench/quality.py --smoke                                        # digits, about a minute (65 s, 2 cores)
    python pipelines/make_zoo.py --spec zoo/specs/digits-heldout.yaml      # held-out digits networks
    python bench/quality.py --zoo runs/zoo-digits --heldout runs/zoo-digits-heldout
    python bench/quality.py --zoo runs/zoo-cifar10w --heldout runs/zoo-cifar10-heldout --preset cifar10
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metanet.diagnostics import CURVE_SPEEDUPS, diagnose, selectivity  # noqa: E402
from metanet.meta_training import MetaTrainConfig, make_member  # noqa: E402
from metanet.metanetwork import MetaNetConfig, MetaNetwork, save_metanetwork  # noqa: E402
from metanet.objectives import DEFAULT_OBJECTIVE, edit_refusal, fill, objective_defaults  # noqa: E402
from metanet.paired import mean_ci, method_table, paired_difference, paired_table, with_best  # noqa: E402
from metanet.levels import Level  # noqa: E402
from metanet.methods import HAND_CRAFTED, METHODS, leads, names, uses_metanet  # noqa: E402
from metanet.metanetwork import apply_metanetwork  # noqa: E402
from metanet.objectives import OBJECTIVES  # noqa: E402
from metanet.recipe import (RECONSTRUCT_DEFAULTS, prune_to_targets, recalibrated_accuracy,  # noqa: E402
                            recipe_from_settings)
from metanet.selection import criterion_of, default_selection, score, selection_recipe, train_and_select  # noqa: E402
from zoo.arch import build_model  # noqa: E402
from metanet.data import TaskData  # noqa: E402
from zoo.integrity import checked  # noqa: E402
from zoo.store import Zoo  # noqa: E402

CURVE_KEYS = [f"curve_{s:g}x" for s in CURVE_SPEEDUPS]
# the benchmark's design: every method is compared with magnitude ("none": also the unedited
# network's own curve), and the per-network curve scores against it are the sensitivity check
MAGNITUDE, PER_NETWORK = "none", "curve"
CHANNEL_METHODS = names(Level.CHANNELS)
BENCH_METHODS = names(Level.CHANNELS, benchmarked=True)
# what is reported at every target: (label, key without its val_/test_ prefix)
BUDGETS = [("right after pruning (BatchNorm recalibrated, 0 finetuning steps)", "acc_pruned")]


def budgets(s: dict) -> list[tuple[str, str]]:
    """The reported budgets: 0 steps, each of ``s['budgets']``, and ``after_steps``."""
    return [*BUDGETS, *[(f"after {n} finetuning steps", f"acc_ft{n}") for n in s.get("budgets", [])],
            (f"after {s['after_steps']} finetuning steps", "acc")]


# ------------------------------------------------------------------------------ settings
# Names as in pipelines/meta_train.py and pipelines/prune_batch.py, so a Tune best_config.yaml applies.
# what meta is: the default objective (metanet.objectives: the best learned criterion
# measured); None is filled from the objective after --set / --config, so --set objective=paper
# gives the paper's metanetwork (its edit and sparsity term as bench/edits.py chose them). A
# learned criterion's checkpoint is chosen by the validation members' recalibrated pruning curve
EDIT = dict(objective=DEFAULT_OBJECTIVE, sparsity_norm="none", distill_epochs=0, selection=None,
            **{k: None for k in objective_defaults(DEFAULT_OBJECTIVE)})  # selection None: by the objective
# (a preset's own value wins over the objective's: the cifar10 preset's batch of 128 for both)
# the recalibrated curve's speed-ups, the extra budgets, and what prunes meta/depgraph (a Tune best_config may say)
CURVE = dict(targets=[1.5, 2.0, 3.0, 4.0], budgets=[20], criterion="magnitude", **RECONSTRUCT_DEFAULTS)
PRESETS = {
    "digits": dict(seeds=2, **CURVE, select_members=4, select_every=2, epochs=12, reg=3e-3,
                   alpha=16.0, residual=0.05, hidden=32, batches_per_step=4,
                   weight_decay=5e-4, bn_mode="eval", before_steps=40, before_lr=0.01, after_steps=80, after_lr=0.01,
                   sparse_reg=5e-4, oracle_reg=5e-2, select_steps=18, **EDIT),
    "cifar10": dict(seeds=2, **CURVE, select_members=2, select_every=1, epochs=8, reg=3e-3,
                    alpha=16.0, residual=0.05, hidden=32, batches_per_step=4,
                    weight_decay=5e-4, bn_mode="eval", before_steps=40, before_lr=0.01, after_steps=80,
                    after_lr=0.01, sparse_reg=5e-4, oracle_reg=5e-2, select_steps=18, **{**EDIT, "batch_size": 128}),
    "smoke": dict(seeds=1, targets=[2.0, 3.0], budgets=[5], criterion="magnitude", **RECONSTRUCT_DEFAULTS,
                  select_members=1, select_every=1, epochs=2, reg=3e-3,
                  alpha=16.0, residual=0.05, hidden=16, batches_per_step=2,
                  weight_decay=5e-4, bn_mode="eval", before_steps=10, before_lr=0.01, after_steps=10, after_lr=0.01,
                  sparse_reg=5e-4, oracle_reg=5e-2, select_steps=5, **EDIT),
}


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


def prune_job(arch: dict, state: dict, method: str, s: dict, finetune: dict, seed: int,
              metanet_state: dict | None, metanet_cfg: dict | None) -> list[dict]:
    """One network x seed x method: prepare, its selectivity, then one pruning run through every
    target, each recalibrated and finetuned for every budget."""
    data = _DATA
    model = build_model(arch)
    model.load_state_dict(state)
    model.eval()
    metanet = None
    if metanet_state is not None:
        metanet = MetaNetwork(MetaNetConfig(**metanet_cfg))
        metanet.load_state_dict(metanet_state)
    cfg = recipe_from_settings(s, **finetune, seed=seed, sparse_reg=s["sparse_reg"], oracle_reg=s["oracle_reg"])
    torch.manual_seed(seed)
    extra: dict = {}
    if method == MAGNITUDE:  # the unedited network's own curve, once per network and seed
        extra.update({f"raw_{k}": v for k, v in diagnose(model, model, data, cfg, split="test").items()})
    if METHODS[method].uses_metanet:
        edited = apply_metanetwork(metanet, model, torch.zeros(data.input_shape))
        extra.update({f"edit_{k}": v for k, v in diagnose(model, edited, data, cfg, split="test").items()})

    def inspect(prepared) -> None:
        extra.update(selectivity(model, prepared.model, data),
                     acc_recal=recalibrated_accuracy(prepared.model, data, cfg, "test"))

    results = prune_to_targets(model, data, method, cfg, s["targets"], metanet, inspect=inspect,
                               extra_after=s["budgets"])
    return [dict(result, **extra) for _, result in results]


# what a pruning job's result depends on besides the network, seed, method and metanetwork
JOB_SETTINGS = ("targets", "budgets", "criterion", "before_steps", "before_lr", "after_steps", "after_lr",
                "sparse_reg", "oracle_reg")


def digest(value) -> str:
    """A content hash of ``value``: JSON for plain data, the bytes of every tensor of a state dict."""
    h = hashlib.sha256()
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        for name in sorted(value):
            t = value[name].detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    else:
        h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def job_key(state: dict, arch: dict, method: str, seed: int, s: dict, finetune: dict, data_name: str,
            metanet_state: dict | None) -> str:
    """What a job's rows were produced by: the network's weights and architecture, the method,
    seed, the recipe's settings, the dataset and (for ``meta``) the metanetwork's weights."""
    return digest({"network": digest(state), "arch": arch, "method": method, "seed": seed, "data": data_name,
                   "settings": {k: s.get(k) for k in JOB_SETTINGS}, "finetune": finetune,
                   "metanet": digest(metanet_state) if metanet_state is not None else None})


class JobLog:
    """Finished jobs, one JSON line each (key, rows), appended as each job ends: a killed run
    keeps every finished job, and a rerun with the same inputs reuses them (a half-written last
    line is ignored)."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, list[dict]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.done[entry["key"]] = entry["rows"]

    def add(self, key: str, rows: list[dict]) -> None:
        self.done[key] = rows
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "rows": rows}, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _pool(workers: int, data: TaskData):
    return cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init, initargs=(data,))


def build_zoo_here(out: Path, spec_path: str | None, overrides: list[str]) -> str:
    """A zoo built in this process, member after member (what make_zoo's Ray tasks do): the
    smoke run's zoos are small, and a second local Ray beside a running one is not worth it."""
    from zoo.build import build_member
    from zoo.data import load_from_config
    from zoo.spec import load_spec, members

    spec = load_spec(spec_path, [*overrides, f"output={out}"])
    data = load_from_config(spec["dataset"])
    zoo = Zoo.create(str(out))
    zoo.write_spec(spec)
    done = set(zoo.metadata().query("status == 'ok'")["id"]) if zoo.files() else set()
    for m in members(spec, data.in_channels, data.num_classes, data.image_size):
        if m.id not in done:
            zoo.write(m.id, [build_member(spec, m, data)], manifest=False)
    zoo.write_manifest()
    return str(out)


def smoke_zoos(out: Path) -> tuple[str, list[str]]:
    """A small digits zoo (8 members: 4 train, 2 val, 2 test) and 2 held-out networks from the
    held-out spec (deeper and wider than any zoo member)."""
    zoo = build_zoo_here(out / "zoo", None, ["members=8", "val_members=0.25", "test_members=0.25", "train.epochs=6",
                                              "finetune.epochs=1"])
    held = build_zoo_here(out / "heldout", str(ROOT / "zoo/specs/digits-heldout.yaml"), ["members=2", "train.epochs=6"])
    return zoo, [held]


# ----------------------------------------------------------------------- meta-training
def train_metanetwork(zoo: Zoo, data: TaskData, s: dict, by_role: dict, log) -> tuple[MetaNetwork, dict]:
    """Meta-trains on the zoo's train members; diagnoses every ``select_every`` epochs on the
    validation members; returns the network with the best checkpoint loaded and the history."""
    finetune = zoo.finetune_settings()
    meta_cfg = MetaTrainConfig(epochs=s["epochs"], batches_per_step=s["batches_per_step"], lr=s["lr"], reg=s["reg"],
                               alpha=s["alpha"], batch_size=s["batch_size"], weight_decay=s["weight_decay"],
                               milestones=(int(s["epochs"] * 0.75),), bn_mode=s["bn_mode"],
                               sparsity_norm=s["sparsity_norm"], distill_epochs=s["distill_epochs"],
                               objective=s["objective"], score_targets=s["score_targets"])
    members = [make_member(r.id, build_model(r.arch), r.graph, meta_cfg) for r in by_role["train"]]
    val_models = [r.network().eval() for r in by_role["val"][:s["select_members"]]]
    net_cfg = MetaNetConfig(edge_widths=zoo.edge_widths(), hidden=s["hidden"], layers=s["layers"],
                            residual=s["residual"], edit=s["edit"], evidence=s["evidence"],
                            calibration=s["calibration"] or s["gradient"], gradient=s["gradient"])
    metanet = MetaNetwork(net_cfg)
    cfg = recipe_from_settings(s, **finetune)
    select_cfg = selection_recipe(finetune, s["select_steps"], lr=s["before_lr"])
    x = torch.zeros(data.input_shape)

    def diagnostics(net: MetaNetwork) -> dict:
        per = []
        for m in val_models:
            network, crit = criterion_of(net, m, x, cfg, data)
            per.append(diagnose(m, network, data, cfg, split="val", criterion=crit))
        out = {k: statistics.mean(d[k] for d in per) for k in per[0]}
        # "auc": the curve area just computed (free); "recipe": the short recipe
        out["score"] = out["auc"] if s["selection"] == "auc" else score(net, val_models, data, select_cfg)
        return out

    unedited = [diagnose(m, m, data, cfg, split="val") for m in val_models]

    def report(epoch, metrics, net, row):
        if epoch < 0:
            log(f"validation members, unedited: curve AUC {100 * statistics.mean(d['auc'] for d in unedited):.1f}; "
                f"edited before meta-training: {_diag_line(row)}")
            return
        line = f"  epoch {epoch}: task {metrics['task_loss']:.3f} sparsity {metrics['sparsity_loss']:.3f} " \
               f"({metrics['seconds']:.0f} s)"
        log(line + ("; " + _diag_line(row) if row is not None else ""))

    chosen = train_and_select(metanet, members, data, meta_cfg, diagnostics, every=s["select_every"], report=report)
    history = {"epochs": chosen.history, "chosen_epoch": chosen.epoch, "chosen_score": chosen.score,
               "unedited_auc": statistics.mean(d["auc"] for d in unedited), "config": net_cfg.to_dict()}
    log(f"chosen checkpoint: epoch {chosen.epoch} (validation score {100 * chosen.score:.1f})")
    return metanet, history


def metanetwork_for(zoo: Zoo, data: TaskData, s: dict, by_role: dict, out: Path, log) -> tuple[dict, dict]:
    """The chosen metanetwork's weights and its meta-training history: those saved in ``out`` by an
    earlier run with the same settings and the same train and validation members, or trained now
    (``train_metanetwork``) and saved there."""
    key = digest({"settings": s, "finetune": zoo.finetune_settings(), "data": data.name,
                  "members": {role: [digest(r.network().state_dict()) for r in by_role[role]] for role in ("train", "val")}})
    saved, weights = out / "meta_history.json", out / "metanetwork.pt"
    if saved.exists() and weights.exists():
        previous = json.loads(saved.read_text())
        if previous.get("key") == key:
            from metanet.metanetwork import load_metanetwork

            metanet, _ = load_metanetwork(str(weights))
            log(f"metanetwork: reusing {weights} (same settings and members; epoch {previous['history']['chosen_epoch']})")
            return metanet.state_dict(), previous["history"]
    metanet, history = train_metanetwork(zoo, data, s, by_role, log)
    save_metanetwork(metanet, str(weights), epoch=history["chosen_epoch"],
                     selection_score=history["chosen_score"], zoo=str(zoo.root),
                     selection=("validation curve area (accuracy right after pruning, BN recalibrated)"
                                if s["selection"] == "auc" else
                                f"val acc after finetune -> prune to 2x -> finetune ({s['select_steps']} steps each)"))
    _atomic_text(saved, json.dumps({"key": key, "history": history}, default=float))
    return metanet.state_dict(), history


def _diag_line(d: dict) -> str:
    return (f"score {100 * d['score']:.1f}; curve AUC {100 * d['auc']:.1f}, acc after recal {100 * d['acc_recal']:.1f}, ratio spread "
            f"{d['ratio_spread']:.3f}, mean ratio {d['mean_ratio']:.2f}, below 0.1: {100 * d['share_below_0.1']:.0f}%")


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", help="a zoo built by make zoo (with train, val and test members)")
    parser.add_argument("--heldout", nargs="*", default=[], help="zoos whose every member is pruned too "
                        "(networks unlike any zoo member)")
    parser.add_argument("--meta-zoo", help="a zoo whose train and val members meta-train and select the "
                        "metanetwork (default: --zoo's; the networks pruned are --zoo's test members either way)")
    parser.add_argument("--data-root", help="the dataset folder, if not where the zoo was built from")
    parser.add_argument("--smoke", action="store_true", help="build a small digits zoo and run a tiny budget")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="settings preset (default: by dataset)")
    parser.add_argument("--config", help="a config file (Tune's best_config.yaml): its meta_train and prune_batch "
                        "settings replace the preset's")
    parser.add_argument("--out", default="runs/quality", help="output folder (default: runs/quality)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (default: 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set residual=0.1 --set epochs=40")
    parser.add_argument("--methods", nargs="+", default=list(BENCH_METHODS), choices=CHANNEL_METHODS, metavar="METHOD",
                        help=f"methods to compare (default: {' '.join(BENCH_METHODS)}; also: gate, oracle)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--reconstruct", action="store_true", help="every method re-fits the layers that read pruned "
                        "channels after the cut (metanet.reconstruct; = --set reconstruct=true)")
    parser.add_argument("--report", action="store_true", help="print the report again from --out's results.json "
                        "(after a change to the report), run nothing")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report:
        if not (out / "results.json").exists():
            raise SystemExit(f"quality: --report: no results.json in {out}")
        saved = json.loads((out / "results.json").read_text())
        dataset = "cifar10" if "cifar" in str(saved["settings"].get("preset", out)) else "digits"
        return report(saved["records"], saved["settings"], saved["meta_history"], out, float("nan"), dataset, print,
                      saved.get("methods", sorted({r["method"] for r in saved["records"]})))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.zoo and not args.smoke:
        raise SystemExit("quality: --zoo PATH is required (a zoo built by make zoo); or --smoke for digits")
    if args.smoke:
        zoo_path, heldout = smoke_zoos(out)
    else:
        zoo_path, heldout = args.zoo, args.heldout
    zoo = checked(zoo_path)
    data = zoo.dataset(args.data_root)
    preset = args.preset or ("smoke" if args.smoke else "cifar10" if data.image_size > 8 else "digits")
    s = dict(PRESETS[preset])
    if args.config:
        if not os.path.exists(args.config):
            raise SystemExit(f"quality: --config: file not found: {args.config}")
        apply_config(s, args.config)
    s["reconstruct"] = s["reconstruct"] or args.reconstruct
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in s:
            raise SystemExit(f"quality: --set: unknown setting {key!r}; known: {', '.join(sorted(s))}")
        s[key] = yaml.safe_load(value)
    channel_objectives = [n for n, o in OBJECTIVES.items() if o.level is Level.CHANNELS]
    if s["objective"] not in channel_objectives:
        raise SystemExit(f"quality: --set objective={s['objective']}: must be {' or '.join(channel_objectives)}")
    fill(s)  # what the preset and --set leave open comes from the objective
    refusal = edit_refusal(s["objective"], s["edit"])
    if refusal:
        raise SystemExit(f"quality: --set edit={s['edit']} with objective {s['objective']}: {refusal}")
    if s["selection"] is None:
        s["selection"] = default_selection(s["objective"])
    log_lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    def same_data(other: Zoo, flag: str) -> None:
        same = [{k: v for k, v in (z.spec().get("dataset") or {}).items() if k != "root"} for z in (other, zoo)]
        if same[0] != same[1]:  # the same data (wherever its folder is), or the comparison means nothing
            raise SystemExit(f"quality: {flag} {other.root}: its dataset {same[0]} is not the zoo's {same[1]}")

    records = [r for r in zoo if r.status == "ok"]
    by_role = {role: [r for r in records if r.role == role] for role in ("train", "val", "test")}
    meta_zoo = zoo
    if args.meta_zoo:  # another zoo (a larger one) meta-trains and selects; the networks pruned stay these
        meta_zoo = checked(args.meta_zoo)
        same_data(meta_zoo, "--meta-zoo")
        meta_records = [r for r in meta_zoo if r.status == "ok"]
        by_role.update({role: [r for r in meta_records if r.role == role] for role in ("train", "val")})
    missing = [role for role in ("train", "val") if not by_role[role]]
    if missing:
        raise SystemExit(f"quality: {meta_zoo.root}: no members with role(s) {missing}: build it with val_members")
    networks = [(r, "zoo test split") for r in by_role["test"]]
    for path in heldout:
        held = checked(path)
        same_data(held, "--heldout")
        networks += [(r, f"unlike the zoo ({held.spec().get('name', path)})") for r in held if r.status == "ok"]
    if not networks:
        raise SystemExit("quality: no held-out networks: build the zoo with test_members, or give --heldout")
    kinds = Counter(f"{r.arch['family']} ({origin})" for r, origin in networks)
    log(f"data: {data.name}, train {len(data.train[1])}, val {len(data.val[1])}, test {len(data.test[1])}; zoo "
        f"{zoo.root}: {len(by_role['test'])} test members; meta-training zoo {meta_zoo.root}: {len(by_role['train'])} "
        f"train, {len(by_role['val'])} val members; {len(networks)} held-out "
        f"networks: {dict(kinds)}; preset {preset}")
    _init(data)
    torch.set_num_threads(max(1, args.workers))

    meta_state, history = None, {}
    if uses_metanet(args.methods):  # the metanetwork is trained only when it is compared
        meta_state, history = metanetwork_for(meta_zoo, data, s, by_role, out, log)
        log(f"{time.perf_counter() - t0:.0f} s so far")

    from distributed.progress import progress

    finetune = zoo.finetune_settings()
    jobs, kept, reused = [], JobLog(out / "jobs.jsonl"), 0
    results = []

    def collect(job, rows) -> None:
        h, member, origin, seed, method = job
        for row in rows:
            results.append(dict(row, network=h, member=member.id, family=member.arch["family"], origin=origin,
                                seed=seed, acc_unpruned=member.metrics["test_acc"]))

    for h, (member, origin) in enumerate(networks):
        state = member.network().state_dict()
        for seed in range(s["seeds"]):
            for method in args.methods:
                net = (meta_state, history["config"]) if METHODS[method].uses_metanet else (None, None)
                key = job_key(state, member.arch, method, seed, s, finetune, data.name, net[0])
                job = (h, member, origin, seed, method)
                if key in kept.done:
                    collect(job, kept.done[key])
                    reused += 1
                else:
                    jobs.append((key, job, (member.arch, state, method, s, finetune, seed, *net)))
    if reused:
        log(f"reused {reused} finished jobs from {kept.path} (same networks, settings "
            f"and metanetwork); {len(jobs)} to run")
    with _pool(args.workers, data) as pool:
        futures = {pool.submit(prune_job, *a): (key, job) for key, job, a in jobs}
        for f in progress(cf.as_completed(futures), total=len(futures), desc="pruning held-out networks", unit="job"):
            key, job = futures[f]
            rows = f.result()
            kept.add(key, rows)
            collect(job, rows)
    total = time.perf_counter() - t0
    summary = report(results, s, history, out, total, data.name, log, args.methods)
    (out / "log.txt").write_text("\n".join(log_lines) + "\n")
    if not args.no_mlflow:
        _log_mlflow(s, summary, out, preset)
    return summary


# ------------------------------------------------------------------------------------ report
def _first_rows(rows: list[dict], method: str, prefix: str, key: str) -> dict:
    """Per network: the seed mean of ``prefix + key`` in ``method``'s rows at the first target
    (per-job values such as the unedited network's curve repeat on every target's row)."""
    first = [r for r in rows if r["method"] == method and r["target"] == rows[0]["target"] and prefix + key in r]
    by: dict = {}
    for r in first:
        by.setdefault(r["network"], []).append(r[prefix + key])
    return {n: statistics.mean(v) for n, v in by.items()}


def _cell(values) -> str:
    ci = mean_ci([100 * v for v in values])
    return "n/a" if ci.n == 0 else f"{ci.mean:.1f}" if ci.n < 2 else f"{ci.mean:.1f} ± {(ci.high - ci.low) / 2:.1f}"


def comparison_pairs(methods) -> list[tuple[str, str]]:
    """The paired differences reported: meta and curve against the best hand-crafted criterion
    and magnitude (none), then every other method against none."""
    first = leads(methods)
    pairs = [(a, b) for a in first for b in ("best", MAGNITUDE)]
    return pairs + [(m, MAGNITUDE) for m in methods if m not in first and m != MAGNITUDE]


def sensitivity(rows: list[dict], targets) -> dict:
    """curve - none right after pruning, paired by network: can the benchmark see a criterion
    that is better than magnitude on these networks?"""
    diffs = {t: paired_difference(rows, PER_NETWORK, MAGNITUDE, "test_acc_pruned", t) for t in targets}
    return {"differences": diffs, "separates": any(d.excludes_zero and d.mean > 0 for d in diffs.values())}


def report(rows: list[dict], s: dict, history: dict, out: Path, total: float, dataset: str, log,
           methods=BENCH_METHODS) -> dict:
    targets = s["targets"]
    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    n_nets = len({r["network"] for r in rows})
    first = [r for r in rows if r["target"] == targets[0]]
    criteria = [m for m in HAND_CRAFTED if m in methods]
    log(f"\n{dataset}: {n_nets} held-out networks x {s['seeds']} seeds; {s['before_steps']} finetuning steps before "
        f"pruning for every method; BatchNorm recalibrated after pruning; test split (selection used validation "
        f"members and the validation split only). Intervals: 95%, Student t over networks (seeds averaged).")
    log(f"unpruned test accuracy: {100 * statistics.mean(r['acc_unpruned'] for r in first):.1f}%")
    pairs = comparison_pairs(methods)
    paired: dict = {}
    best_of: dict = {}
    cols = " | ".join(f"{t:g}x" for t in targets)
    for label, key in budgets(s):
        log(f"\nTest accuracy (%) {label}, mean ± half-width of the 95% interval:\n")
        table = method_table(rows, methods, targets, key=f"test_{key}")
        if key == "acc_pruned":  # the unedited network's and the bare edit's curves beside the methods'
            extra = [("unedited", MAGNITUDE, "raw_")] * (MAGNITUDE in methods) + \
                [("after the edit", m, "edit_") for m in methods if METHODS[m].uses_metanet]
            for lab, meth, pre in extra:
                cells = [_cell(_first_rows(rows, meth, pre, f"curve_{t:g}x").values()) for t in targets]
                table += f"\n| {lab} | " + " | ".join(cells) + " |"
        log(table)
        both, chosen = with_best(rows, criteria, f"val_{key}", targets)
        best_of[key] = chosen
        log("\nbest hand-crafted criterion (highest mean validation-split accuracy of these networks; reported on "
            "their test split, so 'best' is slightly optimistic and differences against it conservative): "
            + ", ".join(f"{t:g}x {m}" for t, m in chosen.items()))
        log(f"\nPaired differences {label} (points):\n")
        log(paired_table(both, pairs, targets, key=f"test_{key}"))
        paired[key] = {f"{a}-{b}": {str(t): vars(paired_difference(both, a, b, f"test_{key}", t)) for t in targets}
                       for a, b in pairs}
    log(f"\nSeconds per pruned network (preparation, pruning, recalibration and every finetune; {cols}):\n")
    lines = [f"| method | {cols} |", "|" + "---|" * (len(targets) + 1)]
    for m in methods:
        cells = [f"{statistics.mean(r['seconds'] for r in rows if r['method'] == m and r['target'] == t):.1f}"
                 for t in targets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    log("\n".join(lines))
    log("\nSelectivity of each preparation (mean over networks): ratio spread = within-group coefficient of "
        "variation of channel group-norm ratios; below 0.1 = share of prunable channels under 0.1 normalised "
        "importance; acc = test accuracy after BN recalibration, before pruning:\n")
    lines = ["| preparation | ratio spread | mean ratio | below 0.1 | acc |", "|---|---|---|---|---|"]
    edited = [m for m in methods if METHODS[m].uses_metanet]
    preparations = [("unedited", MAGNITUDE, "raw_")] * (MAGNITUDE in methods) + \
        [("after the edit", m, "edit_") for m in edited] + [(m, m, "") for m in methods]
    for label, method, prefix in preparations:
        vals = {k: statistics.mean(_first_rows(rows, method, prefix, k).values())
                for k in ("ratio_spread", "mean_ratio", "share_below_0.1", "acc_recal")}
        lines.append(f"| {label} | {vals['ratio_spread']:.3f} | {vals['mean_ratio']:.2f} | "
                     f"{100 * vals['share_below_0.1']:.1f}% | {100 * vals['acc_recal']:.1f} |")
    log("\n".join(lines))
    check = {"differences": {}, "separates": False}
    if {PER_NETWORK, MAGNITUDE} <= set(methods):
        check = sensitivity(rows, targets)
        verdict = ("the benchmark CAN tell criteria apart on these networks: curve - none right after pruning has a "
                   "95% interval above zero at " + ", ".join(f"{t:g}x" for t, d in check["differences"].items()
                                                            if d.excludes_zero and d.mean > 0)
                   if check["separates"] else
                   "the benchmark CANNOT tell criteria apart on these networks: even the per-network optimised "
                   "scores (curve) do not separate from magnitude right after pruning")
        log("\nSensitivity check: curve - none right after pruning: "
            + ", ".join(f"{t:g}x {d}" for t, d in check["differences"].items()) + f"\n-> {verdict}")
    if history.get("epochs"):
        log(f"\nmetanetwork: checkpoint of epoch {history['chosen_epoch']} chosen on validation members by the short "
            f"recipe (score {100 * history['chosen_score']:.1f})")
    log(f"total wall time {total / 60:.1f} min")
    summary = {"records": rows, "settings": s, "meta_history": history, "methods": methods,
               "separates": check["separates"], "best": {k: {str(t): m for t, m in v.items()} for k, v in best_of.items()},
               "sensitivity": {str(t): vars(d) for t, d in check["differences"].items()}, "paired": paired}
    _atomic_text(out / "results.json", json.dumps(summary, indent=1, default=float))
    plot(rows, s, history, out, dataset, methods, criteria)
    log(f"wrote {out / 'results.json'}, {out / 'quality.png'}"
        + (f", {out / 'meta_training.png'}, {out / 'metanetwork.pt'}" if history.get("epochs") else ""))
    return summary


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot(rows, s, history, out: Path, dataset: str, methods, criteria) -> None:
    """One panel per budget: each method's mean test accuracy (95% interval) against the target
    speed-up; then the meta-training history (validation members), when there is one."""
    import matplotlib.ticker

    from metanet.plotting import pyplot

    plt = pyplot()
    targets = s["targets"]
    unpruned = 100 * statistics.mean(r["acc_unpruned"] for r in rows if r["target"] == targets[0])
    panels = budgets(s)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (label, key) in zip(axes[0], panels):
        for i, method in enumerate(methods):
            cis = [mean_ci([100 * statistics.mean(v) for v in _by_network(rows, method, f"test_{key}", t).values()])
                   for t in targets]
            style = dict(lw=2.5, zorder=3) if method in leads(methods) else dict(lw=1, alpha=0.8)
            ax.errorbar(targets, [c.mean for c in cis], yerr=[(c.high - c.low) / 2 if c.n > 1 else 0 for c in cis],
                        marker="os^vD<>ph*"[i % 10], capsize=3, color=colors[i % len(colors)],
                        ls="--" if method in criteria else "-", label=method, **style)
        ax.axhline(unpruned, color="gray", ls=":", label="unpruned")
        ax.set_title(label, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(targets)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("MAC speed-up")
        ax.set_ylabel("test accuracy (%), 95% interval over networks")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{dataset}: {len({r['network'] for r in rows})} held-out networks x {s['seeds']} seeds "
                 "(dashed: hand-crafted criteria)")
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110)
    plt.close(fig)
    if not history.get("epochs"):
        return
    epochs = history["epochs"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    xs = [e["epoch"] + 1 for e in epochs]
    axes[0].plot(xs, [100 * e["auc"] for e in epochs], marker="o", label="curve AUC, edited")
    axes[0].axhline(100 * history["unedited_auc"], color="gray", ls="--", label="curve AUC, unedited")
    axes[0].plot(xs, [100 * e["score"] for e in epochs], marker="s", label="selection score (short recipe)")
    axes[0].axvline(history["chosen_epoch"] + 1, color="tab:red", ls=":", label="chosen")
    axes[0].set_title("validation members (%)")
    axes[1].plot(xs, [e["ratio_spread"] for e in epochs], marker="o")
    axes[1].set_title("ratio spread (within-group CV)")
    axes[2].plot(xs, [100 * e["share_below_0.1"] for e in epochs], marker="o", label="below 0.1 (%)")
    axes[2].plot(xs, [100 * e["acc_recal"] for e in epochs], marker="s", label="acc after recal (%)")
    axes[2].set_title("selectivity and accuracy")
    for ax in axes:
        ax.set_xlabel("meta-training epochs done")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out / "meta_training.png", dpi=120)
    plt.close(fig)


def _by_network(rows, method: str, key: str, target: float) -> dict:
    by: dict = {}
    for r in rows:
        if r["method"] == method and r["target"] == target and key in r:
            by.setdefault(r["network"], []).append(r[key])
    return by


def _log_mlflow(s: dict, summary: dict, out: Path, preset: str) -> None:
    import mlflow

    from distributed.tracking import flatten, use_experiment

    use_experiment("quality", str(out))
    with mlflow.start_run(run_name=f"quality-{preset}"):
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(s).items()})
        for e in summary["meta_history"].get("epochs", []):
            mlflow.log_metrics({f"val_{k}": float(v) for k, v in e.items() if isinstance(v, (int, float))
                                and k != "epoch" and not math.isnan(float(v))}, step=e["epoch"] + 1)
        metrics = {"separates": float(summary["separates"])}
        for budget, by_pair in summary["paired"].items():
            for pair, by_t in by_pair.items():
                metrics.update({f"paired_{budget}_{pair}_{t}x": v["mean"] for t, v in by_t.items()
                                if not math.isnan(v["mean"])})
        mlflow.log_metrics(metrics)
        for name in ("results.json", "quality.png", "meta_training.png", "log.txt"):
            if (out / name).exists():
                mlflow.log_artifact(str(out / name))


if __name__ == "__main__":
    main()
