"""Benchmark: cost-matrix accumulation, and its overhead over the network evaluations it needs.

    python benchmarks/bench_cost.py [--samples 64] [--kmax 100] [--shape 3,32,32] [--unet-samples 64]

Part 1 times three ways to turn one batch of fine trajectories (M samples, N + 1 states of D values)
into the (N + 1, N + 1) cost matrix: the naive per-pair loop of paper eq. 5 (float64, vectorised over
samples only), bossflow's float64 Gram expansion (the fast path), and the same Gram expansion in
float32 (to show why it is not used). Errors are relative to the per-pair loop: the largest absolute
difference over the largest entry, and the same on the near-diagonal band j = i + 2, where costs are
smallest.

Part 2 times a whole ``cost_matrix`` call on a small UNet against the bare M x N network evaluations
(the fine Euler trajectories) it needs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bossflow.bellman import batch_costs, cost_matrix, fine_trajectories
from bossflow.schedule import uniform


def naive(states: torch.Tensor, vels: torch.Tensor, times: np.ndarray) -> np.ndarray:
    x, v = states.double(), vels.double()
    n1 = x.shape[1]
    c = np.zeros((n1, n1))
    for i in range(n1 - 1):
        for j in range(i + 1, n1):
            r = x[:, i] + float(times[j] - times[i]) * v[:, i] - x[:, j]
            c[i, j] = float(r.pow(2).flatten(1).sum(1).mean())
    return c


def gram32(states: torch.Tensor, vels: torch.Tensor, times: np.ndarray) -> np.ndarray:
    """The Gram expansion of batch_costs, but in float32 throughout."""
    b, n1 = states.shape[:2]
    x = states.reshape(b, n1, -1).float()
    v = vels.reshape(b, n1 - 1, -1).float()
    tau = torch.tensor(times, dtype=torch.float32)
    d = (tau[None, :] - tau[:, None])[:-1]
    gxx, gvx = x @ x.transpose(1, 2), v @ x.transpose(1, 2)
    sx, sv = gxx.diagonal(dim1=1, dim2=2), v.pow(2).sum(-1)
    vxi = gvx.diagonal(dim1=1, dim2=2)
    c = sx[:, :-1, None] + sx[:, None, :] - 2 * gxx[:, :-1] + 2 * d * (vxi[:, :, None] - gvx)
    c = c + d.pow(2) * sv[:, :, None]
    out = np.zeros((n1, n1))
    out[:-1] = c.mean(0).double().numpy()
    return np.triu(out, 1)


def timed(fn, repeats: int = 3):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def small_unet(channels: int) -> torch.nn.Module:
    try:
        from bossflow.models.unet import DigitUNet

        return DigitUNet(in_channels=channels)
    except ImportError:  # pragma: no cover - the shipped UNet is part of the package
        raise SystemExit("bossflow.models.unet.DigitUNet is needed for part 2") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--kmax", type=int, default=100)
    parser.add_argument("--shape", default="3,32,32")
    parser.add_argument("--unet-samples", type=int, default=64, help="0 skips part 2")
    parser.add_argument("--unet-kmax", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    grid = uniform(args.kmax)
    torch.manual_seed(0)

    # Part 1: a curved, non-trivial set of trajectories from a random smooth field.
    w = torch.randn(int(np.prod(shape)), 16) / 8

    def field(x, t):
        flat = x.flatten(1)
        return (torch.tanh(flat @ w) @ w.T * (1 + 3 * t[:, None]) - flat).view_as(x)

    z = torch.randn(args.samples, *shape)
    states, vels = fine_trajectories(field, z, grid)
    t_naive, ref = timed(lambda: naive(states, vels, grid.times), repeats=1)
    t_fast, fast = timed(lambda: batch_costs(states, vels, grid.times).mean(0).numpy())
    t_32, g32 = timed(lambda: gram32(states, vels, grid.times))
    band = np.diagonal(ref, 2)

    def errs(c):
        return np.abs(c - ref).max() / np.abs(ref).max(), np.abs(
            np.diagonal(c, 2) - band
        ).max() / np.abs(band).max()

    d = int(np.prod(shape))
    print(
        f"Part 1: M = {args.samples}, D = {d}, N = {args.kmax}, torch threads = {torch.get_num_threads()}"
    )
    print("| method | time (s) | speed-up | max rel. error | rel. error on j = i + 2 |")
    print("|---|---|---|---|---|")
    for name, t, c in [
        ("per-pair loop (float64)", t_naive, ref),
        ("Gram float64 (bossflow)", t_fast, fast),
        ("Gram float32", t_32, g32),
    ]:
        e_all, e_band = errs(c)
        print(f"| {name} | {t:.3f} | {t_naive / t:.1f}x | {e_all:.1e} | {e_band:.1e} |")

    if args.unet_samples < 1:
        return
    # Part 2: overhead of the accumulation over the network evaluations.
    net = small_unet(shape[0]).eval()
    params = sum(p.numel() for p in net.parameters())
    zu = torch.randn(args.unet_samples, *shape)
    ugrid = uniform(args.unet_kmax)

    def evals_only():
        for a in range(0, args.unet_samples, args.batch_size):
            fine_trajectories(net, zu[a : a + args.batch_size], ugrid)

    t_eval, _ = timed(evals_only, repeats=1)
    t_cost, _ = timed(
        lambda: cost_matrix(net, zu, grid=ugrid, batch_size=args.batch_size), repeats=1
    )
    print()
    print(
        f"Part 2: small UNet ({params / 1e6:.2f} M parameters), M = {args.unet_samples}, N = {args.unet_kmax}, shape {shape}"
    )
    print("| what | time (s) |")
    print("|---|---|")
    print(f"| M x N network evaluations (fine trajectories only) | {t_eval:.2f} |")
    print(f"| whole cost_matrix call | {t_cost:.2f} |")
    print(f"| overhead | {100 * (t_cost / t_eval - 1):.1f}% |")


if __name__ == "__main__":
    main()
