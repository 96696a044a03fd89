"""Benchmark: learned samplers on the shipped digits model.

    python benchmarks/bench_learn.py [--nfe 4] [--solver ab2] [--bootstrap 5] [--quick]

Prints three tables (run one process at a time: two torch processes slow each other down here):

1. Time to learn one sampler against the time of the cost matrix it starts from (both on the
   same 256 noises, K_max = 100), and the held-out error reached.
2. Held-out error against the number of teacher noises (32 .. 1024; a quarter of them held out for
   early stopping), measured on 256 *other* noises against the 1000-step Euler reference of the
   evaluation, as a ratio to uniform Euler at the same NFE.
3. Bootstrap over noises (resampling the 256 cost-matrix noises with replacement): the spread of
   the Bellman schedule's times and of the learned sampler's times and held-out error.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bossflow import load_model
from bossflow.bellman import bellman_schedules, cost_matrix
from bossflow.bellman.cost import batch_costs, fine_trajectories
from bossflow.bellman.dp import bellman_paths
from bossflow.learn import LearnConfig, learn_sampler, sampler_error, teacher_endpoints
from bossflow.noise import STAGE_OFFSETS, NoiseSource, OffsetNoise
from bossflow.schedule import uniform
from bossflow.solvers import reference_solve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", type=int, default=4)
    parser.add_argument("--solver", default="ab2")
    parser.add_argument("--bootstrap", type=int, default=5)
    parser.add_argument("--counts", default="32,64,128,256,512,1024")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    iterations, eval_n, kmax, m, ref_steps = 200, 256, 100, 256, 1000
    if args.quick:
        counts, iterations, eval_n, kmax, m, ref_steps = [32, 64], 10, 32, 20, 32, 50
        args.bootstrap = min(args.bootstrap, 2)
    torch.manual_seed(0)
    field = load_model("digits").field
    source = NoiseSource((1, 8, 8), seed=0)
    config = LearnConfig(solver=args.solver, iterations=iterations, batch_size=64, patience=5)
    k = args.nfe

    # 1. learning time vs cost-matrix time ----------------------------------------------------
    z = OffsetNoise(source, STAGE_OFFSETS["schedule"]).take(m)
    start = time.perf_counter()
    cost = cost_matrix(field, z, grid=kmax, batch_size=256)
    cost_s = time.perf_counter() - start
    bellman = bellman_schedules(cost, [k])[k]
    start = time.perf_counter()
    teacher = teacher_endpoints(field, z, 100, "heun")
    teacher_s = time.perf_counter() - start
    start = time.perf_counter()
    result = learn_sampler(field, z, teacher, k, config, init=bellman)
    learn_s = time.perf_counter() - start
    print(f"\n## 1. Learning a {k}-NFE {args.solver} sampler on digits ({m} noises, 2 CPU cores)\n")
    print("| step | time (s) |")
    print("|---|---:|")
    print(f"| cost matrix (K_max = {kmax}, {m} noises) | {cost_s:.1f} |")
    print(f"| teacher (100 Heun steps, {m} noises) | {teacher_s:.1f} |")
    print(f"| learning ({result.iterations} Adam steps, batch 64) | {learn_s:.1f} |")
    print(
        f"\nheld-out MSE {result.heldout_error:.4g} (Bellman start: "
        f"{result.initial_heldout_error:.4g}), best at iteration {result.best_iteration}"
    )

    # 2. held-out error vs teacher noises -------------------------------------------------------
    ze = OffsetNoise(source, STAGE_OFFSETS["eval"]).take(eval_n)
    reference = reference_solve(field, ze, steps=ref_steps)
    base = sampler_error(field, ze, reference, uniform(k))
    bell = sampler_error(field, ze, reference, bellman)
    pool = OffsetNoise(source, STAGE_OFFSETS["pairs"]).take(max(counts))
    pool_teacher = teacher_endpoints(field, pool, 100, "heun")
    print(f"\n## 2. Error vs teacher noises (NFE {k}, {args.solver}; {eval_n} other noises)\n")
    print(f"uniform Euler MSE {base:.4g}; Bellman {bell:.4g} ({bell / base:.3f}x)\n")
    print("| teacher noises | held out | MSE to reference | ratio to uniform | learn s |")
    print("|---:|---:|---:|---:|---:|")
    for n in counts:
        start = time.perf_counter()
        r = learn_sampler(field, pool[:n], pool_teacher[:n], k, config, init=bellman)
        err = sampler_error(field, ze, reference, r.sampler)
        held = max(1, round(0.25 * n))
        print(
            f"| {n} | {held} | {err:.4g} | {err / base:.3f} | {time.perf_counter() - start:.0f} |"
        )

    # 3. bootstrap over noises ------------------------------------------------------------------
    per_sample = []
    for a in range(0, m, 64):
        states, vels = fine_trajectories(field, z[a : a + 64], uniform(kmax))
        per_sample.append(batch_costs(states, vels, uniform(kmax).times))
    per_sample = torch.cat(per_sample).numpy()  # (M, N+1, N+1)
    rng = np.random.default_rng(0)
    bell_times, learned_times, learned_err = [], [], []
    grid = uniform(kmax).times
    for _ in range(args.bootstrap):
        rows = rng.integers(0, m, size=m)
        path = bellman_paths(per_sample[rows].mean(0), [k])[k]
        bell_times.append(grid[list(path.indices)])
        # early stopping uses the last quarter of the resample (it may repeat training noises);
        # the error reported is on the separate evaluation noises
        r = learn_sampler(field, z[rows], teacher[rows], k, config, init=bellman)
        learned_times.append(r.sampler.times)
        learned_err.append(sampler_error(field, ze, reference, r.sampler) / base)
    bell_times, learned_times = np.array(bell_times), np.array(learned_times)
    print(f"\n## 3. Bootstrap over the {m} noises ({args.bootstrap} resamples, NFE {k})\n")
    print("| | times (mean ± sd over resamples) |")
    print("|---|---|")
    fmt = lambda a: ", ".join(f"{mu:.3f} ± {sd:.3f}" for mu, sd in zip(a.mean(0), a.std(0)))  # noqa: E731
    print(f"| Bellman | {fmt(bell_times)} |")
    print(f"| learned ({args.solver}) | {fmt(learned_times)} |")
    print(
        f"\nlearned, ratio to uniform on the evaluation noises: {np.mean(learned_err):.3f} ± "
        f"{np.std(learned_err):.3f} (min {np.min(learned_err):.3f}, max {np.max(learned_err):.3f})"
    )


if __name__ == "__main__":
    main()
