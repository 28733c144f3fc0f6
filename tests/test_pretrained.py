"""The metanetworks shipped with the package (metanet/pretrained): what the manifest records is what
loads, a changed file is refused, a file that cannot serve its role is not shipped, and a run that
uses one says so."""

import json
import shutil

import pytest

import metanet.pretrained as pretrained
from metanet.levels import Level
from metanet.metanetwork import load_metanetwork
from metanet.sources import ALLOCATION, CRITERION, resolve


def test_the_shipped_criterion_ranks_channels_and_the_allocator_allocates():
    assert pretrained.roles() == [ALLOCATION, CRITERION]
    criterion = load_metanetwork(pretrained.shipped(CRITERION).path)[0]
    assert criterion.head.ranks is Level.CHANNELS and criterion.config.layers == 0 and criterion.config.gradient
    assert not criterion.reads_edges  # a per-channel MLP: it reads any architecture
    allocator = load_metanetwork(pretrained.shipped(ALLOCATION).path)[0]
    assert allocator.head.allocates


def test_with_nothing_given_a_run_says_which_metanetwork_it_uses_and_where_it_was_trained():
    source = resolve(None, CRITERION)
    assert source.path == pretrained.shipped(CRITERION).path and source.given is None
    assert "no metanetwork given: using the shipped criterion metanetwork" in source.note
    assert "trained on the CIFAR-10 benchmark zoo" in source.note and "docs/benchmarks.md" in source.note
    assert resolve("my.pt").path == "my.pt" and resolve("my.pt").note is None


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A copy of metanet/pretrained to change."""
    for f in pretrained.HERE.iterdir():
        if f.suffix in (".pt", ".json"):
            shutil.copy(f, tmp_path / f.name)
    monkeypatch.setattr(pretrained, "HERE", tmp_path)
    monkeypatch.setattr(pretrained, "MANIFEST", tmp_path / "manifest.json")
    return tmp_path


def test_a_changed_or_missing_file_is_refused(package):
    entry = json.loads((package / "manifest.json").read_text())[CRITERION]
    data = bytearray((package / entry["file"]).read_bytes())
    data[-100] ^= 0xFF
    (package / entry["file"]).write_bytes(bytes(data))
    with pytest.raises(pretrained.ShippedError, match="is not the manifest's"):
        pretrained.shipped(CRITERION)
    (package / entry["file"]).unlink()
    with pytest.raises(pretrained.ShippedError, match="missing from the package"):
        pretrained.shipped(CRITERION)
    with pytest.raises(pretrained.ShippedError, match="no shipped metanetwork for 'gates'"):
        pretrained.shipped("gates")


def test_shipping_records_the_digest_and_refuses_a_file_that_cannot_serve(package):
    criterion = str(package / "criterion-cifar10.pt")
    with pytest.raises(pretrained.ShippedError, match="cannot serve as the allocation metanetwork"):
        pretrained.record(ALLOCATION, criterion, "digits", "a zoo", "cmd", "docs")
    entry = pretrained.record(CRITERION, criterion, "digits", "the digits zoo", "python ...", "docs/x.md")
    assert entry.file == "criterion-digits.pt" and pretrained.shipped(CRITERION).trained_on == "the digits zoo"
    assert json.loads((package / "manifest.json").read_text())[ALLOCATION]["file"] == "allocation-cifar10.pt"


def test_a_network_the_shipped_metanetwork_saw_is_refused_as_held_out_under_any_id(package, tmp_path):
    """The lineage of a member ignores where its data sits (one spec, two dataset folders: other ids
    and roles, the same networks); a benchmark refuses to judge a shipped metanetwork on a network
    whose lineage it learned from, whatever file name it is given under; a user's own file is not
    checked (its zoo's roles keep its members apart)."""
    from conftest import build_digits_zoo

    from zoo.spec import lineage, load_spec, members
    from zoo.store import SeenNetworkError, Zoo, lineages, refuse_seen

    spec = load_spec("zoo/specs/cifar10-bench.yaml")
    here, there = (members({**spec, "dataset": {**spec["dataset"], "root": root}}, 3, 10, 16)
                   for root in ("/work/main/data/cifar10-jpeg", "data/cifar10-jpeg"))
    assert [m.id for m in here] != [m.id for m in there]  # the root is part of the id
    assert ([lineage("imagefolder:cifar10-jpeg", m.arch, m.seed) for m in here]
            == [lineage("imagefolder:elsewhere", m.arch, m.seed) for m in there])
    assert [m.role for m in here] != [m.role for m in there]  # and so the roles

    build_digits_zoo(tmp_path / "zoo", members=3)
    zoo = Zoo(str(tmp_path / "zoo"))
    trained, held = [r for r in zoo if r.role == "train"], [r for r in zoo if r.role == "test"]
    assert trained and held
    (tmp_path / "seen.txt").write_text("\n".join(lineages(zoo, ("train",))))
    from metanet.pretrained.__main__ import main as ship

    ship([CRITERION, str(package / "criterion-cifar10.pt"), "--dataset", "digits", "--trained-on", "a zoo",
          "--command", "cmd", "--measured", "docs", "--seen", str(tmp_path / "seen.txt")])
    shipped = pretrained.shipped(CRITERION)
    assert shipped.seen == tuple(sorted(lineages(zoo, ("train",))))
    refuse_seen(held, [shipped.path])  # held-out members: unseen
    copy = shutil.copy(shipped.path, tmp_path / "renamed.pt")
    with pytest.raises(SeenNetworkError, match=f"{trained[0].id}: .*renamed.pt learned from this network"):
        refuse_seen(trained, [str(copy)])  # recognised by content, not by name
    refuse_seen(trained, [str(package / "allocation-cifar10.pt")])  # it saw other networks
    # prune_batch prunes such networks (that is fine) and says their rows are not held-out results
    from zoo.batch import Source, seen_note

    zoo_path = str(tmp_path / "zoo")
    config = {"zoo": zoo_path, "metanet": shipped.path, "methods": ["meta", "none"], "allocator": None}
    everyone = [Source(r.id, f"{zoo_path}#{r.id}", zoo_path) for r in zoo]
    note = seen_note(config, everyone)
    assert note.startswith(f"warning: {len(trained)} of the members pruned here ({trained[0].id}") and \
        "their rows are not held-out results" in note, note
    assert seen_note(config, [s for s in everyone if s.name in {r.id for r in held}]) is None
    assert seen_note(dict(config, methods=["none"]), everyone) is None  # no metanetwork in this run
    assert seen_note(dict(config, metanet=None, allocator=str(copy)), everyone) is not None
