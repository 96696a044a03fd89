"""Device check: the library on a CUDA device gives what it gives on the CPU.

    python benchmarks/gpu_check.py [--device cuda]

Prints a table: cost matrix (float64 sums) on the device vs the CPU, Euler sampling, a short
straightening run, and the throughput of the shipped digits UNet; then runs the quick demo on the
device. Needs a CUDA device; TF32 is turned off so float32 results are comparable.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import bossflow
from bossflow.field import SpiralField
from bossflow.pretrained import load_digits_field


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="runs/gpu_check")
    args = parser.parse_args()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else dev}")
    print("| check | result |")
    print("|---|---|")

    z = torch.randn(64, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cpu = bossflow.cost_matrix(SpiralField(), z, grid=50, batch_size=16)
    gpu = bossflow.cost_matrix(SpiralField(), z.to(dev), grid=50, batch_size=16)
    rel = np.abs(gpu.values - cpu.values).max() / np.abs(cpu.values).max()
    print(f"| cost matrix, spiral field, float64: max rel. diff device vs CPU | {rel:.1e} |")

    field = load_digits_field()
    noise = bossflow.NoiseSource((1, 8, 8), seed=0).take(256)
    s = bossflow.uniform(8)
    x_cpu = bossflow.sample(field, noise, s)
    x_dev = bossflow.sample(field.to(dev), noise.to(dev), s)
    assert x_dev.device.type == dev.type and x_dev.dtype == noise.dtype
    diff = float((x_dev.cpu() - x_cpu).abs().max())
    print(f"| digits UNet, 8 Euler steps, float32: max abs diff device vs CPU | {diff:.1e} |")
    cm_cpu = bossflow.cost_matrix(field.cpu(), noise[:64], grid=20)
    cm_dev = bossflow.cost_matrix(field.to(dev), noise[:64].to(dev), grid=20)
    rel = np.abs(cm_dev.values - cm_cpu.values).max() / np.abs(cm_cpu.values).max()
    print(f"| digits cost matrix (K_max 20, 64 noises): max rel. diff device vs CPU | {rel:.1e} |")

    for batch in (256, 4096):
        xb = torch.randn(batch, 1, 8, 8, device=dev)
        tb = torch.rand(batch, device=dev)
        with torch.no_grad():
            for _ in range(3):
                field(xb, tb)
            torch.cuda.synchronize(dev)
            start = time.perf_counter()
            for _ in range(20):
                field(xb, tb)
            torch.cuda.synchronize(dev)
        rate = 20 * batch / (time.perf_counter() - start)
        print(f"| digits UNet forward, batch {batch} | {rate:,.0f} evaluations/s |")

    from bossflow.pipeline import DemoConfig, run_demo

    start = time.perf_counter()
    run_demo(args.out, DemoConfig.quick(), device=dev, progress=False)
    print(
        f"| bossflow demo --quick on the device | finished in {time.perf_counter() - start:.1f} s |"
    )
    full = DemoConfig()
    start = time.perf_counter()
    run_demo(args.out + "_full", full, device=dev, progress=False)
    print(f"| full bossflow demo on the device | finished in {time.perf_counter() - start:.1f} s |")


if __name__ == "__main__":
    main()
