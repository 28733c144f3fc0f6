"""Metanetworks in the MLflow Model Registry (distributed/model_registry.py, metanet/sources.py):
logged and registered, read back by models:/ and runs:/ URIs through the SQLite store and through a
real `mlflow server` process, and used by prune_batch; a bad URI is one line."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import build_digits_zoo
from distributed.model_registry import RegistryError, latest_version, local_file, log_metanetwork
from metanet import api
from metanet.metanetwork import MetaNetConfig, MetaNetwork, load_metanetwork, save_metanetwork

ROOT = Path(__file__).resolve().parents[1]


def _metanetwork(path) -> MetaNetwork:
    net = MetaNetwork(MetaNetConfig(edge_widths={"k3x3": 9}, edit="scores", layers=0, hidden=8, evidence=True,
                                    calibration=True, gradient=True))
    torch.nn.init.normal_(net.score_decoder[-1].weight)
    save_metanetwork(net, str(path))
    return net


def _logged(store: str, tmp_path, register: str | None):
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = store
    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("meta-train")
    with mlflow.start_run() as run:
        pass
    net = _metanetwork(tmp_path / "metanetwork.pt")
    return net, run.info.run_id, log_metanetwork(net, str(tmp_path / "metanetwork.pt"), run.info.run_id, register,
                                                  {"zoo": "digits", "selection_score": 0.5})


def test_a_registered_metanetwork_reads_back_by_its_uris(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("METAPRUNE_CACHE", str(tmp_path / "cache"))
    net, run_id, uri = _logged(f"sqlite:///{tmp_path}/mlflow.db", tmp_path, "crit")
    assert uri == "models:/crit/1" and latest_version("crit") == uri
    for read in (uri, f"runs:/{run_id}/metanetwork"):
        back, _ = load_metanetwork(local_file(read))
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), back.state_dict().values()))
    same = api.load_metanetwork(uri)  # the API takes the URI as it is
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), same.state_dict().values()))
    assert isinstance(mlflow.pytorch.load_model(uri), MetaNetwork)  # what MLflow users reach for
    info = mlflow.models.get_model_info(uri)
    assert info.metadata["zoo"] == "digits" and info.run_id == run_id  # the run that produced it
    (tmp_path / "again").mkdir()
    _logged(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "again", "crit")
    assert latest_version("crit") == "models:/crit/2"  # a new version each time


def test_bad_uris_are_named_in_one_line(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("METAPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RegistryError, match="set MLFLOW_TRACKING_URI"):
        local_file("models:/crit/1")
    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    with pytest.raises(RegistryError, match="models:/nothing/3: not found in sqlite"):
        local_file("models:/nothing/3")
    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("other")
    with mlflow.start_run() as run:
        (tmp_path / "notes.txt").write_text("not a metanetwork")
        mlflow.log_artifact(str(tmp_path / "notes.txt"), artifact_path="notes")
    with pytest.raises(RegistryError, match="holds no metanetwork.pt"):
        local_file(f"runs:/{run.info.run_id}/notes")
    assert not [p for p in (tmp_path / "cache" / "mlflow").iterdir() if p.name.startswith(".download-")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite behind it, artifacts proxied), stopped by the
    process group this fixture started."""
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port",
                             str(port), "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        else:
            raise AssertionError("mlflow server did not answer in 60 s")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_prune_batch_reads_a_registered_metanetwork_from_a_real_mlflow_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("METAPRUNE_CACHE", str(tmp_path / "cache"))
    _, _, uri = _logged(mlflow_server, tmp_path, "served")
    assert uri == "models:/served/1"
    build_digits_zoo(tmp_path / "zoo")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "MLFLOW_TRACKING_URI": mlflow_server}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(ROOT / "pipelines/prune_batch.py"), "--num-cpus", "2", "--zoo",
                           str(tmp_path / "zoo"), "--methods", "meta", "--metanet", uri, "--targets", "2",
                           "--before-steps", "0", "--after-steps", "0", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"metanetwork {uri} (MLflow)" in done.stdout
    rows = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert (rows.status == "ok").all() and (rows.criterion == "scores").all(), rows.error.tolist()
    assert f"mlflow: run logged to {mlflow_server}" in done.stdout  # and the run went to the same server


def test_a_tune_search_reads_its_allocation_metanetwork_by_uri_and_stages_it(tmp_path, monkeypatch):
    import mlflow

    from metanet.sources import ALLOCATION, resolve
    from zoo.batch.inputs import BatchInputError
    from zoo.tuning import settle_search_allocator, trial_allocator

    monkeypatch.setenv("METAPRUNE_CACHE", str(tmp_path / "cache"))
    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("meta-train")
    with mlflow.start_run() as run:
        pass
    net = load_metanetwork(resolve(None, ALLOCATION).path)[0]
    with torch.no_grad():  # not the shipped one: a trial that ignored the URI would read that instead
        next(net.parameters()).add_(1.0)
    save_metanetwork(net, str(tmp_path / "allocator.pt"))
    uri = log_metanetwork(net, str(tmp_path / "allocator.pt"), run.info.run_id, "alloc")
    search = {"space": {"allocation": {"choice": ["uniform", "learned"]}}, "fixed": {}, "allocator": uri}
    settle_search_allocator(search, str(tmp_path / "out"))
    assert search["allocator"].startswith(str(tmp_path / "out" / "metanetworks"))  # every node reads it there
    drawn = trial_allocator({"allocation": "learned"}, search)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), drawn.state_dict().values()))
    assert trial_allocator({"allocation": "uniform"}, search) is None
    # a criterion is not an allocation metanetwork; an allocator no trial reads is a mistake: one line each
    _metanetwork(tmp_path / "criterion.pt")
    wrong = {"space": {"lr": {"choice": [0.01]}}, "fixed": {"allocation": "learned"}, "allocator": str(tmp_path / "criterion.pt")}
    with pytest.raises(BatchInputError, match=r"^allocator .*criterion.pt: edit 'scores' is not an allocation"):
        settle_search_allocator(wrong, str(tmp_path / "out"))
    unread = {"space": {"lr": {"choice": [0.01]}}, "fixed": {}, "allocator": uri}
    with pytest.raises(BatchInputError, match="no trial draws an allocation that reads one"):
        settle_search_allocator(unread, str(tmp_path / "out"))
