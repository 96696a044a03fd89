"""Benchmark: vectorised Bellman DP against a pure-Python triple loop of the same recursion.

    python benchmarks/bench_dp.py [--sizes 100,500,1000] [--k 10]

Prints a table of times and checks that all give identical paths. Two baselines: the loop over
Python lists (the fastest pure-Python form) and the same loop reading the numpy array element by
element.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bossflow.bellman import bellman_paths


def python_dp(c: list[list[float]], k: int) -> tuple[list[int], float]:
    """V_1(i) = c[i][N]; V_k(i) = min_{j>i} c[i][j] + V_{k-1}(j): plain loops, first minimum wins."""
    n = len(c) - 1
    inf = float("inf")
    value = [c[i][n] if i < n else inf for i in range(n + 1)]
    choices = [None, [n] * (n + 1)]
    for _ in range(2, k + 1):
        new, arg = [inf] * (n + 1), [0] * (n + 1)
        for i in range(n + 1):
            row = c[i]
            for j in range(i + 1, n + 1):
                total = row[j] + value[j]
                if total < new[i]:
                    new[i], arg[i] = total, j
        value = new
        choices.append(arg)
    path = [0]
    for level in range(k, 0, -1):
        path.append(choices[level][path[-1]])
    return path, sum(c[a][b] for a, b in zip(path[:-1], path[1:]))


def numpy_indexed_dp(c: np.ndarray, k: int) -> list[int]:
    """The same triple loop reading a numpy array element by element (common in research code)."""
    n = c.shape[0] - 1
    value = [float(c[i, n]) if i < n else float("inf") for i in range(n + 1)]
    choices = [None, [n] * (n + 1)]
    for _ in range(2, k + 1):
        new, arg = [float("inf")] * (n + 1), [0] * (n + 1)
        for i in range(n + 1):
            for j in range(i + 1, n + 1):
                total = c[i, j] + value[j]
                if total < new[i]:
                    new[i], arg[i] = total, j
        value = new
        choices.append(arg)
    path = [0]
    for level in range(k, 0, -1):
        path.append(choices[level][path[-1]])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,500,1000")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        "| N | K | Python, lists (s) | Python, numpy indexing (s) | bossflow (ms) "
        "| speed-up vs lists | vs numpy indexing | same paths |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        c = rng.random((n + 1, n + 1))
        start = time.perf_counter()
        ref_path, _ = python_dp(c.tolist(), args.k)
        t_py = time.perf_counter() - start
        start = time.perf_counter()
        idx_path = numpy_indexed_dp(c, args.k)
        t_idx = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours = bellman_paths(c, [args.k])[args.k]
            times.append(time.perf_counter() - start)
        t_np = min(times)
        same = list(ours.indices) == ref_path == idx_path
        print(
            f"| {n} | {args.k} | {t_py:.2f} | {t_idx:.2f} | {t_np * 1e3:.1f} | {t_py / t_np:.0f}x "
            f"| {t_idx / t_np:.0f}x | {same} |"
        )


if __name__ == "__main__":
    main()
