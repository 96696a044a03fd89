"""The ``bossflow`` command line: a thin layer over the library.

Every command prints a one-line error (no traceback) for bad input and exits with status 2; long
jobs save their progress as they go, so rerunning the same command after an interruption resumes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


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
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")


def _load(args: argparse.Namespace):
    from .spec import load_model

    return load_model(
        args.model,
        checkpoint=args.checkpoint,
        convention=args.convention,
        shape=args.shape,
        device=_device(args.device),
        weights=args.weights,
    )


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bossflow`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
