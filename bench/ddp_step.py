"""Meta-training steps under torch.distributed: the default objective's metanetwork wrapped in
DistributedDataParallel (NCCL on a GPU, Gloo on the CPU), over a few digits networks, through the
epoch loop Ray Train's workers run (``metanet.meta_training.run_epoch``). What ``meta_train.py
--gpu`` does on each worker, without Ray (whose wheel is too large to carry to a GPU machine here):
that the NCCL path trains, and how long a step takes. Prints seconds per step and the losses.

    python bench/ddp_step.py                    # NCCL when a GPU is present, else Gloo
    python bench/ddp_step.py --members 2 --epochs 1
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metanet import network_to_graph  # noqa: E402
from metanet.meta_training import make_member, run_epoch  # noqa: E402
from metanet.metanetwork import MetaNetConfig, MetaNetwork, edge_widths_of  # noqa: E402
from zoo.arch import build_model, resnet_spec  # noqa: E402
from zoo.data import load_digits  # noqa: E402
from zoo.meta_settings import DEFAULTS, check_settings, metanet_settings, train_config  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        data = load_digits()
        config = check_settings(dict(DEFAULTS, epochs=args.epochs))  # the default objective and its settings
        cfg = train_config(config)
        x = torch.zeros(data.input_shape)
        torch.manual_seed(0)
        models = [build_model(resnet_spec(8, (8, 12, 16), in_channels=1)).eval() for _ in range(args.members)]
        graphs = [network_to_graph(m, x) for m in models]
        net = MetaNetwork(MetaNetConfig(**metanet_settings(config, edge_widths_of(graphs)))).to(args.device)
        ddp = DistributedDataParallel(net, device_ids=[torch.device(args.device).index or 0] if cuda else None,
                                      find_unused_parameters=True)
        members = [make_member(f"net-{i}", m.to(args.device), g.to(args.device), cfg)
                   for i, (m, g) in enumerate(zip(models, graphs))]
        opt = torch.optim.AdamW(ddp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(0)
        times, losses = [], []
        for epoch in range(args.epochs):
            began = time.perf_counter()
            done = run_epoch(ddp, opt, members, data, cfg, epoch, gen)
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - began) / done["steps"])
            losses.append(done["task_loss"] / done["steps"])
            print(f"epoch {epoch + 1}: task loss {losses[-1]:.3f}, {1000 * times[-1]:.0f} ms per step", flush=True)
    finally:
        dist.destroy_process_group()
    steady = statistics.median(times[1:] or times)  # the first epoch pays for start-up
    print(f"{backend} on {args.device}: {args.members} members, objective {config['objective']}: "
          f"{1000 * steady:.0f} ms per meta-training step (median over epochs after the first)")
    return {"backend": backend, "ms_per_step": 1000 * steady, "losses": losses}


if __name__ == "__main__":
    main()
