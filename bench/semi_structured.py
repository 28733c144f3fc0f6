"""Does 2:4 sparsity run faster? Dense against 2:4 semi-structured matrix products on a GPU.

For each weight shape (``--shapes OUTxIN``), a half-precision Linear layer's weight is masked 2:4
with ``metanet.weight_pruning.nm_mask`` (magnitude), then the same product ``x @ W.T`` over
``--tokens`` rows is timed dense and through ``torch.sparse.to_sparse_semi_structured`` (NVIDIA's
sparse tensor cores, compute capability 8.0 or newer), interleaved, median of ``--repeats``
rounds of ``--iters`` products each (CUDA events). The table gives both times and their ratio, and
checks that the sparse product equals the dense product of the masked weight.

Without a CUDA GPU it says so and measures nothing: the speed of 2:4 is a property of the kernels
on that hardware, not something a CPU run can stand in for.

    python bench/semi_structured.py
    python bench/semi_structured.py --shapes 4096x4096 11008x4096 --tokens 8192
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metanet.weight_pruning import nm_mask  # noqa: E402

DEFAULT_SHAPES = ["768x768", "3072x768", "768x3072", "4096x4096", "11008x4096"]


def parse_shape(text: str) -> tuple[int, int]:
    try:
        out, _, inp = text.lower().partition("x")
        shape = int(out), int(inp)
    except ValueError:
        raise SystemExit(f"semi_structured: --shapes {text!r} is not OUTxIN (e.g. 4096x4096)") from None
    if min(shape) < 64 or shape[0] % 64 or shape[1] % 64:
        raise SystemExit(f"semi_structured: --shapes {text!r}: both sizes must be multiples of 64 (the 2:4 kernels')")
    return shape


def time_ms(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    p.add_argument("--tokens", type=int, default=4096, help="rows of the input (batch x sequence)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    shapes = [parse_shape(s) for s in args.shapes]
    if not torch.cuda.is_available():
        print("semi_structured: no CUDA GPU here: 2:4 kernels run on NVIDIA GPUs (compute capability >= 8.0); "
              "nothing measured")
        return
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        print(f"semi_structured: {torch.cuda.get_device_name()} is compute capability {major}.{minor}: "
              "2:4 kernels need 8.0 or newer; nothing measured")
        return
    from torch.sparse import to_sparse_semi_structured

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16, {args.tokens} tokens, "
          f"median of {args.repeats} rounds x {args.iters} products\n")
    print("| weight (out x in) | dense ms | 2:4 ms | dense / 2:4 | max abs difference |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
        w = w * nm_mask(w.abs().float(), 2, 4).to(w.dtype)
        x = torch.randn(args.tokens, in_f, device="cuda", dtype=torch.float16)
        sparse = to_sparse_semi_structured(w)
        dense_out = torch.nn.functional.linear(x, w)
        sparse_out = torch.nn.functional.linear(x, sparse)
        diff = float((dense_out - sparse_out).abs().max())
        dense, semi = [], []
        for _ in range(args.repeats):  # interleaved: clock changes hit both alike
            dense.append(time_ms(lambda: torch.nn.functional.linear(x, w), args.iters))
            semi.append(time_ms(lambda: torch.nn.functional.linear(x, sparse), args.iters))
        d, s = statistics.median(dense), statistics.median(semi)
        print(f"| {out_f} x {in_f} | {d:.3f} | {s:.3f} | {d / s:.2f} | {diff:.3g} |")


if __name__ == "__main__":
    main()
