"""The Arrow zoo store: exact round trips, plain-pyarrow readability, atomic writes, clear errors."""

import json
import os

import pyarrow as pa
import pytest
import torch

from conftest import assert_same_state, randomize_state
from metanet import NetworkGraph, graph_to_network, network_to_graph
from zoo.arch import arch_spec, build_model, resnet_spec, vgg_spec
from zoo.store import SCHEMA_VERSION, Zoo, ZooFormatError, ZooRecord, read_members, write_members


def _record(i, spec, shape=(1, 3, 32, 32)):
    model = randomize_state(build_model(spec), seed=i)
    graph = network_to_graph(model, torch.zeros(shape))
    metrics = {"train_acc": 0.9, "val_acc": 0.8, "test_acc": 0.7 + i / 100, "macs": 123, "params": 45,
               "speedup": 1.3}
    return model, ZooRecord(f"net-{i}", arch_spec(model), "cifar10", i, graph, metrics)


def test_zoo_round_trip_through_dgl_is_exact(tmp_path):
    specs = [resnet_spec(20), resnet_spec(32, (8, 16, 24), shortcut="projection"), vgg_spec(11, width_mult=0.125)]
    pairs = [_record(i, s) for i, s in enumerate(specs)]
    zoo = Zoo.create(str(tmp_path / "zoo"))
    zoo.write("part-0", [r for _, r in pairs[:2]])
    zoo.write("part-1", [r for _, r in pairs[2:]])
    assert len(zoo) == 3
    for (model, rec), got in zip(pairs, zoo):
        assert got.id == rec.id and got.arch == rec.arch and got.metrics["test_acc"] == rec.metrics["test_acc"]
        dg = got.graph.to_dgl()
        rebuilt = graph_to_network(NetworkGraph.from_dgl(dg), build_model(got.arch))
        assert_same_state(model, rebuilt)
    manifest = json.loads((tmp_path / "zoo" / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert [m["id"] for m in manifest["members"]] == ["net-0", "net-1", "net-2"]
    assert manifest["counts"] == {"total": 3, "ok": 3, "failed": 0}
    meta = zoo.metadata()
    assert list(meta["id"]) == ["net-0", "net-1", "net-2"] and "src" not in meta.columns


def test_readable_with_plain_pyarrow(tmp_path):
    model, rec = _record(0, resnet_spec(20))
    path = write_members(str(tmp_path / "m.arrow"), [rec])
    table = pa.ipc.open_file(pa.memory_map(path)).read_all()
    assert table.schema.metadata[b"metaprune.schema_version"] == str(SCHEMA_VERSION).encode()
    row = table.slice(0, 1)
    src = row.column("src").chunk(0).values.to_numpy()
    assert len(src) == rec.graph.num_edges
    assert torch.equal(torch.from_numpy(src.astype("int64")), rec.graph.src)
    node_feat = row.column("node_feat").chunk(0).values.to_numpy().reshape(rec.graph.num_nodes, -1)
    assert torch.equal(torch.from_numpy(node_feat.copy()), rec.graph.node_feat)
    assert json.loads(row.column("arch")[0].as_py()) == rec.arch


def test_failed_members_are_rows_without_a_graph(tmp_path):
    _, ok = _record(0, resnet_spec(20))
    failed = ZooRecord("net-x", resnet_spec(20), "cifar10", 7, None, status="failed", error="out of memory")
    path = write_members(str(tmp_path / "m.arrow"), [ok, failed])
    back = read_members(path)
    assert back[1].graph is None and back[1].status == "failed" and back[1].error == "out of memory"
    assert back[0].graph is not None


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    _, rec = _record(0, resnet_spec(20))
    path = write_members(str(tmp_path / "m.arrow"), [rec])
    data = open(path, "rb").read()
    bad = tmp_path / "truncated.arrow"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ZooFormatError, match="truncated.arrow.*not a readable Arrow IPC file"):
        read_members(str(bad))
    foreign = tmp_path / "foreign.arrow"
    with pa.OSFile(str(foreign), "wb") as f, pa.ipc.new_file(f, pa.schema([("x", pa.int64())])) as w:
        w.write_table(pa.table({"x": [1, 2]}))
    with pytest.raises(ZooFormatError, match="foreign.arrow: not a metaprune zoo file"):
        read_members(str(foreign))
    with pytest.raises(FileNotFoundError, match="missing.arrow"):
        read_members(str(tmp_path / "missing.arrow"))
    with pytest.raises(FileNotFoundError, match="zoo directory not found"):
        Zoo(str(tmp_path / "nowhere"))


def test_a_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    _, rec = _record(0, resnet_spec(20))
    path = str(tmp_path / "m.arrow")
    write_members(path, [rec])
    before = open(path, "rb").read()

    class Boom(RuntimeError):
        pass

    def explode(*args, **kwargs):
        raise Boom("disk full")

    monkeypatch.setattr(pa.ipc.RecordBatchFileWriter, "write_table", explode)
    with pytest.raises(Boom):
        write_members(path, [rec])
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["m.arrow"]  # no temporary file left behind


def test_set_roles_rewrites_only_the_role(tmp_path):
    pairs = [_record(i, resnet_spec(8, (4, 4, 4))) for i in range(3)]
    zoo = Zoo.create(str(tmp_path / "zoo"))
    for _, rec in pairs:
        zoo.write(rec.id, [rec], manifest=False)
    assert zoo.set_roles({"net-1": "test", "net-2": "train", "absent": "val"}) == 1
    assert list(zoo.metadata()["role"]) == ["train", "test", "train"]
    assert zoo.set_roles({"net-1": "test"}) == 0
    for (model, _), got in zip(pairs, zoo):  # the graphs are untouched
        assert_same_state(model, graph_to_network(got.graph, build_model(got.arch)))


def test_benchmark_networks_splits_train_val_and_held_out_networks(tmp_path):
    from zoo.store import benchmark_networks

    specs = [resnet_spec(8, (4, 4, 4)), vgg_spec(11, width_mult=0.125), resnet_spec(8, (4, 4, 4)),
             vgg_spec(11, width_mult=0.125), resnet_spec(8, (4, 4, 4))]
    zoo = Zoo.create(str(tmp_path / "zoo"))
    for i, spec in enumerate(specs):
        _, rec = _record(i, spec)
        zoo.write(rec.id, [rec], manifest=False)
    failed = ZooRecord("net-x", specs[0], "cifar10", 7, None, status="failed", error="out of memory")
    zoo.write(failed.id, [failed], manifest=False)
    zoo.set_roles({"net-0": "train", "net-1": "train", "net-2": "val", "net-3": "val", "net-4": "test",
                   "net-x": "test"})
    other = Zoo.create(str(tmp_path / "other"))
    _, unlike = _record(9, vgg_spec(11, width_mult=0.125))
    other.write(unlike.id, [unlike], manifest=False)
    zoo, other = Zoo(str(tmp_path / "zoo")), str(tmp_path / "other")
    train, val, held = benchmark_networks(zoo, [other])
    assert [r.id for r in train] == ["net-0", "net-1"] and len(val) == 2 and not val[0].training
    assert [r.id for r in held] == ["net-4", "net-9"]  # the failed member is left out; the other zoo's all
    train, val, held = benchmark_networks(zoo, [other], family="vgg")
    assert [r.id for r in train] == ["net-1"] and len(val) == 1 and [r.id for r in held] == ["net-4", "net-9"]
    assert len(benchmark_networks(zoo, val_limit=1)[1]) == 1  # two val members, the first kept
    assert [r.id for r in benchmark_networks(zoo, test_from=[other])[2]] == []  # the other zoo's members are not test
    assert [r.id for r in benchmark_networks(zoo, [other], test_from=[])[2]] == ["net-9"]  # no test members: --heldout only
