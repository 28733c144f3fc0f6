"""A damaged zoo is named before anything trains on it or prunes it (issue 37, cases 4 and 11):
a member whose weights or graph were altered after the build, a file copied over another member's,
a member whose architecture cannot be built, a member file gone. Each pipeline refuses in one line
naming the member and its file (exit 2, before Ray starts), or leaves the members out or uses them,
with a warning, when told to (``--damaged-members``)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from metanet.graph import network_to_graph
from zoo import batch
from zoo.arch import arch_spec, build_model, resnet_spec
from zoo.integrity import DAMAGED_ENV, ZooDamageError, checked, inspect
from zoo.store import Zoo, ZooFormatError, ZooRecord, read_members, write_members

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))

import make_zoo  # noqa: E402
import meta_train  # noqa: E402
import prune_batch  # noqa: E402
import tune  # noqa: E402

ROLES = ("train", "train", "val", "test", "test")


def _member(i: int, role: str) -> ZooRecord:
    torch.manual_seed(i)
    model = build_model(resnet_spec(8, (4, 6, 8), in_channels=1)).eval()
    return ZooRecord(f"resnet-{i:012d}", arch_spec(model), "digits", i, network_to_graph(model, torch.zeros(1, 1, 8, 8)),
                     metrics={"val_acc": 0.5 + i / 100, "test_acc": 0.5}, role=role)


def _file(zoo: Path, i: int) -> Path:
    return zoo / "members" / f"resnet-{i:012d}.arrow"


def _rewrite(zoo: Path, i: int, edit) -> None:
    """Member ``i``'s file rewritten with ``edit`` applied to its record, the manifest untouched:
    what a hand edit or a broken copy does."""
    (record,) = read_members(str(_file(zoo, i)))
    edit(record)
    write_members(str(_file(zoo, i)), [record])


def _flip_signs(record) -> None:  # 30% of the weights change sign: still a valid file and network
    gen = torch.Generator().manual_seed(0)
    for t, feat in record.graph.edge_feat.items():
        flip = torch.rand(feat.shape, generator=gen) < 0.3
        record.graph.edge_feat[t] = torch.where(flip, -feat, feat)


def _zero_src(record) -> None:
    record.graph.src = torch.zeros_like(record.graph.src)


def _unknown_arch(record) -> None:
    record.arch = dict(record.arch, family="resnex")


DAMAGE = {
    # name: (how the copy of the zoo is damaged, the member named, words the line must hold)
    "weights": (lambda z: _rewrite(z, 0, _flip_signs), "resnet-000000000000", "altered after the build"),
    "src": (lambda z: _rewrite(z, 1, _zero_src), "resnet-000000000001", "altered after the build"),
    "copy": (lambda z: shutil.copyfile(_file(z, 3), _file(z, 4)), "resnet-000000000004",
             "holds member resnet-000000000003, not resnet-000000000004"),
    "copy-train": (lambda z: shutil.copyfile(_file(z, 0), _file(z, 1)), "resnet-000000000001",
                   "holds member resnet-000000000000, not resnet-000000000001"),
    "arch": (lambda z: _rewrite(z, 2, _unknown_arch), "resnet-000000000002", "unknown architecture family"),
    "gone": (lambda z: _file(z, 3).unlink(), "resnet-000000000003", "the file is gone"),
}


@pytest.fixture(scope="module")
def zoos(tmp_path_factory):
    """An intact zoo (5 members: 2 train, 1 val, 2 test; untrained, nothing here trains) and one
    damaged copy per kind of ``DAMAGE``."""
    tmp = tmp_path_factory.mktemp("integrity")
    spec = yaml.safe_load((ROOT / "zoo/specs/digits.yaml").read_text())
    spec.update(output=str(tmp / "intact"), members=len(ROLES))
    zoo = Zoo.create(str(tmp / "intact"))
    zoo.write_spec(spec)
    for i, role in enumerate(ROLES):
        zoo.write(f"resnet-{i:012d}", [_member(i, role)], manifest=False)
    zoo.write_manifest()
    for name, (damage, _, _) in DAMAGE.items():
        shutil.copytree(tmp / "intact", tmp / name)
        damage(tmp / name)
    return tmp


def test_an_intact_zoo_has_no_damage_and_its_manifest_records_each_files_digest(zoos):
    manifest = json.loads((zoos / "intact" / "manifest.json").read_text())
    assert all(len(m["sha256"]) == 16 for m in manifest["members"])
    assert inspect(Zoo(str(zoos / "intact"))) == ([], [])
    assert inspect(Zoo(str(zoos / "intact")), graphs=True) == ([], [])  # each graph is its network's


@pytest.mark.parametrize("kind", DAMAGE)
def test_each_kind_of_damage_is_named_with_its_member_and_file(kind, zoos):
    _, member, words = DAMAGE[kind]
    damage, _ = inspect(Zoo(str(zoos / kind)))
    assert [d.member for d in damage] == [member], damage
    assert words in damage[0].what
    with pytest.raises(ZooDamageError) as err:
        checked(str(zoos / kind))
    line = str(err.value)
    assert "\n" not in line and f"{member} (members/" in line and "make_zoo" in line and f"{DAMAGED_ENV}=skip" in line


def test_without_recorded_digests_the_graphs_and_the_architecture_are_still_checked(zoos, tmp_path):
    """A manifest written before digests existed: an edited graph is found by comparing it with the
    graph its own network converts to, an unknown architecture by building it; said in a note."""
    for kind, words in (("src", "its graph's src is not the graph of its own network"),
                        ("arch", "unknown architecture family 'resnex'")):
        old = tmp_path / kind
        shutil.copytree(zoos / kind, old)
        manifest = json.loads((old / "manifest.json").read_text())
        for m in manifest["members"]:
            del m["sha256"]
        (old / "manifest.json").write_text(json.dumps(manifest))
        damage, notes = inspect(Zoo(str(old)))
        assert len(damage) == 1 and words in damage[0].what, damage
        assert "records no content digests" in notes[0]


def test_meta_train_refuses_a_damaged_zoo_in_one_line_before_ray(zoos, tmp_path, capsys):
    """Today's code trained on every one of these without a word (``--check``: 'a run would train one')."""
    for kind in ("weights", "src", "copy-train", "arch"):  # its training and validation members
        with pytest.raises(SystemExit) as exit_:
            meta_train.cli(["--zoo", str(zoos / kind), "--out", str(tmp_path / "mt"), "--check", "--no-mlflow"])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and "\n" not in err and err.startswith("meta_train: "), (kind, err)
        assert DAMAGE[kind][1] in err and "--damaged-members skip" in err, err
    assert not (tmp_path / "mt").exists()


@pytest.mark.parametrize("choice", ["skip", "use"])
def test_meta_train_can_be_told_to_skip_or_use_damaged_members_and_says_so(choice, zoos, tmp_path, capsys):
    from zoo.meta_runs import prepare

    with pytest.raises(SystemExit) as exit_:  # --check: exit 1, a run would train (no refusal)
        meta_train.cli(["--zoo", str(zoos / "weights"), "--out", str(tmp_path / "mt"), "--check", "--no-mlflow",
                        "--damaged-members", choice])
    err = capsys.readouterr().err
    assert exit_.value.code == 1, err
    said = "leaving out 1 damaged member(s)" if choice == "skip" else "using 1 damaged member(s) as asked"
    assert f"meta_train: warning: {zoos / 'weights'}: {said}: resnet-000000000000" in err
    config = meta_train.parse_args(["--zoo", str(zoos / "weights"), "--out", str(tmp_path / "mt"),
                                    "--damaged-members", choice])
    zoo, _, digest = prepare(config)
    trained = set(zoo.metadata().id[zoo.metadata().role == "train"])
    assert ("resnet-000000000000" in trained) == (choice == "use")
    # the workers open the zoo themselves: what the driver left out reaches them
    workers = Zoo(config["zoo"], skip_unreadable=True, exclude=config["excluded_members"])
    assert [r.id for r in workers.built("train")] == sorted(trained)


def test_prune_batch_refuses_a_damaged_split_and_skips_it_when_told(zoos, capsys, monkeypatch):
    """The copied file made ``--split test`` silently one network short; now it is named."""
    monkeypatch.setattr(prune_batch, "init_ray", lambda *a, **k: pytest.fail("Ray started on a damaged zoo"))
    with pytest.raises(SystemExit) as exit_:
        prune_batch.cli(["--zoo", str(zoos / "copy"), "--methods", "none", "--no-mlflow", "--out",
                         str(zoos / "pb-out")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and "resnet-000000000004 (members/resnet-000000000004.arrow" in err
    assert not (zoos / "pb-out").exists()
    config = {**prune_batch.DEFAULTS, "zoo": str(zoos / "copy"), "split": "test", "damaged_members": "skip"}
    sources = {s.name: s for s in batch.find_sources(config)}
    assert sources["resnet-000000000003"].error is None
    assert "damaged: holds member resnet-000000000003" in sources["resnet-000000000004"].error  # its rows fail, why
    # a damaged member of another split does not stop this one
    assert batch.find_sources({**prune_batch.DEFAULTS, "zoo": str(zoos / "weights"), "split": "test"})


def test_tune_refuses_a_damaged_zoo_before_ray(zoos, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tune, "preflight", lambda *a, **k: pytest.fail("Ray would start on a damaged zoo"))
    with pytest.raises(SystemExit) as exit_:
        tune.cli(["--set", f"zoo={zoos / 'src'}", "--out", str(tmp_path / "tune"), "--no-mlflow"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and "resnet-000000000001" in err
    assert "--set damaged_members=skip" in err


def test_the_bench_scripts_read_the_choice_from_the_environment(zoos, monkeypatch, capsys):
    monkeypatch.setenv(DAMAGED_ENV, "skip")
    zoo = checked(str(zoos / "weights"), who="bench")
    assert "resnet-000000000000" not in set(zoo.metadata().id)
    assert "bench: warning" in capsys.readouterr().err
    monkeypatch.setenv(DAMAGED_ENV, "ignore")
    with pytest.raises(ZooFormatError, match=f"{DAMAGED_ENV}: 'ignore' is not one of refuse, skip, use"):
        checked(str(zoos / "intact"))


def test_make_zoo_rebuilds_a_damaged_member_rather_than_blessing_it(zoos, tmp_path, capsys):
    """Its manifest is rewritten from the files: a damaged member is rebuilt first (said), and a
    damaged file that is no member of the plan stays out of the manifest."""
    from zoo.spec import MemberSpec

    copy = tmp_path / "zoo"
    shutil.copytree(zoos / "weights", copy)
    zoo = Zoo(str(copy))
    plan = [MemberSpec(i, f"resnet-{i:012d}", {}, i, role) for i, role in enumerate(ROLES)][1:]  # member 0 not planned
    assert make_zoo._damaged(zoo, plan, "z") == set()
    assert "no member of this spec: left out of the manifest" in capsys.readouterr().out
    assert "resnet-000000000000.arrow" not in {m["file"] for m in zoo.write_manifest()["members"]}
    shutil.copytree(zoos / "weights", tmp_path / "again")
    full = [MemberSpec(i, f"resnet-{i:012d}", {}, i, role) for i, role in enumerate(ROLES)]
    assert make_zoo._damaged(Zoo(str(tmp_path / "again")), full, "z") == {"resnet-000000000000"}
    assert "member resnet-000000000000: members/resnet-000000000000.arrow: content differs" in capsys.readouterr().out
