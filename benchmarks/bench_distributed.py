"""Benchmark: cost matrix, pairs and sampler learning on 1 and N CPU processes (torchrun, gloo).

    python benchmarks/bench_distributed.py [--nproc 2] [--samples 64] [--kmax 100] [--batch 16]

Runs the same work three ways, each in fresh processes: one process with one thread, one process
with ``nproc`` threads (what a single process gets from the same cores), and ``nproc`` processes
with one thread each under ``torchrun --standalone``. The work: ``cost_matrix`` of the shipped
digits model (``samples`` fine Euler trajectories of ``kmax`` steps) and ``make_pairs`` for the
Bellman NFE-4 schedule (``samples`` trajectories), then ``learn_sampler`` (Euler, NFE 4, from the
Bellman times, batch ``samples``, ``--learn-iterations`` iterations with a held-out evaluation every
10, teacher endpoints of ``kmax`` steps from ``samples`` noises). Reported: trajectories (learning:
iterations) per second of the slowest rank's wall time, after a warm-up call, and the largest
relative difference of the cost matrix and of the learned times from the one-process ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def work(out: Path, samples: int, kmax: int, batch: int, iterations: int) -> None:
    """What every launch runs; rank 0 writes ``out/result.json``."""
    import torch

    from bossflow import distributed as dist
    from bossflow.bellman import bellman_schedules, cost_matrix
    from bossflow.learn import LearnConfig, learn_sampler, teacher_endpoints
    from bossflow.noise import NoiseSource
    from bossflow.spec import load_model
    from bossflow.straighten import make_pairs

    dist.init_from_env("cpu")
    field = load_model("digits").field
    noise = NoiseSource((1, 8, 8), seed=0)
    cost_matrix(field, noise, kmax, batch, samples=dist.world_size() * batch)  # warm-up
    dist.barrier()
    start = time.perf_counter()
    cost = cost_matrix(field, noise, kmax, batch, samples=samples)
    cost_s = max(dist.all_gather_object(time.perf_counter() - start))
    schedule = bellman_schedules(cost, [4])[4]
    with tempfile.TemporaryDirectory() as tmp:
        folder = dist.broadcast_object(tmp)  # one store for every rank (one machine here)
        dist.barrier()
        start = time.perf_counter()
        make_pairs(field, noise, schedule, Path(folder) / "pairs", kmax, samples, batch)
        pairs_s = max(dist.all_gather_object(time.perf_counter() - start))
        dist.barrier()
    z = noise.take(samples + samples // 4)  # `samples` to learn on, a quarter more held out
    teacher = teacher_endpoints(field, z, steps=kmax, batch_size=batch)
    config = LearnConfig(
        iterations=iterations, batch_size=samples, holdout=samples // 4, eval_every=10, margin=0
    )
    dist.barrier()
    start = time.perf_counter()
    learned = learn_sampler(field, z, teacher, 4, config, init=schedule)
    learn_s = max(dist.all_gather_object(time.perf_counter() - start))
    if dist.is_rank_zero():
        np.save(out / "cost.npy", cost.sum)
        np.save(out / "times.npy", learned.sampler.times)
        result = {"cost_s": cost_s, "pairs_s": pairs_s, "learn_s": learn_s}
        result["threads"] = torch.get_num_threads()
        (out / "result.json").write_text(json.dumps(result))
    dist.shutdown()


def launch(nproc: int, threads: int, args: argparse.Namespace, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "BOSSFLOW_PROGRESS": "0"}
    me = [str(Path(__file__).resolve()), "--worker", str(out)]
    me += ["--samples", str(args.samples), "--kmax", str(args.kmax), "--batch", str(args.batch)]
    me += ["--learn-iterations", str(args.learn_iterations)]
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*run, f"--nproc_per_node={nproc}", *me]
    subprocess.run(cmd, env=env, check=True)
    result = json.loads((out / "result.json").read_text())
    result["cost"] = np.load(out / "cost.npy")
    result["times"] = np.load(out / "times.npy")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--kmax", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--learn-iterations", type=int, default=20)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        work(args.worker, args.samples, args.kmax, args.batch, args.learn_iterations)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, nproc, threads in (
            ("1 process, 1 thread", 1, 1),
            (f"1 process, {args.nproc} threads", 1, args.nproc),
            (f"{args.nproc} processes (gloo), 1 thread each", args.nproc, 1),
        ):
            out = Path(tmp) / f"{nproc}-{threads}"
            out.mkdir()
            rows.append((label, launch(nproc, threads, args, out)))
    ref, ref_times = rows[0][1]["cost"], rows[0][1]["times"]
    print(
        f"\ndigits model, {args.samples} trajectories of {args.kmax} Euler steps, batch "
        f"{args.batch}; trajectories (learning: iterations) per second, slowest rank\n"
    )
    print(
        "| run | cost matrix (traj/s) | pairs (traj/s) | learning (it/s) | cost matrix vs "
        "1 process (max rel.) | learned times vs 1 process (max rel.) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows:
        diff = np.abs(r["cost"] - ref).max() / np.abs(ref).max()
        tdiff = np.abs(r["times"] - ref_times).max() / np.abs(ref_times).max()
        print(
            f"| {label} | {args.samples / r['cost_s']:.0f} | {args.samples / r['pairs_s']:.0f} "
            f"| {args.learn_iterations / r['learn_s']:.1f} | {diff:.1e} | {tdiff:.1e} |"
        )


if __name__ == "__main__":
    main()
