"""What prune_batch prunes and how, checked before anything is written: the models (zoo members,
files), their architecture and dataset, the runs (targets, floor, sparsity, N:M) and methods; each
bad input is a ``BatchInputError`` of one line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import glob
import os
import shutil

from distributed.model_registry import RegistryError, is_uri
from distributed.schema import load_yaml, require_regular_file
from metanet.allocation import ALLOCATIONS, DEFAULT_ALLOCATION
from metanet.criteria import names as criterion_names
from metanet.files import atomic_write
from metanet.levels import Level
from metanet.metanetwork import MetanetFileError, load_metanetwork
from metanet.methods import METHODS, baselines, names, uses_metanet
from metanet.recipe_settings import LEARNED_AS, RECIPE_DEFAULTS
from metanet.reconstruct import TARGETS
from metanet.pretrained import ShippedError
from metanet.sources import ALLOCATION, CRITERION, resolve
from metanet.weight_pruning import SCOPES, parse_nm
from zoo.arch import arch_spec, build_model, parse_import_arch
from zoo.data import load_dataset
from zoo.integrity import DAMAGED_MEMBERS, checked
from zoo.model_files import load_model
from zoo.store import Zoo, file_sha256


class BatchInputError(ValueError):
    """Models, a zoo split or a dataset that cannot be pruned as asked."""


RECONSTRUCT_HELP = {
    "reconstruct": "after pruning, re-fit every layer that reads pruned channels by least squares to the unpruned "
                   "network's outputs on calibration inputs (metanet.reconstruct; no labels; BatchNorm statistics kept); "
                   "with --before-steps 0 --after-steps 0: post-training pruning",
    "reconstruct_batches": "calibration batches (of --batch-size training inputs) the reconstruction fits on",
    "reconstruct_ridge": "ridge strength of the reconstruction, relative to the mean diagonal of its normal equations",
    "reconstruct_targets": "reconstruction inputs: sequential (each layer reads the already re-fitted pruned network) or "
                           "local (the unpruned network's inputs on the kept channels)",
}


@dataclass(frozen=True)
class Source:
    """Where one model comes from: a zoo member (``zoo`` + ``row``) or a file."""

    name: str
    ref: str  # the file path, or "<zoo>#<member id>"
    zoo: str | None = None
    digest: str = ""  # content hash of the file the model is read from
    error: str | None = None  # set when the source cannot be read at all (its rows fail without a task)
    recorded_val_acc: float | None = None  # a zoo member's validation accuracy when it was built


# a member whose validation accuracy now differs from its recorded one by more than this (a
# fraction) is flagged in its rows: the same network on the same split gives the same accuracy,
# up to float differences between devices, so a gap means the file or the dataset changed
ACCURACY_DRIFT = 0.01


def load_source(source: Source, arch: dict | None, trust_pickle: bool):
    if source.zoo is not None:
        return Zoo(source.zoo, skip_unreadable=True).record(source.name).network()
    return load_model(source.ref, arch=arch, trust_pickle=trust_pickle)[0]


def check_finite(model, where: str) -> None:
    """A model with NaN or inf weights cannot be pruned meaningfully: say which tensor."""
    import itertools

    import torch

    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {name} has non-finite values (NaN or inf); the model file is broken")


def check_input(model, x, where: str):
    """A model that cannot take the dataset's input (another image size or channel count): one
    line naming the file and the shape, not the tracer's multi-line dump later. Returns the output."""
    import torch

    try:
        with torch.no_grad():
            return model.eval()(x)
    except Exception as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ValueError(f"{where}: does not take the dataset's input of shape {tuple(x.shape)}: "
                         f"{first[:200]}") from None


def check_classes(output, data, where: str) -> None:
    """A classifier with another class count than the dataset's: fewer outputs fail in the loss as
    ``Target 2 is out of bounds`` naming neither count, more would train and prune silently with
    outputs no label ever asks for. ``output``: the model's output for one input."""
    shape = tuple(getattr(output, "shape", ()))
    if len(shape) != 2 or shape[0] != 1:
        raise ValueError(f"{where}: the model's output has shape {shape}, not (1, classes): not a classifier")
    if shape[1] != data.num_classes:
        raise ValueError(f"{where}: the model has {shape[1]} outputs, the dataset {data.name} has "
                         f"{data.num_classes} classes")


def drift_warning(source: Source, val_acc: float) -> str | None:
    """A note for a zoo member whose validation accuracy is not the one recorded when it was built
    (``ACCURACY_DRIFT``): its file was altered, or the dataset is not the one it was built on."""
    recorded = source.recorded_val_acc
    if recorded is None or recorded != recorded or abs(val_acc - recorded) <= ACCURACY_DRIFT:
        return None
    return (f"{source.ref}: validation accuracy {100 * val_acc:.1f}% now, {100 * recorded:.1f}% recorded when the "
            "member was built: its file was changed, or the dataset differs from the one it was built on")


def family_of(model) -> str:
    try:
        spec = arch_spec(model)
        return spec["target"].split(":")[1] if spec["family"] == "import" else spec["family"]
    except ValueError:
        return type(model).__name__


RUN_KEYS = ("target", "floor", "sparsity", "nm")  # what a run is: one of them set
DEFAULT_TARGETS = [2.0]
# a run's value (target, floor, sparsity) names its rows and files at this many significant digits:
# values are rounded to it when given, so that two values are one run exactly when they name one
PRECISION = 6


def canonical(value: float) -> float:
    """``value`` at ``PRECISION`` significant digits: the value a run prunes to, keys and names."""
    return float(f"{float(value):.{PRECISION}g}")


def canonical_values(config: dict, key: str, flag: str) -> None:
    """``config[key]`` (a list) rounded to ``PRECISION`` digits, in place; values that round to one
    are refused as repeats (``BatchInputError``), naming both."""
    seen: dict[float, float] = {}
    for value in config[key]:
        c = canonical(value)
        if c in seen:
            given = " ".join(f"{v!r}" for v in config[key])
            raise BatchInputError(f"{flag} {given}: {seen[c]!r} and {value!r} are one value ({c:g}) at the "
                                  f"{PRECISION} significant digits that name rows and files; give each value once")
        seen[c] = value
    config[key] = list(seen)


def check_runs_and_methods(config: dict, targets_given: bool) -> None:
    """prune_batch's runs and methods, checked (``BatchInputError``, one line) and completed in
    place: N:M normalised to ``N:M``, ``--baselines`` added. One kind of pruning per run: channels
    (targets or floor) or weights (sparsity or N:M), each with the methods that have that form."""
    canonical_values(config, "targets", "--targets")
    canonical_values(config, "sparsity", "--sparsity")
    if config["floor"] is not None:
        config["floor"] = canonical(config["floor"])
    if config["nm"] is not None:
        try:
            config["nm"] = "{}:{}".format(*parse_nm(config["nm"]))
        except ValueError as err:
            raise BatchInputError(f"--nm: {err}") from None
    if config["sparsity_scope"] not in SCOPES:
        raise BatchInputError(f"--sparsity-scope {config['sparsity_scope']!r}: must be one of {', '.join(SCOPES)}")
    weights = bool(config["sparsity"]) or config["nm"] is not None
    if weights and (config["floor"] is not None or targets_given or config["targets"] != DEFAULT_TARGETS):
        raise BatchInputError("--targets/--floor prune channels, --sparsity/--nm weights: one kind per run")
    if weights and (config["learned_as"] != LEARNED_AS[0] or config["criterion"] != RECIPE_DEFAULTS["criterion"]):
        raise BatchInputError("--learned-as and --criterion choose how channels are pruned; with --sparsity/--nm "
                              "the method chooses the weight criterion")
    if weights and config["allocation"] != DEFAULT_ALLOCATION:
        raise BatchInputError("--allocation says how many channels each group keeps: a channel-pruning setting, not "
                              "one of --sparsity/--nm")
    chosen = ALLOCATIONS.get(config["allocation"])
    if chosen is not None and not chosen.reads_allocator and config.get("allocator"):
        raise BatchInputError(f"--allocator is read by --allocation {learned_allocation()} only, not "
                              f"{config['allocation']}")
    if config["floor"] is not None and chosen is not None and not chosen.adaptive:
        raise BatchInputError(f"--allocation {config['allocation']} prunes to --targets; --floor prunes the same "
                              "fraction of every group")
    if not weights and (config["sparsity_scope"] != "global" or config["prune_ends"]):
        raise BatchInputError("--sparsity-scope and --prune-ends apply to --sparsity/--nm runs only")
    level = Level.WEIGHTS if weights else Level.CHANNELS
    if config["baselines"]:
        config["methods"] = list(dict.fromkeys([*config["methods"], *baselines(level)]))
    bad = [m for m in config["methods"] if m not in names(level)]
    if bad and weights:
        raise BatchInputError(f"method(s) {bad} prune channels only; with --sparsity/--nm use "
                              f"{', '.join(names(Level.WEIGHTS))}")
    if bad:
        raise BatchInputError(f"unknown method(s) {bad}; known: {', '.join(names(Level.CHANNELS))}"
                              + "".join(f"; {m} prunes weights: with --sparsity or --nm" for m in bad if m in METHODS))


def runs_of(config: dict) -> list[dict]:
    """prune_batch's runs: one per ``sparsity`` and one for ``nm`` (weight-level), else one for
    ``floor`` (adaptive), else one per target."""
    none = dict.fromkeys(RUN_KEYS)
    if config.get("sparsity") or config.get("nm"):
        return ([dict(none, sparsity=float(s)) for s in config.get("sparsity") or []]
                + ([dict(none, nm=config["nm"])] if config.get("nm") else []))
    if config["floor"] is not None:
        return [dict(none, floor=config["floor"])]
    return [dict(none, target=float(t)) for t in config["targets"]]


def preparation_target(config: dict) -> float:
    """The speed-up a method's preparation reads (``metanet.recipe.prepare_reads_target``: learned
    gates are sized for it): the run's first target, or 2 for a floor or weight-level run. Taken from
    the run's settings, never from the rows a task happens to recompute, and in the fingerprint of
    the rows it shapes (``method_settings``)."""
    targets = config.get("targets") or []
    return canonical(targets[0]) if targets and config.get("floor") is None else 2.0


def check_choices(config: dict) -> None:
    """Each setting that names one of a fixed set of choices is one of them (``BatchInputError``)."""
    for key, allowed in (("learned_as", LEARNED_AS), ("damaged_members", DAMAGED_MEMBERS),
                         ("reconstruct_targets", TARGETS), ("criterion", criterion_names(Level.CHANNELS)),
                         ("allocation", tuple(ALLOCATIONS))):
        if config[key] not in allowed:
            raise BatchInputError(f"--{key.replace('_', '-')} must be one of {', '.join(allowed)}, not {config[key]!r}")


def check_metanet_level(metanet, config: dict) -> None:
    """A learned criterion prunes at its own level: a channel-scores metanetwork (objective curve)
    channels, a weight-scores one (weight_curve) weights; the paper's edit either."""
    weights = bool(config["sparsity"] or config["nm"])
    if metanet.head.allocates:
        raise BatchInputError(f"--metanet {config['metanet']}: an allocation metanetwork (--objective allocation) "
                              "says how many channels each group keeps: give it as --allocator with --allocation "
                              f"{learned_allocation()}")
    if weights and metanet.head.ranks is Level.CHANNELS:
        raise BatchInputError(f"--metanet {config['metanet']}: a channel-scores metanetwork (--objective curve) "
                              "ranks channels; --sparsity/--nm need an edit or weight-scores one")
    if not weights and metanet.head.ranks is Level.WEIGHTS:
        raise BatchInputError(f"--metanet {config['metanet']}: a weight-scores metanetwork (--objective "
                              "weight_curve) ranks weights: prune with --sparsity or --nm")


def learned_allocation() -> str:
    """The allocation that reads an allocation metanetwork (``--allocator``)."""
    return next(name for name, a in ALLOCATIONS.items() if a.reads_allocator)


def settle_metanet(config: dict):
    """``--metanet`` for the methods that read one: a file, an MLflow URI (downloaded) or, when none
    is given, the shipped learned criterion (``metanet.sources``); loaded (a truncated or foreign file
    is one line now), its level checked, its content digest returned with it and its path made
    absolute (the Ray tasks read it). Returns (metanetwork or None, digest, the line to print or None)."""
    if not uses_metanet(config["methods"]):
        return None, "", None
    source = _resolved(config["metanet"], CRITERION, "--metanet", "metanetwork")
    config["metanet_source"] = source.given or SHIPPED + os.path.basename(source.path)  # what the user asked for
    config["metanet"] = os.path.abspath(source.path)
    metanet = _loaded(source, "--metanet")
    check_metanet_level(metanet, config)
    return metanet, file_digest(source.path), source.note


def settle_allocator(config: dict, flag: str = "--allocator") -> str | None:
    """``--allocator`` for ``--allocation learned``: a file, an MLflow URI or, when none is given, the
    shipped allocation metanetwork; checked (``check_allocator``), its content digest in
    ``allocator_sha`` (the rows' fingerprint: the file's content, not its path, decides reuse) and its
    path made absolute (the Ray tasks read it). Returns the line to print about it, or None.
    ``flag``: how errors name the setting (a Tune search file's key is ``allocator``)."""
    chosen = ALLOCATIONS.get(config["allocation"])
    if chosen is None or not chosen.reads_allocator:
        return None
    source = _resolved(config.get("allocator"), ALLOCATION, flag, "allocation metanetwork")
    config["allocator_source"] = source.given or SHIPPED + os.path.basename(source.path)
    config["allocator"] = source.path
    check_allocator(_loaded(source, flag), config, flag)
    config["allocator_sha"] = file_digest(source.path)
    config["allocator"] = os.path.abspath(source.path)
    return source.note


SHIPPED = "shipped: "  # a ``*_source`` of a metanetwork shipped with the package, before its file name


def stage_metanetworks(config: dict, out: str) -> None:
    """A metanetwork that is not the user's own file (downloaded from MLflow into this machine's
    cache, or shipped inside the package, whose path differs on nodes that run an uploaded copy)
    copied under ``--out``, which every node of a cluster reads, by content digest; the tasks read
    the copy. A user's file stays where it is (on a cluster, where every node reads it)."""
    for key in ("metanet", "allocator"):
        given = config.get(f"{key}_source")
        if given is None or not (is_uri(given) or given.startswith(SHIPPED)):
            continue
        staged = os.path.join(out, "metanetworks", f"{file_digest(config[key])}.pt")
        if not os.path.exists(staged):
            os.makedirs(os.path.dirname(staged), exist_ok=True)
            atomic_write(staged, lambda tmp, src=config[key]: shutil.copyfile(src, tmp))
        config[key] = staged


def _loaded(source, flag: str):
    """The metanetwork of ``source``; a file downloaded from MLflow that is not one is named by its URI."""
    try:
        return load_metanetwork(source.path)[0]
    except MetanetFileError as err:
        if source.given is None or not is_uri(source.given):
            raise
        raise BatchInputError(f"{flag} {source.given}: {err}") from None


def _resolved(given_as: str | None, role: str, flag: str, what: str):
    """``metanet.sources.resolve`` with its errors as one ``BatchInputError`` line naming the flag."""
    try:
        source = resolve(given_as, role)
    except (RegistryError, ShippedError) as err:
        raise BatchInputError(f"{flag} {given_as or '(the shipped one)'}: {err}") from None
    if not os.path.exists(source.path):
        raise BatchInputError(f"{what} file not found: {source.path}")
    require_regular_file(source.path, f"{flag} {source.path}", BatchInputError)
    return source


def check_allocator(allocator, config: dict, flag: str = "--allocator") -> None:
    """``--allocator`` is an allocation metanetwork (its head allocates) that reads no calibration."""
    if not allocator.head.allocates:
        raise BatchInputError(f"{flag} {config['allocator']}: edit {allocator.config.edit!r} is not an allocation "
                              "metanetwork (meta_train.py --objective allocation)")
    if allocator.config.calibration:
        raise BatchInputError(f"{flag} {config['allocator']}: built with calibration=True; an allocation "
                              "metanetwork reads no calibration statistics")


def given(value) -> bool:
    return value is not None and value == value  # NaN (a missing number in a frame) is not given


def run_label(row: dict) -> str:
    """A row's run in names and tables: ``2x``, ``floor0.9``, ``sparsity0.8``, ``2of4``: its value
    at ``PRECISION`` digits, as in its key (``row_key``), so that two runs never share a file."""
    def text(v) -> str:
        return f"{canonical(v):.{PRECISION}g}"

    if given(row.get("nm")):
        return "{}of{}".format(*str(row["nm"]).split(":"))
    if given(row.get("sparsity")):
        return f"sparsity{text(row['sparsity'])}"
    floor = row.get("floor")
    return f"floor{text(floor)}" if given(floor) else f"{text(row['target'])}x"


def is_weight_level(row: dict) -> bool:
    return given(row.get("sparsity")) or given(row.get("nm"))


def find_sources(config: dict) -> list[Source]:
    """Every model to prune: the zoo split's members, then the files the ``models`` patterns match."""
    sources: list[Source] = []
    if config["zoo"]:
        if config["split"] not in ("train", "val", "test", "all"):
            raise BatchInputError(f"--split must be train, val, test or all, not {config['split']!r}")
        roles = {"train", "val", "test"} if config["split"] == "all" else {config["split"]}
        try:  # an unreadable member fails only its own rows; a damaged one as --damaged-members says
            zoo = checked(config["zoo"], config.get("damaged_members"), roles=roles, who="prune_batch",
                          skip_unreadable=True, override="--damaged-members ")
            meta = zoo.metadata()
        except FileNotFoundError as err:
            raise BatchInputError(f"{err}")
        check_spec(zoo)
        files = {m.id: f for m, f in zip(meta.itertuples(), member_files(zoo))}
        for m in meta.itertuples():
            if m.status == "ok" and m.role in roles:
                sources.append(Source(m.id, f"{config['zoo']}#{m.id}", config["zoo"], file_digest(files[m.id]),
                                      recorded_val_acc=float(m.val_acc)))
        for path, error in zoo.unreadable.items():
            if zoo.expected_role(path) in roles:
                name = Path(path).stem
                sources.append(Source(name, f"{config['zoo']}#{name}", config["zoo"], error=error))
        if not sources:
            raise BatchInputError(f"{config['zoo']} has no built members in split {config['split']!r} "
                             f"(roles there: {sorted(set(meta.role))})")
    for pattern in config["models"]:
        if os.path.isdir(pattern):
            inside = os.path.join(glob.escape(pattern), "")
            matches = sorted(glob.glob(inside + "*.pt") + glob.glob(inside + "*.pth"))
            if not matches:
                raise BatchInputError(f"--models {pattern!r}: the folder holds no .pt or .pth files")
        elif os.path.exists(pattern):  # a file named literally, brackets and all: not a pattern
            matches = [pattern]
        else:
            matches = sorted(glob.glob(pattern))
        if not matches:
            raise BatchInputError(f"--models {pattern!r}: no such file, and no .pt/.pth files match it")
        for path in matches:
            require_regular_file(path, f"--models {path}", BatchInputError)  # before hashing it: /dev/zero never ends
            sources.append(Source(Path(path).stem, os.path.abspath(path), digest=file_digest(path)))
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BatchInputError(f"two models share the name(s) {dupes}; rename the files")
    if not sources:
        raise BatchInputError("nothing to prune: give --zoo (and --split) and/or --models")
    return sources


def check_spec(zoo) -> None:
    """The zoo's spec.json, read now: the dataset and the finetuning settings come from it once the
    output exists, so a damaged one (``ZooFormatError``) is named before anything is written. A
    missing one is said where it is needed (``--dataset`` and the finetuning flags do without it)."""
    try:
        zoo.spec()
    except FileNotFoundError:
        pass


def member_files(zoo) -> list[str]:
    """The file of each row of ``zoo.metadata()``, in order."""
    return [path for path, _ in zoo.index()]


def file_digest(path: str) -> str:
    """Content hash of a local file (the first 16 hex digits of its SHA-256): ``zoo.store.file_sha256``,
    the digest zoo manifests record."""
    import pyarrow.fs as pafs

    return file_sha256(pafs.LocalFileSystem(), os.path.abspath(path))


def load_data(config: dict):
    try:
        if config["dataset"]:
            return load_dataset(config["dataset"], config["data_root"])
        if config["zoo"]:
            return Zoo(config["zoo"]).dataset(config["data_root"])
    except FileNotFoundError as err:
        raise BatchInputError(str(err)) from None
    raise BatchInputError("--dataset is needed when the models do not come from a zoo")


def finetune_defaults(config: dict) -> dict:
    """Batch size and augmentation not given: the zoo's finetuning settings, else 128 with
    augmentation."""
    zoo_settings = {"batch_size": 128, "augment": True}
    if config["zoo"] and (config["batch_size"] is None or config["augment"] is None):
        zoo_settings = Zoo(config["zoo"]).finetune_settings()
    return dict(config, batch_size=config["batch_size"] or zoo_settings["batch_size"],
                augment=config["augment"] if config["augment"] is not None else zoo_settings["augment"])


def arch_file(path: str | None) -> dict | None:
    """``--arch``: a YAML/JSON architecture spec file, or an import path with keyword arguments
    (``torchvision.models:mobilenet_v2,num_classes=10``; see ``zoo.arch``)."""
    if path is None:
        return None

    if ":" in path and not os.path.exists(path):
        try:
            arch = parse_import_arch(path)
            build_model(arch)  # fail here, once, with the reason, not once per model in the Ray tasks
        except ValueError as err:
            raise BatchInputError(f"--arch {err}") from None
        return arch
    if not os.path.exists(path):
        raise BatchInputError(f"--arch file not found: {path}")
    require_regular_file(path, f"--arch {path}", BatchInputError)
    with open(path) as f:
        arch = load_yaml(f)
    if not isinstance(arch, dict) or "family" not in arch:
        raise BatchInputError(f"--arch {path}: not an architecture spec (a mapping with 'family')")
    return arch
