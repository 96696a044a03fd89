"""Throughput of the Rectified Flow NCSN++ / DDPM++ network, and the cost of a BOSS cost matrix.

Prints a markdown table: forward passes per second of the full-size network (random weights, eval
mode, no grad) on the CPU and, if available, on CUDA with TF32 off and on; then, on CUDA, the wall
time of a cost matrix on a fine grid (default: 100 Euler steps over 256 samples, the paper's
schedule search).

    OMP_NUM_THREADS=2 python benchmarks/bench_ncsnpp.py --iters 3 --device cpu
    python benchmarks/bench_ncsnpp.py --device cuda
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch

from bossflow.field import RectifiedFlowField
from bossflow.models import NCSNpp, rectified_flow_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def _timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _cost_matrix_fn() -> Callable | None:
    """``bossflow.cost_matrix`` if this checkout has it (the benchmark runs without it)."""
    try:
        from bossflow import cost_matrix
    except ImportError:
        try:
            from bossflow.bellman.cost import cost_matrix
        except ImportError:
            return None
    return cost_matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10", help="built-in config (default: cifar10)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--iters", type=int, default=10, help="timed forward passes")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forward passes first")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, or auto (cpu, plus cuda if present)"
    )
    parser.add_argument("--samples", type=int, default=256, help="cost matrix: trajectories M")
    parser.add_argument("--grid", type=int, default=100, help="cost matrix: fine Euler steps N")
    parser.add_argument("--cost-batch-size", type=int, default=128, help="cost matrix batch")
    parser.add_argument("--skip-cost", action="store_true", help="skip the cost-matrix timing")
    args = parser.parse_args()

    if args.device == "auto":
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
    else:
        devices = [torch.device(args.device)]

    cfg = rectified_flow_config(args.config)
    base = NCSNpp(cfg).eval()
    n_params = sum(p.numel() for p in base.parameters())
    print(
        f"NCSN++ '{cfg.name}' {cfg.sample_shape}, {n_params / 1e6:.2f} M parameters; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    for device in devices:
        if device.type == "cuda":
            print(f"{device}: {torch.cuda.get_device_name(device)}")

    rows = []
    cost_rows = []
    cost_matrix = _cost_matrix_fn()
    for device in devices:
        net = base.to(device)
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(args.batch_size, *cfg.sample_shape, generator=gen, device=device)
        time_cond = torch.full((args.batch_size,), 500.0, device=device)
        settings = [("fp32", None)] if device.type != "cuda" else [("fp32", False), ("tf32", True)]
        for label, tf32 in settings:
            if tf32 is not None:
                _set_tf32(tf32)
            with torch.inference_mode():
                seconds = _timed(
                    functools.partial(net, x, time_cond), device, args.iters, args.warmup
                )
            rows.append((str(device), label, args.batch_size, seconds, args.batch_size / seconds))

            if device.type != "cuda" or args.skip_cost or cost_matrix is None:
                continue
            field = RectifiedFlowField(net).eval()
            noise = torch.randn(args.samples, *cfg.sample_shape, generator=gen, device=device)
            with torch.inference_mode():
                cost_matrix(field, noise, grid=2, batch_size=args.cost_batch_size)  # warm-up
                _sync(device)
                start = time.perf_counter()
                cost_matrix(field, noise, grid=args.grid, batch_size=args.cost_batch_size)
                _sync(device)
            cost_rows.append((str(device), label, time.perf_counter() - start))

    print()
    print("| device | precision | batch | ms / forward | images / s |")
    print("|---|---|---|---|---|")
    for device, label, batch, seconds, rate in rows:
        print(f"| {device} | {label} | {batch} | {seconds * 1e3:.1f} | {rate:.1f} |")

    if any(d.type == "cuda" for d in devices) and not args.skip_cost:
        print()
        if cost_matrix is None:
            print("cost matrix: skipped (bossflow.cost_matrix is not available in this checkout)")
        else:
            print(
                f"| device | precision | cost matrix: {args.grid} Euler steps x {args.samples} "
                f"samples (batch {args.cost_batch_size}), seconds |"
            )
            print("|---|---|---|")
            for device, label, seconds in cost_rows:
                print(f"| {device} | {label} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
