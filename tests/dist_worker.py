"""Work that tests/test_distributed.py runs on 2 ranks (torchrun) and on 1 process (in pytest).

``python tests/dist_worker.py SCENARIO OUT [ARGS]`` under torchrun; each scenario writes what the
test compares into ``OUT`` (rank 0) and, for replicated weights, one file per rank.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from bossflow import distributed as dist
from bossflow.bellman import bellman_schedules, cost_matrix
from bossflow.evaluation import EvalEntry, evaluate_methods
from bossflow.learn import LearnConfig, learn_sampler, teacher_endpoints
from bossflow.noise import STAGE_OFFSETS, NoiseSource, OffsetNoise
from bossflow.solvers import reference_solve
from bossflow.spec import load_model
from bossflow.straighten import StraightenConfig, make_pairs, straighten

KMAX, SAMPLES, PAIRS, BATCH = 20, 12, 12, 4  # 12 = 3 rounds of 2 x 4 at two ranks, uneven last


class Stop(Exception):
    """Raised by the callback to kill a run after a checkpoint."""


def field():
    return load_model("digits").field


def noise(stage: str) -> OffsetNoise:
    return OffsetNoise(NoiseSource((1, 8, 8), seed=3), STAGE_OFFSETS[stage])


def schedules(out: Path):
    """Cost matrix (cached in ``out``) and Bellman schedules for NFE 2 and 3."""
    cost = cost_matrix(
        field(), noise("schedule"), KMAX, BATCH, samples=SAMPLES, cache=out / "cost.npz"
    )
    return cost, bellman_schedules(cost, [2, 3])


def pairs(out: Path, scheds):
    return make_pairs(
        field(), noise("pairs"), scheds, out / "pairs", KMAX, samples=PAIRS, batch_size=BATCH
    )


def config(lora: int, iterations: int = 4, sharding: str = "ddp") -> StraightenConfig:
    return StraightenConfig(
        sharding=sharding,
        iterations=iterations,
        batch_size=4,
        warmup=2,
        lr=1e-3,
        ema_decay=0.9,
        lora_rank=lora,
        holdout=2,
        eval_every=2,
        checkpoint_every=3,
    )


def train(
    pair_store,
    schedule,
    lora: int,
    out: Path | None,
    iterations: int = 4,
    stop=None,
    sharding="ddp",
):
    losses = []

    def callback(info):
        losses.append(float(info["loss"]))
        if stop is not None and info["iteration"] == stop:
            raise Stop(f"stopped at iteration {stop}")

    conf = config(lora, iterations, sharding)
    result = straighten(field(), pair_store, schedule, conf, out, False, callback)
    result.losses = losses  # what the callback saw, step by step
    return result


def evaluate(scheds, out: Path) -> dict:
    """Reference solve, evaluation, teacher endpoints and a short data-parallel sampler learning
    (5 noises: an uneven split; batches of 2 split 1 + 1; margin 0 so the learned times are kept)."""
    z = noise("eval").take(5)
    reference = reference_solve(field(), z, steps=20)
    entries = [EvalEntry("bellman", field(), scheds[k], "euler") for k in (2, 3)]
    records, samples = evaluate_methods(entries, z, reference, None, None)
    teacher = teacher_endpoints(field(), z, steps=8, batch_size=2, cache=out / "teacher.pt")
    learned = learn_sampler(
        field(), z, teacher, 2, LearnConfig(iterations=3, batch_size=2, holdout=2, eval_every=1, margin=0),
        init=scheds[2], out_dir=out / "learn",
    )  # fmt: skip
    return {
        "reference": reference,
        "mse": [r.mse_to_reference for r in records],
        "samples": samples[("bellman", 2)],
        "teacher": teacher,
        "learned": learned.sampler.to_dict(),
        "learn_history": learned.history,
    }


def run_all(out: Path) -> dict:
    """Cost matrix, schedules, pairs, full and LoRA straightening: what the test compares."""
    cost, scheds = schedules(out)
    store = pairs(out, scheds)
    result = {
        "cost_sum": cost.sum,
        "cost_sumsq": cost.sumsq,
        "count": cost.count,
        "schedules": {k: s.tolist() for k, s in scheds.items()},
        "pairs": store.states[:],
        "shards": store.manifest["shards"],
    }
    result.update(evaluate(scheds, out))
    for lora in (0, 2):
        r = train(store, scheds[2], lora, None)
        result[f"weights_{lora}"] = {k: v.clone() for k, v in r.module.state_dict().items()}
        result[f"history_{lora}"] = r.history
        result[f"losses_{lora}"] = r.losses
        if lora:
            result["lora_adapters"] = {k: v.clone() for k, v in r.lora.state.items()}
    return result


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    dist.init_from_env()
    try:
        if scenario == "all":
            result = run_all(out)
            # every rank's LoRA adapters: drift between ranks shows up here
            result["adapters_by_rank"] = dist.all_gather_object(result["lora_adapters"])
            if dist.is_rank_zero():
                torch.save(result, out / "result.pt")
        elif scenario == "fsdp":  # sharded full fine-tuning; then a run killed after a checkpoint
            _, scheds = schedules(out)
            store = pairs(out, scheds)
            runs = {s: train(store, scheds[2], 0, None, sharding=s) for s in ("fsdp", "ddp")}
            if dist.is_rank_zero():
                torch.save(
                    {
                        s: {"weights": dict(r.module.state_dict()), "history": r.history}
                        for s, r in runs.items()
                    },
                    out / "fsdp.pt",
                )
            with contextlib.suppress(Stop):
                train(store, scheds[2], 0, out / "train", 9, stop=4, sharding="fsdp")
        elif scenario == "resume":  # straighten up to iteration `stop`, then die
            stop = int(sys.argv[3])
            _, scheds = schedules(out)
            store = pairs(out, scheds)
            try:
                train(store, scheds[2], int(sys.argv[4]), out / "train", 9, stop)
            except Stop:
                sys.exit(3)
            r = train(store, scheds[2], int(sys.argv[4]), out / "train", 9)
            if dist.is_rank_zero():
                torch.save(
                    {k: v.clone() for k, v in r.module.state_dict().items()}, out / "final.pt"
                )
    finally:
        dist.shutdown()


if __name__ == "__main__":
    main()
