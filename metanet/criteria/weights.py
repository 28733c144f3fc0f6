"""Weight criteria: which single weights of the pruned layers are zeroed first (unstructured and
N:M sparsity, ``metanet.weight_pruning``). Magnitude and random are in ``metanet.criteria.both``."""

from __future__ import annotations

import torch
from torch import nn

from metanet.criteria.base import Criterion, calibration_batches
from metanet.levels import Level


class Wanda(Criterion):
    """|w| times the L2 norm of the input feature it multiplies, over calibration batches (Sun et
    al., 2023, "A Simple and Effective Pruning Approach for LLMs"): a convolution's input feature is
    its input channel (every kernel position of the channel shares its norm), a Linear's its input
    dimension over every other axis (tokens, positions)."""

    name = "wanda"
    levels = frozenset({Level.WEIGHTS})
    data_driven = True

    def scores(self, model, layers, batches):
        sums = {n: torch.zeros(m.in_features if isinstance(m, nn.Linear) else m.in_channels, device=m.weight.device)
                for n, m in layers.items()}
        names = {m: n for n, m in layers.items()}

        def hook(module, inputs, _out):
            x = inputs[0].detach()
            axis = x.dim() - 1 if isinstance(module, nn.Linear) else 1
            sums[names[module]] += x.movedim(axis, 0).reshape(x.shape[axis], -1).square().sum(1)

        handles = [m.register_forward_hook(hook) for m in layers.values()]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for x, _ in calibration_batches(batches, self.name):
                    model(x)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        out = {}
        for n, m in layers.items():
            w = m.weight.detach()
            norm = sums[n].sqrt()
            if isinstance(m, nn.Linear):
                out[n] = w.abs() * norm[None, :]
            else:  # grouped convolutions: column c of the weight reads input channel (g * in/groups + c)
                per_group = w.shape[1]
                cols = norm.reshape(m.groups, per_group)  # [groups, in / groups]
                rows = cols.repeat_interleave(w.shape[0] // m.groups, 0)  # [out, in / groups]
                out[n] = w.abs() * rows.reshape(w.shape[0], per_group, *([1] * (w.dim() - 2)))
        return out

