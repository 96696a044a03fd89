"""The ``bossflow`` command line: a thin layer over the library.

Every command prints a one-line error (no traceback) for bad input and exits with status 2; long
jobs save their progress as they go, so rerunning the same command after an interruption resumes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import BossflowError

MODEL_HELP = (
    "the model: a built-in name (digits, spiral), rectified-flow:CONFIG (cifar10, celeba_hq, "
    "church, bedroom, afhq_cat or a JSON config; needs --checkpoint), or package.module:callable "
    "returning an nn.Module"
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _device(name: str | None) -> str:
    """``auto`` -> cuda if available, else cpu; anything else must be a device torch knows."""
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BossflowError(f"unknown --device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BossflowError(f"--device {name} asked, but this torch sees no CUDA device; use cpu")
    return name


def _fraction_or_count(text: str) -> float | int:
    """``0.1`` -> a fraction, ``100`` -> a count."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction or a count, got {text!r}") from None


def add_model_options(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default, required=default is None, help=MODEL_HELP)
    g.add_argument(
        "--checkpoint",
        help="weights: a .safetensors or torch state dict for module:callable models, the released "
        ".pth for rectified-flow models, or a shipped-model file for digits",
    )
    g.add_argument(
        "--convention",
        choices=["bossflow", "rectified-flow", "diffusers", "flow-matching", "torchcfm"],
        help="how a module:callable model is called: bossflow v(x, t) with t=0 noise (default); "
        "rectified-flow net(x, 999 t'); diffusers -net(x, 1000 (1 - t)); flow-matching "
        "net(x=x, t=scalar); torchcfm net(t, x)",
    )
    g.add_argument("--shape", help="shape of one sample as C,H,W when the model does not say")
    g.add_argument(
        "--weights",
        choices=["ema", "model"],
        default="ema",
        help="which weight set of a rectified-flow checkpoint to use (default: ema)",
    )
    g.add_argument(
        "--finetuned",
        help="a straightened model.safetensors written by 'bossflow straighten' (or the demo), "
        "loaded strictly on top of --model",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")


def _load(args: argparse.Namespace):
    from .spec import load_model

    model = load_model(
        args.model,
        checkpoint=args.checkpoint,
        convention=args.convention,
        shape=args.shape,
        device=_device(args.device),
        weights=args.weights,
    )
    if getattr(args, "finetuned", None):
        from .spec import load_finetuned

        load_finetuned(model, args.finetuned)
    return model


def _schedules_from_args(args: argparse.Namespace) -> dict[str, object]:
    """Named schedules from --schedule FILE ... and/or --nfe K,... with --spacing NAME,..."""
    from .schedule import Schedule, make_schedule

    out: dict[str, object] = {}
    for path in args.schedule or []:
        s = Schedule.load(path)
        out[f"{s.method} ({s.steps}) {Path(path).name}"] = s
    for name in args.spacing.split(","):
        for k in args.nfe or []:
            out[f"{name} ({k})"] = make_schedule(name.strip(), k)
    if not out:
        raise BossflowError("give --schedule FILE or --nfe K to say which time grid to use")
    return out


# -- schedule ----------------------------------------------------------------------------------
def cmd_schedule(args: argparse.Namespace) -> int:
    from .bellman import bellman_schedules, cost_matrix
    from .io import ensure_dir
    from .noise import NoiseSource

    out = ensure_dir(args.out)
    model = _load(args)
    device = _device(args.device)
    if max(args.nfe) > args.kmax:
        raise BossflowError(
            f"--nfe {max(args.nfe)} is more than --kmax {args.kmax} fine steps; raise --kmax"
        )
    noise = NoiseSource(model.sample_shape, seed=args.seed, device=device)
    meta = {"model": model.model_id, "seed": args.seed, "kmax": args.kmax}
    cost = cost_matrix(
        model.field,
        noise,
        grid=args.kmax,
        batch_size=args.batch_size,
        metric=args.metric,
        samples=args.samples,
        cache=out / "cost_matrix.npz",
        progress=not args.quiet,
        meta=meta,
    )
    schedules = bellman_schedules(cost, args.nfe)
    print(f"Bellman schedules for {model.model_id} (K_max={args.kmax}, {cost.count} samples)")
    print(f"{'NFE':>4}  {'cost':>12}  times")
    for k, s in sorted(schedules.items()):
        s.save(out / f"schedule_nfe{k}.json")
        times = " ".join(f"{t:.3f}" for t in s.times)
        print(f"{k:>4}  {s.cost:>12.6g}  {times}")
    print(f"wrote {out / 'cost_matrix.npz'} and {len(schedules)} schedule files in {out}")
    return 0


# -- sample ------------------------------------------------------------------------------------
def cmd_sample(args: argparse.Namespace) -> int:
    from .noise import NoiseSource
    from .report import save_grid
    from .solvers import sample

    model = _load(args)
    schedules = _schedules_from_args(args)
    if len(schedules) != 1:
        raise BossflowError("sample takes one schedule: one --schedule FILE or one --nfe K")
    ((name, schedule),) = schedules.items()
    noise = NoiseSource(model.sample_shape, seed=args.seed, device=_device(args.device))
    x = sample(model.field, noise.take(args.n), schedule, solver=args.solver)
    value_range = (-1.0, 1.0) if model.centered else (0.0, 1.0)
    path = save_grid(x.float().cpu(), args.out, scale=args.scale, value_range=value_range)
    if args.save_tensor:
        import torch

        from .io import atomic_write

        atomic_write(args.save_tensor, lambda p: torch.save({"samples": x.cpu()}, p))
    print(f"{args.n} samples of {model.model_id} with {name} ({args.solver}) -> {path}")
    return 0


# -- evaluate ----------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    from .io import ensure_dir
    from .metrics import METHODS
    from .noise import STAGE_OFFSETS, NoiseSource, OffsetNoise
    from .pipeline import evaluate_methods
    from .report import markdown_table, write_report
    from .solvers import reference_solve

    out = ensure_dir(args.out)
    model = _load(args)
    schedules = _schedules_from_args(args)
    source = NoiseSource(model.sample_shape, seed=args.seed, device=_device(args.device))
    noise = OffsetNoise(source, STAGE_OFFSETS["eval"])(range(args.samples))
    reference = reference_solve(model.field, noise, steps=args.reference_steps)
    data = features = None
    if model.dataset == "digits":
        from .data import load_dataset
        from .pretrained import load_digits_classifier

        data = load_dataset("digits", "heldout").images.to(noise.device)
        features = load_digits_classifier(device=noise.device).features
    entries = []
    for name, s in schedules.items():
        method = args.method or s.method
        if method not in METHODS:
            raise BossflowError(
                f"schedule {name!r} has method {method!r}, which is not a report label; pass "
                f"--method with one of {list(METHODS)}"
            )
        if any(e[:2] == (method, s.steps) for e in entries):
            raise BossflowError(
                f"two schedules would both be reported as {method} at {s.steps} NFE; evaluate "
                "them in separate runs (or label one with --method)"
            )
        entries.append((method, s.steps, model.field, s, None))
    records, samples = evaluate_methods(entries, noise, reference, data, features)
    report = write_report(
        out,
        records,
        schedules=schedules,
        samples={n: samples[(e[0], e[1])][:16].cpu() for n, e in zip(schedules, entries)},
        extra={"model": model.model_id, "samples": args.samples, "seed": args.seed},
        title=f"bossflow evaluate: {model.model_id}",
    )
    print(markdown_table(records))
    print(f"report: {report}")
    return 0


# -- straighten --------------------------------------------------------------------------------
def cmd_straighten(args: argparse.Namespace) -> int:
    from .io import ensure_dir
    from .noise import STAGE_OFFSETS, NoiseSource, OffsetNoise
    from .schedule import Schedule
    from .straighten import StraightenConfig, make_pairs, save_straightened, straighten

    out = ensure_dir(args.out)
    model = _load(args)
    schedule = Schedule.load(args.schedule)
    kmax = int(schedule.provenance.get("k_max", args.kmax))
    source = NoiseSource(model.sample_shape, seed=args.seed, device=_device(args.device))
    pairs = make_pairs(
        model.field,
        OffsetNoise(source, STAGE_OFFSETS["pairs"]),
        [schedule],
        out / "pairs",
        fine_grid=kmax,
        samples=args.pairs,
        batch_size=args.batch,
        progress=not args.quiet,
        meta={"model": model.model_id, "seed": args.seed},
    )
    config = StraightenConfig(
        iterations=args.iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        lora_rank=args.lora_rank,
        seed=args.seed,
        objective=args.objective,
        holdout=args.holdout,
        select=args.select,
        eval_every=max(1, args.iterations // 20),
        checkpoint_every=args.checkpoint_every,
    )
    result = straighten(model.field, pairs, schedule, config, out / "train", not args.quiet)
    path = save_straightened(result, out / "model.safetensors")
    last = result.history[-1] if result.history else {}
    print(
        f"{args.objective}: {result.iterations} iterations in {result.wall_s:.1f} s, held-out "
        f"one-step error {last.get('heldout_loss')} (best at iteration {result.best_iteration})"
    )
    print(f"wrote {path}; use it with --finetuned {path}")
    return 0


# -- demo ----------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .pipeline import DemoConfig, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    overrides = {
        k: getattr(args, k)
        for k in ("seed", "iterations", "pair_samples", "eval_samples")
        if getattr(args, k) is not None
    }
    config = replace(config, **overrides)
    run_demo(args.out, config, device=_device(args.device), progress=not args.quiet)
    return 0


# -- train-base ----------------------------------------------------------------------------------
def cmd_train_base(args: argparse.Namespace) -> int:
    from .io import ensure_dir
    from .train_base import train_and_save

    out = ensure_dir(args.out)
    flow = {"steps": args.steps} if args.steps else {}
    classifier = {"steps": args.classifier_steps} if args.classifier_steps else {}
    train_and_save(
        out,
        dataset=args.dataset,
        seed=args.seed,
        flow=flow,
        classifier=classifier,
        check_samples=args.check_samples,
        progress=not args.quiet,
    )
    print(
        f"wrote the model and classifier to {out}; use them with --model digits --checkpoint "
        f"{out}/{args.dataset}.safetensors"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bossflow",
        description="Bellman optimal step sizes and straightening for flow-matching models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "schedule",
        help="measure the cost matrix and write Bellman optimal schedules",
        description="Run fine Euler trajectories of the model, measure the cost of one Euler jump "
        "between any two fine-grid times (paper eq. 5) and pick, by dynamic programming, the "
        "least-cost schedule for each NFE. Rerunning with the same --out resumes an interrupted run.",
    )
    add_model_options(p)
    p.add_argument(
        "--nfe",
        type=_int_list,
        default=[2, 4, 6, 8],
        help="Euler step budgets, comma-separated (default: 2,4,6,8)",
    )
    p.add_argument(
        "--kmax",
        type=_positive,
        default=100,
        help="intervals N of the fine uniform grid (default: 100)",
    )
    p.add_argument(
        "--samples",
        type=_positive,
        default=256,
        help="number of noises M averaged in the cost matrix (default: 256)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive,
        default=64,
        help="trajectories integrated at once; does not change the result (default: 64)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="noise seed: sample m's noise depends only on (seed, m) (default: 0)",
    )
    p.add_argument(
        "--metric", default="sq_l2", help="jump cost: sq_l2 (the paper's, default), l2, l1"
    )
    p.add_argument(
        "--out",
        default="runs/schedule",
        help="output folder for cost_matrix.npz and schedule_nfe*.json (default: runs/schedule)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_schedule)

    def schedule_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--schedule",
            action="append",
            help="a schedule JSON (from 'bossflow schedule'); may be repeated",
        )
        p.add_argument("--nfe", type=_int_list, help="step counts for --spacing grids, e.g. 2,4")
        p.add_argument(
            "--spacing",
            default="uniform",
            help="built-in grids for --nfe: uniform, edm (comma-separated; sample also takes quadratic)",
        )

    p = sub.add_parser("sample", help="sample from a model on a schedule and write a PNG grid")
    add_model_options(p)
    schedule_options(p)
    p.add_argument("--solver", default="euler", choices=["euler", "heun", "midpoint"])
    p.add_argument("--n", type=_positive, default=64, help="number of samples (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--scale", type=_positive, default=8, help="pixel upscaling of the grid")
    p.add_argument("--out", default="samples.png", help="PNG file to write (default: samples.png)")
    p.add_argument("--save-tensor", help="also save the raw samples to this .pt file")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "evaluate",
        help="compare schedules by error to a reference solve (and Fréchet distance on digits)",
    )
    add_model_options(p)
    schedule_options(p)
    p.add_argument(
        "--samples", type=_positive, default=256, help="held-out evaluation noises (default: 256)"
    )
    p.add_argument(
        "--reference-steps",
        type=_positive,
        default=1000,
        help="Euler steps of the reference solve (default: 1000)",
    )
    p.add_argument(
        "--method",
        help="method label in the results, e.g. boss for a --finetuned model (default: each "
        "schedule's own: uniform, edm, bellman)",
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--out", default="runs/evaluate", help="output folder (default: runs/evaluate)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "straighten",
        help="fine-tune a model on a Bellman schedule (BOSS, full or LoRA) or by reflow",
        description="Make straightening pairs (reference states at the schedule's times) and "
        "fine-tune the model so one Euler step per interval lands on them (paper eq. 9). "
        "Rerunning with the same --out resumes pairs and training.",
    )
    add_model_options(p)
    p.add_argument("--schedule", required=True, help="schedule JSON from 'bossflow schedule'")
    p.add_argument(
        "--pairs",
        type=_positive,
        default=4096,
        help="training noises (10%% are held out for validation; default: 4096)",
    )
    p.add_argument(
        "--kmax",
        type=_positive,
        default=100,
        help="fine grid intervals if the schedule does not record its K_max",
    )
    p.add_argument("--iterations", type=_positive, default=1000)
    p.add_argument("--batch-size", type=_positive, default=128)
    p.add_argument(
        "--batch",
        type=_positive,
        default=256,
        help="trajectories integrated at once while making pairs",
    )
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="0: full fine-tuning (default); r > 0: LoRA of rank r (needs peft)",
    )
    p.add_argument("--objective", choices=["boss", "reflow"], default="boss")
    p.add_argument(
        "--holdout",
        type=_fraction_or_count,
        default=0.1,
        help="noises held out to track the one-step error: a fraction (0.1) or a count (100)",
    )
    p.add_argument(
        "--select",
        choices=["best", "last"],
        default="best",
        help="keep the weights with the best held-out error, or the last ones",
    )
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/straighten")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_straighten)

    p = sub.add_parser(
        "demo",
        help="the whole method on the shipped digits model, with a report",
        description="Bellman schedules for NFE 2, 4, 6, 8 -> BOSS (full and LoRA) for NFE 2 and 4 "
        "-> reflow at the same iterations -> evaluation of every method on held-out noises -> "
        "report.md, results.json, plots and sample grids. Rerun to resume.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a sub-minute version (tiny sizes)")
    p.add_argument("--seed", type=int)
    p.add_argument("--iterations", type=_positive, help="fine-tuning iterations per run")
    p.add_argument("--pair-samples", type=_positive, help="straightening noises")
    p.add_argument("--eval-samples", type=_positive, help="held-out evaluation noises")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "train-base",
        help="retrain the shipped digits model and classifier (writes .safetensors + .json)",
    )
    p.add_argument("--out", default="runs/base", help="folder for the weights (default: runs/base)")
    p.add_argument("--steps", type=_positive, help="flow training steps (default: as shipped)")
    p.add_argument(
        "--classifier-steps", type=_positive, help="classifier training steps (default: as shipped)"
    )
    p.add_argument(
        "--check-samples",
        type=_positive,
        default=500,
        help="samples drawn to check the trained flow (default: 500)",
    )
    p.add_argument(
        "--dataset",
        default="digits",
        choices=["digits", "mnist"],
        help="training data (mnist needs the 'mnist' extra)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_base)
    return parser


# Commands whose --out is a folder they write into; main() holds an output_lock on it.
_WRITES_OUT_FOLDER = {"schedule", "straighten", "evaluate", "demo", "train-base"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bossflow`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in _WRITES_OUT_FOLDER:  # one run at a time per output folder
            from .io import output_lock

            command = " ".join(["bossflow", *(sys.argv[1:] if argv is None else argv)])
            with output_lock(args.out, command[:200]):
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except BossflowError as err:
        print(f"bossflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"bossflow {args.command}: interrupted; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["main", "build_parser"]
