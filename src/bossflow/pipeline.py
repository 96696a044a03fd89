"""The end-to-end job: Bellman schedules -> pairs -> straightening -> evaluation -> report.

:func:`run_demo` runs it on the embedded default (the shipped ``digits`` UNet); every stage writes
its output under ``out`` as it goes and a rerun skips or resumes what is already there, so an
interrupted demo loses at most one batch or one checkpoint interval.

Noises never overlap between stages: sample ``m`` of a stage is ``NoiseSource(seed)`` at index
``offset + m`` with a different offset per stage (schedules, straightening pairs, evaluation).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist
from .bellman import bellman_schedules, cost_matrix
from .errors import ConfigError
from .evaluation import EvalEntry, evaluate_methods, synchronize
from .io import atomic_write_text, ensure_dir
from .learn import start_steps
from .noise import STAGE_OFFSETS, NoiseSource, OffsetNoise
from .schedule import edm, uniform
from .solvers import reference_solve

__all__ = ["DemoConfig", "run_demo", "OffsetNoise", "STAGE_OFFSETS", "evaluate_methods"]


#: the share of the demo's pair noises held out for the straightening runs' held-out error
PAIR_HOLDOUT = 0.1


@dataclass
class DemoConfig:
    """Sizes of the demo. The defaults are the full demo (about 5 minutes on 2 CPU cores).

    Attributes:
        seed: seeds every noise and every training run.
        kmax: intervals N of the fine grid for the cost matrix and the pairs.
        schedule_samples: noises M averaged in the cost matrix.
        nfes: budgets evaluated with uniform, EDM and Bellman Euler.
        straighten_nfes: budgets for which BOSS (full and LoRA) is trained.
        pair_samples: training noises for straightening (a slice of them is held out).
        iterations: fine-tuning iterations per run (BOSS, BOSS-LoRA and reflow alike).
        batch_size: fine-tuning batch size.
        lr: fine-tuning learning rate (full fine-tuning; LoRA uses ``lora_lr``).
        lora_rank: LoRA rank.
        lora_lr: LoRA learning rate (adapters start at zero and need a larger step).
        eval_samples: held-out evaluation noises.
        reference_steps: Euler steps of the reference solve.
        batch: trajectories integrated at once in the schedule and pair stages.
        learn_nfes: budgets for which a sampler is learned on the pretrained model (``learned``).
        boss_learn_nfes: budgets for which a sampler is learned on the BOSS model
            (``boss-learned``); among ``straighten_nfes``.
        learn_solvers: solver families learned at each budget; the best on held-out noises is kept.
        learn_samples: noises of the sampler learning (the cost matrix's first ones; a quarter
            is held out for early stopping and the choice of solver).
        teacher_steps: Heun steps of the teacher solve from each of those noises.
        learn_iterations: Adam steps per learned sampler at most.
        learn_batch_size: noises per Adam step.
        learn_lr: Adam's learning rate on the sampler's parameters.
        model: the embedded model: ``digits`` or ``digits-cond`` (class-conditional, sampled
            with classifier-free guidance; noise m of every stage gets label m mod 10).
        guidance_scale: the guidance scale of ``digits-cond`` (default: the one recorded with
            its weights).
    """

    seed: int = 0
    kmax: int = 100
    schedule_samples: int = 256
    nfes: tuple[int, ...] = (2, 4, 6, 8)
    straighten_nfes: tuple[int, ...] = (2, 4)
    pair_samples: int = 1024
    iterations: int = 400
    batch_size: int = 64
    lr: float = 2e-4
    lora_rank: int = 4
    lora_lr: float = 2e-3
    eval_samples: int = 256
    reference_steps: int = 1000
    batch: int = 256
    learn_nfes: tuple[int, ...] = (2, 4, 6, 8)
    boss_learn_nfes: tuple[int, ...] = (2, 4)
    learn_solvers: tuple[str, ...] = ("euler", "ab2")
    learn_samples: int = 256
    teacher_steps: int = 100
    learn_iterations: int = 200
    learn_batch_size: int = 64
    learn_lr: float = 0.05
    model: str = "digits"
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        if not set(self.learn_nfes) <= set(self.nfes):
            raise ConfigError(
                f"learn_nfes {list(self.learn_nfes)} must be among nfes {list(self.nfes)}"
            )
        if not set(self.boss_learn_nfes) <= set(self.straighten_nfes):
            raise ConfigError(
                f"boss_learn_nfes {list(self.boss_learn_nfes)} must be among straighten_nfes "
                f"{list(self.straighten_nfes)}: a sampler is learned on a straightened model"
            )
        if self.learn_samples > self.schedule_samples:
            raise ConfigError(
                f"learn_samples {self.learn_samples} must not exceed schedule_samples "
                f"{self.schedule_samples}: the sampler is learned on the cost matrix's noises"
            )

        from .solvers import SOLVERS

        unknown = [x for x in self.learn_solvers if x not in SOLVERS]
        if unknown:  # checked now, not at stage 3 after the straightening
            raise ConfigError(
                f"unknown learn_solvers entry {unknown[0]!r}; choose from {', '.join(SOLVERS)}"
            )
        from .learn import LearnConfig, _holdout
        from .straighten.train import _holdout_indices

        try:  # the learning's own checks, now rather than at stage 3
            _holdout(self.learn_samples, LearnConfig().holdout)
        except ConfigError:
            raise ConfigError(
                f"learn_samples {self.learn_samples} leaves no noise to learn on after the "
                "held-out quarter; give at least 2"
            ) from None
        for k in sorted(set(self.learn_nfes) | set(self.boss_learn_nfes)):
            if not start_steps(self.learn_solvers, k):
                raise ConfigError(
                    f"none of learn_solvers {', '.join(self.learn_solvers)} can spend exactly {k} "
                    "evaluations; add euler or ab2, or drop that NFE"
                )
        try:  # the straightening runs' split of the pair noises
            _holdout_indices(self.pair_samples, PAIR_HOLDOUT)
        except ConfigError:
            raise ConfigError(
                f"pair_samples {self.pair_samples} leaves no noise to fine-tune on after the "
                "held-out tenth; give at least 2"
            ) from None
        if self.eval_samples < 2:
            raise ConfigError(
                f"eval_samples {self.eval_samples}: the Fréchet distance needs at least 2 samples"
            )
        if self.model not in ("digits", "digits-cond"):
            raise ConfigError(
                f"the demo runs on the embedded models digits and digits-cond, not {self.model!r}"
            )
        if self.guidance_scale is not None and self.model != "digits-cond":
            raise ConfigError("guidance_scale is for the class-conditional digits-cond model")
        if not set(self.straighten_nfes) <= set(self.nfes):
            raise ConfigError(
                f"straighten_nfes {list(self.straighten_nfes)} must be among nfes "
                f"{list(self.nfes)}: the report compares BOSS with the baselines at the same NFE"
            )

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A sub-minute version for tests and smoke runs (tiny sizes, same code path)."""
        small = cls(
            kmax=20,
            schedule_samples=32,
            nfes=(2, 4),
            straighten_nfes=(2,),
            pair_samples=96,
            iterations=12,
            batch_size=32,
            eval_samples=64,
            reference_steps=100,
            batch=64,
            learn_nfes=(2, 4),
            boss_learn_nfes=(2,),
            learn_samples=32,
            teacher_steps=20,
            learn_iterations=10,
            learn_batch_size=16,
        )
        return replace(small, **overrides)


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


def _schedule_stage(model, cfg: DemoConfig, out: Path, source: NoiseSource, progress: bool, cond):
    cost = cost_matrix(
        model.field,
        OffsetNoise(source, STAGE_OFFSETS["schedule"]),
        grid=cfg.kmax,
        batch_size=cfg.batch,
        samples=cfg.schedule_samples,
        cache=out / "cost_matrix.npz",
        progress=progress,
        meta={"model": model.model_id, "seed": cfg.seed, "kmax": cfg.kmax},
        cond=cond,
    )
    shown = set(cfg.nfes) | set(cfg.straighten_nfes)
    # the learned samplers start from the Bellman times of their own step count (Heun at NFE 4:
    # the 2-step schedule), like `bossflow schedule --method learned`
    starts = {  # a family that cannot spend k is skipped
        steps
        for k in {*cfg.learn_nfes, *cfg.boss_learn_nfes}
        for steps in start_steps(cfg.learn_solvers, k).values()
    }
    schedules = bellman_schedules(cost, sorted(shown | starts))
    for k in sorted(shown):
        schedules[k].save(out / f"schedule_nfe{k}.json")
    return cost, schedules


def _straighten_stage(model, cfg, out, source, schedules, progress, cond):
    from .straighten import StraightenConfig, make_pairs, save_straightened, straighten

    wanted = [schedules[k] for k in cfg.straighten_nfes]
    pairs = make_pairs(
        model.field,
        OffsetNoise(source, STAGE_OFFSETS["pairs"]),
        wanted,
        out / "pairs",
        fine_grid=cfg.kmax,
        samples=cfg.pair_samples,
        batch_size=cfg.batch,
        progress=progress,
        meta={"model": model.model_id, "seed": cfg.seed},
        cond=cond,
    )
    base = StraightenConfig(
        iterations=cfg.iterations,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup=max(1, cfg.iterations // 20),
        seed=cfg.seed,
        eval_every=max(1, cfg.iterations // 10),
        checkpoint_every=max(1, cfg.iterations // 4),
        holdout=PAIR_HOLDOUT,
        # Every run keeps its last weights: "the same iterations" for BOSS and reflow alike. The
        # held-out one-step error is still recorded in the history (results.json) for each run.
        select="last",
    )
    runs: dict[tuple[str, int], Any] = {}
    for k in cfg.straighten_nfes:
        for method, conf in (
            ("boss", base),
            ("boss-lora", replace(base, lora_rank=cfg.lora_rank, lr=cfg.lora_lr)),
        ):
            _log(progress, f"straightening: {method}, NFE {k}, {cfg.iterations} iterations")
            result = straighten(
                model.field, pairs, schedules[k], conf, out / f"{method}-nfe{k}", progress,
                cond=cond,
            )  # fmt: skip
            save_straightened(result, out / f"{method}-nfe{k}" / "model.safetensors")
            runs[(method, k)] = result
    # Reflow does not depend on the budget: one run, the same iterations as each BOSS run.
    _log(progress, f"straightening: reflow baseline, {cfg.iterations} iterations")
    reflow = straighten(
        model.field,
        pairs,
        schedules[cfg.straighten_nfes[0]],
        replace(base, objective="reflow"),
        out / "reflow",
        progress,
        cond=cond,
    )
    save_straightened(reflow, out / "reflow" / "model.safetensors")
    for k in cfg.straighten_nfes:
        runs[("reflow", k)] = reflow
    return pairs, runs


def _learn_stage(model, cfg: DemoConfig, out: Path, source, bellman, runs, progress: bool, cond):
    """Learned samplers on the pretrained model (``learned``) and on BOSS (``boss-learned``).

    The teacher is a Heun solve of the pretrained model from the cost matrix's first noises
    (cached). BOSS was trained to shortcut the pretrained trajectories, so its sampler is learned
    against the same teacher, starting from the Bellman grid it was trained on.
    """
    from dataclasses import replace as _replace

    from .learn import LearnConfig, learn_best_sampler, teacher_endpoints

    z = OffsetNoise(source, STAGE_OFFSETS["schedule"]).take(cfg.learn_samples)
    _log(progress, f"  teacher: {cfg.teacher_steps} Heun steps from {cfg.learn_samples} noises")
    teacher = teacher_endpoints(
        model.field, z, cfg.teacher_steps, "heun", cfg.batch, out / "teacher.pt", progress, cond
    )
    config = LearnConfig(
        iterations=cfg.learn_iterations,
        batch_size=cfg.learn_batch_size,
        lr=cfg.learn_lr,
        seed=cfg.seed,
    )
    prov = {"model": model.model_id, "seed": cfg.seed, "teacher": f"heun {cfg.teacher_steps}"}
    learned, boss_learned = {}, {}
    jobs = [("learned", k, model.field) for k in cfg.learn_nfes]
    jobs += [("boss-learned", k, runs[("boss", k)].sampling_field) for k in cfg.boss_learn_nfes]
    for label, k, fld in jobs:
        _log(progress, f"  {label}, NFE {k}: {', '.join(cfg.learn_solvers)}")
        inits = bellman  # by step count: each family starts from its own Bellman schedule
        best, every = learn_best_sampler(
            fld, z, teacher, k, cfg.learn_solvers, _replace(config), inits, None,
            out / f"{label}-nfe{k}", progress, {**prov, "field": label}, cond,
        )  # fmt: skip
        (learned if label == "learned" else boss_learned)[k] = (best, every)
        for solver, r in every.items():
            mark = "*" if r is best else " "
            _log(progress, f"   {mark}{solver:>6}: held-out MSE {r.heldout_error:.4g} "
                 f"(from {r.initial_heldout_error:.4g}), {r.iterations} iterations")  # fmt: skip
    return learned, boss_learned


def run_demo(
    out: str | Path = "runs/demo",
    config: DemoConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Run the whole method on the embedded default and write a report in ``out``.

    Stages (each resumable): Bellman schedules for ``config.nfes`` -> straightening pairs ->
    BOSS and BOSS-LoRA for ``config.straighten_nfes`` and a reflow baseline at the same iterations
    -> learned samplers on the base and BOSS models -> evaluation of uniform / EDM / Bellman Euler,
    learned, BOSS, BOSS-LoRA, BOSS-learned, reflow and a fine reference on held-out noises ->
    ``report.md`` and ``results.json``.

    Under torchrun every process calls it (the work is split by sample index); only rank 0
    prints and writes the shared files.

    Returns:
        The path of ``report.md``.

    Raises:
        BossflowError: another run holds ``out`` (see :func:`bossflow.io.output_lock`).
    """
    from .io import output_lock

    progress = progress and dist.is_rank_zero()  # stage lines and bars: once per job
    with output_lock(out, "bossflow run_demo") as folder:
        return _run_demo_locked(folder, config, device, progress)


def _run_demo_locked(
    out: Path, config: DemoConfig | None, device: str | torch.device, progress: bool
) -> Path:
    """:func:`run_demo`'s work, while it holds the lock on ``out``."""
    from .conditioning import prepare_conditioning
    from .data import load_dataset
    from .metrics import evaluate_samples, frechet_backend
    from .pretrained import load_digits_classifier
    from .report import markdown_table, text_grid, write_report
    from .spec import load_model
    from .straighten.train import check_batch_split

    cfg = config or DemoConfig()
    check_batch_split(cfg.batch_size, "the demo's fine-tuning batch (--batch-size)")  # first
    out = ensure_dir(out)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, device=device)
    # a conditional model runs guided everywhere; noise m of each stage gets label m mod 10
    conditioning = prepare_conditioning(
        model.field, model.info, guidance_scale=cfg.guidance_scale, device=device
    )
    model = replace(model, field=conditioning.field)
    cond = conditioning.cond
    if cond is not None:
        _log(progress, f"conditioning: {conditioning.description}")
    source = NoiseSource(model.sample_shape, seed=cfg.seed, device=device)
    timings: dict[str, float] = {}

    _log(progress, f"[1/5] Bellman schedules (K_max={cfg.kmax}, {cfg.schedule_samples} noises)")
    start = time.perf_counter()
    cost, bellman = _schedule_stage(
        model, cfg, ensure_dir(out / "schedule"), source, progress, cond
    )
    timings["schedules"] = time.perf_counter() - start

    _log(progress, f"[2/5] straightening pairs and fine-tuning (NFE {list(cfg.straighten_nfes)})")
    start = time.perf_counter()
    _, runs = _straighten_stage(
        model, cfg, ensure_dir(out / "straighten"), source, bellman, progress, cond
    )
    timings["straighten"] = time.perf_counter() - start

    _log(progress, f"[3/5] learned samplers (NFE {list(cfg.learn_nfes)}; on BOSS "
         f"{list(cfg.boss_learn_nfes)})")  # fmt: skip
    start = time.perf_counter()
    learned, boss_learned = _learn_stage(
        model, cfg, ensure_dir(out / "learn"), source, bellman, runs, progress, cond
    )
    for k, (best, _) in learned.items():
        best.sampler.save(out / "schedule" / f"learned_nfe{k}.json")
    for k, (best, _) in boss_learned.items():
        best.sampler.save(out / "straighten" / f"boss-nfe{k}" / f"learned_nfe{k}.json")
    timings["learn"] = time.perf_counter() - start

    _log(progress, f"[4/5] evaluation on {cfg.eval_samples} held-out noises")
    start = time.perf_counter()
    noise = OffsetNoise(source, STAGE_OFFSETS["eval"])(range(cfg.eval_samples))
    _log(progress, f"  reference solve: {cfg.reference_steps} Euler steps per noise")
    eval_cond = conditioning.rows(cfg.eval_samples)
    synchronize(noise.device)
    ref_start = time.perf_counter()
    reference = reference_solve(model.field, noise, steps=cfg.reference_steps, cond=eval_cond)
    synchronize(noise.device)  # the GPU's work done, not only queued
    ref_wall = time.perf_counter() - ref_start
    data = load_dataset(model.dataset or "digits", "heldout")
    classifier = load_digits_classifier(device=device)
    with torch.no_grad():
        accuracy = float(
            (classifier(data.images.to(device)).argmax(1).cpu() == data.labels).float().mean()
        )
    heldout_images = data.images.to(device)

    methods: list[EvalEntry] = []
    for k in cfg.nfes:
        methods += [
            EvalEntry("uniform", model.field, uniform(k)),
            EvalEntry("edm", model.field, edm(k)),
            EvalEntry("bellman", model.field, bellman[k]),
        ]
    for k in cfg.straighten_nfes:
        # BOSS runs on the Bellman grid it was trained for; reflow, like any reflow model, on uniform.
        for method, schedule in (
            ("boss", bellman[k]),
            ("boss-lora", bellman[k]),
            ("reflow", uniform(k)),
        ):
            run = runs[(method, k)]
            field = run.sampling_field
            methods.append(EvalEntry(method, field, schedule, iterations=run.iterations))
    for _k, (best, _) in sorted(learned.items()):
        methods.append(EvalEntry("learned", model.field, best.sampler))
    for k, (best, _) in sorted(boss_learned.items()):
        run = runs[("boss", k)]
        methods.append(
            EvalEntry("boss-learned", run.sampling_field, best.sampler, iterations=run.iterations)
        )
    features = classifier.features
    records, samples = evaluate_methods(
        methods, noise, reference, heldout_images, features, print if progress else None, eval_cond
    )
    # The reference's own row: zero error by definition, and its Fréchet distance to the data.
    records.append(
        evaluate_samples(
            reference,
            reference,
            heldout_images,
            features,
            "reference",
            cfg.reference_steps,
            ref_wall,
        )
    )
    timings["evaluation"] = time.perf_counter() - start
    class_agreement = None
    if eval_cond is not None:  # per-class check: does the classifier see the asked-for digit?
        labels = eval_cond["class_labels"].cpu()
        with torch.no_grad():
            class_agreement = {
                f"{label}-nfe{k}": float((classifier(x).argmax(1).cpu() == labels).float().mean())
                for (label, k), x in samples.items()
            }
            class_agreement["reference"] = float(
                (classifier(reference).argmax(1).cpu() == labels).float().mean()
            )

    _log(progress, "[5/5] report")

    def grid_rows(k: int) -> dict[str, torch.Tensor]:
        """The same methods, in the same order, in every sample grid."""
        shown = ("uniform", "edm", "bellman", "learned", "boss", "boss-lora", "boss-learned")
        rows = {
            f"{m} ({k} NFE)": samples[(m, k)][:16].cpu()
            for m in (*shown, "reflow")
            if (m, k) in samples
        }
        return rows | {f"reference ({cfg.reference_steps} steps)": reference[:16].cpu()}

    grid_nfe = cfg.straighten_nfes[0]
    rows = grid_rows(grid_nfe)
    caption = "Samples at {} NFE (one row per method, same noise in each column)"
    if cond is not None:
        caption += "; column m is class m mod 10"
    grids = {"samples.png": (caption.format(grid_nfe), rows)}
    grids |= {
        f"samples_nfe{k}.png": (caption.format(k), grid_rows(k)) for k in cfg.straighten_nfes[1:]
    }
    plotted = {f"uniform ({k})": uniform(k) for k in cfg.straighten_nfes}
    plotted |= {f"edm ({k})": edm(k) for k in cfg.straighten_nfes}
    plotted |= {f"bellman ({k})": bellman[k] for k in cfg.nfes}
    plotted |= {f"learned ({k})": best.sampler for k, (best, _) in learned.items()}
    timings["total"] = time.perf_counter() - t0
    extra = {
        "model": model.model_id,
        "conditioning": conditioning.description,
        "class_agreement": class_agreement,
        "config": asdict(cfg),
        "device": str(device),
        "torch": torch.__version__,
        "classifier_heldout_accuracy": accuracy,
        "frechet_backend": frechet_backend(),
        "heldout_images": int(data.images.shape[0]),
        "cost_matrix_samples": cost.count,
        "timings_s": timings,
        "schedules": {str(k): s.tolist() for k, s in bellman.items()},
        "learned_samplers": {
            f"{label}-nfe{k}": {
                "chosen": best.sampler.solver,
                "sampler": best.sampler.to_dict(),
                "families": {
                    solver: {
                        "heldout_mse": r.heldout_error,
                        "initial_heldout_mse": r.initial_heldout_error,
                        "iterations": r.iterations,
                        "best_iteration": r.best_iteration,
                        "wall_s": r.wall_s,
                        "times": r.sampler.times.tolist(),
                        "scales": None if r.sampler.scales is None else r.sampler.scales.tolist(),
                    }
                    for solver, r in every.items()
                },
            }
            for label, table in (("learned", learned), ("boss-learned", boss_learned))
            for k, (best, every) in table.items()
        },
        "straightening": {
            f"{m}-nfe{k}": {
                "iterations": r.iterations,
                "best_iteration": r.best_iteration,
                "wall_s": r.wall_s,
                "trainable_parameters": r.trainable_parameters,
                "history": r.history,
            }
            for (m, k), r in runs.items()
        },
    }
    text = text_grid({k: v for k, v in rows.items() if not k.startswith("edm")}, max_images=6)
    atomic_write_text(out / "samples.txt", text)
    # results.json, the mark of a complete run, is the last file write_report writes
    report = write_report(
        out,
        records,
        schedules=plotted,
        extra=extra,
        title=f"bossflow demo: {cfg.model}",
        more_samples=grids,
    )
    _log(progress, "\n" + markdown_table(records) + "\n\n" + text)
    _log(progress, f"done in {timings['total']:.0f} s: {report}")
    return report
