"""Benchmark: row-keyed dropout (straighten/dropout.py) against torch's own, per layer call.

    python benchmarks/bench_dropout.py [--device cpu|cuda] [--batch 64] [--shape 128,32,32]

Straightening keys every dropout mask by the row of the global batch, so N processes train with
the masks of one process: each process draws the whole batch's mask and keeps its rows. The table
gives the time of one forward call of ``nn.Dropout(0.15)`` (NCSN++ CIFAR-10's rate) on this
process's rows, for one process (all rows) and for the share of one of N processes, with torch's
dropout on the same rows beside it, and the fraction of elements dropped (which should be p).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from bossflow.straighten.dropout import RowKeyedDropout


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64, help="global batch (rows)")
    parser.add_argument("--shape", default="128,32,32", help="one row's activation shape")
    parser.add_argument("--processes", default="1,2,8", help="process counts to simulate")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.set_grad_enabled(False)
    layer = nn.Dropout(0.15).train()
    print(f"nn.Dropout(0.15) on rows of shape {shape}, global batch {args.batch}, {device}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| processes | rows per process | torch ms | keyed ms | keyed / torch | dropped |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in (int(p) for p in args.processes.split(",")):
        if args.batch % n:
            continue
        rows = args.batch // n
        x = torch.ones(rows, *shape, device=device)
        plain = timed(lambda x=x: layer(x), device, args.repeats)
        with RowKeyedDropout(layer, seed=0) as keyed:

            def call(x=x, rows=rows):
                with keyed.step(0, 0, rows, args.batch):
                    return layer(x)

            keyed_s = timed(call, device, args.repeats)
            dropped = float((call() == 0).float().mean())
        print(
            f"| {n} | {rows} | {plain * 1e3:.2f} | {keyed_s * 1e3:.2f} | "
            f"{keyed_s / plain:.2f} | {dropped:.4f} |"
        )


if __name__ == "__main__":
    main()
