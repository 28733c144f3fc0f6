"""Building one zoo member: train from scratch, prune to the initial speed-up, finetune, evaluate,
convert to a graph. Plain Python; the Ray pipeline runs it as a task."""

from __future__ import annotations

import time
import traceback

import torch

from metanet.graph import network_to_graph
from metanet.prune import count, prune_to_speedup
from zoo.arch import arch_spec, build_model
from metanet.data import TaskData
from zoo.spec import MemberSpec
from zoo.store import ZooRecord
from metanet.train import TrainConfig, evaluate, train


def train_config(section: dict, seed: int) -> TrainConfig:
    fields = {k: v for k, v in section.items() if k in TrainConfig.__dataclass_fields__}
    if "milestones" in fields:
        fields["milestones"] = tuple(fields["milestones"])
    return TrainConfig(seed=seed, **fields)


def build_member(spec: dict, member: MemberSpec, data: TaskData) -> ZooRecord:
    """The zoo record of ``member``: metrics and graph, or status 'failed' with the error."""
    start = time.perf_counter()
    try:
        torch.manual_seed(member.seed)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU when the task was given one
        model = build_model(member.arch).to(device)
        x = torch.zeros(data.input_shape, device=device)
        macs0, _ = count(model, x)
        train(model, data, train_config(spec["train"], member.seed))
        if float(spec["initial_speedup"]) > 1:
            prune_to_speedup(model, x, float(spec["initial_speedup"]))
            train(model, data, train_config(spec["finetune"], member.seed + 1))
        model.eval()
        macs, params = count(model, x)
        metrics: dict = {"macs": macs, "params": params, "speedup": macs0 / macs}
        for split in ("train", "val", "test"):
            metrics[f"{split}_acc"], metrics[f"{split}_loss"] = evaluate(model, data, split)
        graph = network_to_graph(model, x).to("cpu")
        metrics["seconds"] = time.perf_counter() - start
        return ZooRecord(member.id, arch_spec(model), data.name, member.seed, graph, metrics, role=member.role)
    except Exception as err:  # recorded in the zoo, so the run goes on and the failure is visible
        where = traceback.extract_tb(err.__traceback__)[-1]
        msg = f"{type(err).__name__}: {err} (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})"
        return ZooRecord(member.id, member.arch, data.name, member.seed, None, status="failed", error=msg,
                         role=member.role, metrics={"seconds": time.perf_counter() - start})
