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
