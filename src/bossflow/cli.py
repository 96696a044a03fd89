"""The ``bossflow`` command line: a thin layer over the library.

Every command prints a one-line error (no traceback) for bad input and exits with status 2; long
jobs save their progress as they go, so rerunning the same command after an interruption resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import BossflowError, ConfigError

MODEL_HELP = (
    "the model: a built-in name (digits, digits-cond, spiral), rectified-flow:CONFIG (cifar10, celeba_hq, "
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


def _name_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer names, got {text!r}")
    return names


def _number(kind: type, ok: Callable[[float], bool], expected: str, quote: bool = False):
    """An argparse type: ``kind(text)`` that passes ``ok``, else "expected ``expected``"."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            shown = repr(text) if quote else text
            raise argparse.ArgumentTypeError(f"expected {expected}, got {shown}")
        return value

    return parse


_positive = _number(int, lambda v: v >= 1, "a positive integer", quote=True)
_non_negative = _number(int, lambda v: v >= 0, "an integer >= 0")
_at_least_two = _number(int, lambda v: v >= 2, "an integer >= 2")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_finite_float = _number(float, math.isfinite, "a finite number")


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
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise BossflowError(
            f"--device {name} asked, but this torch sees {torch.cuda.device_count()} CUDA "
            "device(s); use cuda:0 .. cuda:N-1"
        )
    if device.type not in ("cpu", "cuda"):  # mps, xpu ...: only if this torch can use it
        backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
        if not (callable(getattr(backend, "is_available", None)) and backend.is_available()):
            raise BossflowError(f"--device {name} is not available in this torch; use cpu")
    return name


def _fraction_or_count(text: str) -> float | int:
    """``0.1`` -> a fraction, ``100`` -> a count."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction or a count, got {text!r}") from None


def _given(args: argparse.Namespace) -> set[str]:
    """The options given on the command line (``main`` records them), by their dest names."""
    return getattr(args, "given", set())


def _refuse_unless(args: argparse.Namespace, names: Sequence[str], needs: str) -> None:
    """Options that only ``needs`` makes meaningful, given without it: one line, not ignored."""
    unused = [n for n in names if n in _given(args)]
    if unused:
        options = ", ".join("--" + n.replace("_", "-") for n in unused)
        raise ConfigError(f"{options} only matter{'s' if len(unused) == 1 else ''} with {needs}")


def _num(value: float | None) -> str:
    """A number for a message or a printed line: 4 significant digits, never ``np.float64(...)``."""
    if value is None:
        return "—"
    return format(float(value), ".4g")


def _shape_text(shape: Sequence[int]) -> str:
    return ",".join(str(int(d)) for d in shape)


def _is_image(shape: Sequence[int]) -> bool:
    """(C, H, W) with C = 1 (grey) or 3 (RGB): what grids, PSNR and image features need."""
    return len(shape) == 3 and shape[0] in (1, 3)


def _is_points(shape: Sequence[int]) -> bool:
    """One 2-D point per sample: drawn as a scatter plot."""
    return tuple(shape) == (2,)


class _Formatter(argparse.HelpFormatter):
    """Help with every option's default, taken from the parser (no number is written twice)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.required
            or action.default is argparse.SUPPRESS
            or "(default" in text
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        ):
            return text
        default = action.default
        if isinstance(action, argparse._StoreTrueAction):
            shown = "off"
        elif default is None:
            shown = "not set"
        elif isinstance(default, (list, tuple)):
            shown = ",".join(str(v) for v in default)
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``bossflow CMD: error: ...`` and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _choice_list(registry, label: str):
    """An argparse type for comma-separated names from ``registry`` (kept in the given order)."""
    names = list(registry)

    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in names]
        if not values or unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {label} {', '.join(unknown) or repr(text)}; choose from {', '.join(names)}"
            )
        return values

    return parse


def _missing_parents(path: Path) -> list[Path]:
    """The folders of ``path`` (itself included) that do not exist yet, deepest first."""
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


def _check_writable(folder: Path) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bossflow-write-check.", dir=folder)
    except OSError as err:
        raise BossflowError(
            f"cannot write in {folder}: {err.strerror or err}; choose another --out"
        ) from None
    import os

    os.close(fd)
    Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def _output_dir(path: str | Path) -> Iterator[Path]:
    """Create and check the output folder ``path`` for the body of a command.

    The folder must be creatable and writable before any long phase starts. If the body then fails
    (a bad model, an interrupt) and leaves a folder this call created empty, it is removed again,
    so a failed argument check leaves no empty ``--out`` behind.
    """
    from .io import ensure_dir

    path = Path(path)
    created = _missing_parents(path)
    out = ensure_dir(path)
    try:
        _check_writable(out)
        yield out
    except BaseException:
        from .distributed import is_rank_zero

        for folder in created if is_rank_zero() else ():  # rank 0's folders, not the others'
            try:
                # a lock file is removed only by its holder (io.output_lock, while it holds it):
                # a run refused the lock must not remove the lock of the run that has it
                folder.rmdir()  # only if empty; stop at the first one that is not
            except OSError:
                break
        raise


@contextlib.contextmanager
def _output_file(path: str | Path) -> Iterator[Path]:
    """Like :func:`_output_dir` for a single output file: checks and creates its folder."""
    path = Path(path)
    if path.is_dir():
        raise BossflowError(f"--out {path} is a folder; give a file name such as samples.png")
    with _output_dir(path.parent if str(path.parent) else Path(".")):
        yield path


PRECISIONS = ("fp32", "tf32", "fp16", "bf16")


def add_model_options(
    p: argparse.ArgumentParser, default: str | None = "digits", precision: str = ""
) -> None:
    """The model, conditioning and guidance options; ``precision``: what ``--precision`` covers."""
    from .spec import CONVENTIONS

    g = p.add_argument_group("model")
    g.add_argument("--model", default=default, required=default is None, help=MODEL_HELP)
    g.add_argument(
        "--checkpoint",
        help="weights: a .safetensors or torch state dict for module:callable models, the released "
        ".pth for rectified-flow models, or a shipped-model file for digits (default: none; digits "
        "uses the shipped weights)",
    )
    g.add_argument(
        "--convention",
        choices=list(CONVENTIONS),
        help="how a module:callable model is called: bossflow v(x, t) with t=0 noise; "
        "rectified-flow net(x, 999 t'); diffusers -net(x, 1000 (1 - t)); flow-matching "
        "net(x=x, t=scalar); torchcfm net(t, x) (default: bossflow)",
    )
    g.add_argument(
        "--shape",
        help="shape of one sample, any number of comma-separated sizes: 2 for 2-D points, 1,28,28 "
        "or 3,32,32 for images (default: the model's own; needed when a module:callable model "
        "does not say)",
    )
    g.add_argument(
        "--weights",
        choices=["ema", "model"],
        help="which weight set of a rectified-flow checkpoint to use (default: ema)",
    )
    g.add_argument(
        "--finetuned",
        help="a straightened model.safetensors written by 'bossflow straighten' (or the demo), "
        "loaded strictly on top of --model (default: none)",
    )
    g.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1 ... or auto (cuda if available)"
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="the network's arithmetic: fp32 (PyTorch's defaults, under which CUDA convolutions "
        "may already use TF32), tf32 (CUDA TF32 matmuls and convolutions), fp16 or bf16 autocast; velocities, states and costs stay in the states' "
        f"dtype{precision}. fp16 kept cost matrices within 3e-4 of fp32 on our models, bf16 only "
        "within 5e-3 (docs/performance.md)",
    )
    g.add_argument(
        "--channels-last",
        action="store_true",
        help="run an image model's network in channels-last memory layout (same values; often "
        "faster on GPUs)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="run the network through torch.compile where --precision applies (the first "
        "batch, and the first of another size, compile: seconds to minutes)",
    )
    c = p.add_argument_group("conditioning and guidance")
    c.add_argument(
        "--cond",
        metavar="FILE",
        help="a .safetensors file of conditioning tensors by keyword (class_labels, "
        "encoder_hidden_states, ...); noise m takes row m mod R of an R-row tensor, so 1 row is "
        "shared and M rows are per sample (default: none; digits-cond: label m mod 10)",
    )
    c.add_argument(
        "--uncond",
        metavar="FILE",
        help="the unconditional inputs for guidance, by the same keywords (1 row shared, or "
        "rows per sample) (default: none; digits-cond: the null label)",
    )
    c.add_argument(
        "--guidance-scale",
        type=_finite_float,
        metavar="W",
        help="classifier-free guidance v_u + W (v_c - v_u), one model call of 2B rows "
        "(default: none; digits-cond: the scale recorded with its weights)",
    )
    c.add_argument(
        "--sample-keyword",
        metavar="NAME",
        help="--convention diffusers: pass the latents as this keyword (transformers: "
        "hidden_states) (default: detected from the model)",
    )
    c.add_argument(
        "--timestep-scale",
        type=_positive_float,
        metavar="S",
        help="--convention diffusers: timestep = S * sigma (SD3 and UNets 1000, FLUX 1); "
        "--convention rectified-flow: the time input scale (default: detected for diffusers "
        "models, 999 for rectified-flow)",
    )


def _load(args: argparse.Namespace, finetuned: bool = True):
    """The model of ``--model`` (and, unless ``finetuned=False``, ``--finetuned`` on top)."""
    from .spec import load_model

    device = _device(args.device)
    if getattr(args, "precision", None) == "tf32" and not device.startswith("cuda"):
        raise ConfigError(  # before the model is loaded
            f"--precision tf32 is a CUDA matmul mode and changes nothing on {device}; use fp32, "
            "or fp16/bf16 autocast"
        )

    model = load_model(
        args.model,
        checkpoint=args.checkpoint,
        convention=args.convention,
        shape=args.shape,
        device=device,
        weights=args.weights,
        sample_keyword=args.sample_keyword,
        timestep_scale=args.timestep_scale,
    )
    if finetuned and getattr(args, "finetuned", None):
        from .spec import load_finetuned

        load_finetuned(model, args.finetuned)
    return model


def _precise(args: argparse.Namespace, model):
    """``model.field`` in the ``--precision`` and layout asked (:class:`~bossflow.field.Precision`),
    or itself for fp32 in the default layout; refuses what would silently do nothing."""
    import torch

    from .field import Precision

    precision = getattr(args, "precision", "fp32")
    channels_last = getattr(args, "channels_last", False)
    compiled = getattr(args, "compile", False)
    if precision == "fp32" and not channels_last and not compiled:
        return model.field
    if channels_last and len(model.sample_shape) != 3:
        raise ConfigError(
            f"--channels-last is for image models (C,H,W samples); {model.model_id} samples have "
            f"shape {_shape_text(model.sample_shape)}: drop it"
        )
    if not isinstance(model.field, torch.nn.Module):
        raise ConfigError(
            "--precision, --channels-last and --compile need a model that is an nn.Module"
        )
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return Precision(
        model.field, amp, channels_last=channels_last, tf32=precision == "tf32", compile=compiled
    )


def _plain_layout(model) -> None:
    """Undo ``--channels-last`` on the network's weights (converted in place by ``_precise``)
    before what trains it: fine-tuning and sampler learning run on the plain network."""
    import torch

    if isinstance(model.field, torch.nn.Module):
        model.field.to(memory_format=torch.contiguous_format)


def _precision_meta(args: argparse.Namespace) -> dict[str, str]:
    """``{"precision": "fp16, channels-last"}`` for provenance, or ``{}`` in the defaults."""
    text = ", ".join(
        [args.precision] * (args.precision != "fp32")
        + ["channels-last"] * args.channels_last
        + ["compiled"] * args.compile
    )
    return {"precision": text} if text else {}


def _conditioning(
    args: argparse.Namespace, model, recorded: dict | None = None, student=False, precise=True
):
    """The run's field and per-sample conditioning (:func:`prepare_conditioning`) from the options.

    ``recorded``: the guidance a ``--finetuned`` file was straightened under
    (:func:`_finetuned_guidance`); its scale is the run's (another ``--guidance-scale`` is refused).
    ``student=True``: the field is the straightened one, which a ``distill`` run samples without
    guidance (on the same conditioning, less the unconditional inputs). ``precise``: the network
    runs in ``--precision`` (else in float32, as fine-tuning and sampler learning do; see
    :func:`_in_precision` for both from one reading of the conditioning).
    """
    from dataclasses import replace

    from .conditioning import prepare_conditioning
    from .field import Unguided

    field = model.field
    scale = args.guidance_scale
    if recorded is not None:
        if scale is not None and scale != recorded["scale"]:
            raise ConfigError(
                f"{args.finetuned} was straightened under guidance scale {_num(recorded['scale'])}; "
                f"drop --guidance-scale {_num(scale)} (its teacher, and so its reference, is fixed)"
            )
        scale = recorded["scale"]
    run = prepare_conditioning(
        field, model.info, args.cond, args.uncond, scale, _device(args.device)
    )
    if student and recorded is not None and recorded["mode"] == "distill":
        run = replace(
            run,
            field=Unguided(field),
            guidance_scale=None,
            description=f"{run.description} (distilled: sampled without guidance)",
        )
    return _in_precision(args, model, run) if precise else run


def _in_precision(args: argparse.Namespace, model, run):
    """``run`` with its network in ``--precision`` (:func:`_precise`), inside the same guidance
    wrapper; ``run`` itself when the options ask for nothing."""
    from dataclasses import replace

    from .field import Guided, Unguided

    inner = _precise(args, model)
    if inner is model.field:
        return run
    field = run.field
    if isinstance(field, Guided):
        field = Guided(inner, field.scale, field.uncond)
    elif isinstance(field, Unguided):
        field = Unguided(inner)
    else:
        field = inner
    return replace(run, field=field)


def _log_conditioning(run) -> None:
    if run.cond is not None or run.guidance_scale is not None:
        print(f"conditioning: {run.description}")


def _schedules_from_args(args: argparse.Namespace) -> dict[str, object]:
    """Named schedules (or samplers) from --schedule FILE ... and/or --nfe K,... --spacing NAME"""
    from .sampler import load_schedule
    from .schedule import make_schedule

    def as_list(value) -> list:  # sample takes one value, evaluate lists
        return [] if value is None else list(value) if isinstance(value, list) else [value]

    if args.nfe is None:
        _refuse_unless(args, ["spacing"], "--nfe (the steps of the built-in grid)")
    out: dict[str, object] = {}
    for path in as_list(args.schedule):
        s = load_schedule(path)
        name = f"{s.method} ({s.steps}) {Path(path).name}"
        if name in out:  # two files of one name in different folders: both stay
            name = f"{s.method} ({s.steps}) {path}"
        out[name] = s
    for name in as_list(args.spacing):
        for k in as_list(args.nfe):
            out[f"{name} ({k})"] = make_schedule(name, k)
    if not out:
        raise BossflowError("give --schedule FILE or --nfe K to say which time grid to use")
    return out


# -- schedule ----------------------------------------------------------------------------------
_LEARN_OPTIONS = (
    "solvers", "no_scales", "teacher_steps", "learn_iterations", "learn_lr", "learn_holdout",
)  # fmt: skip


def cmd_schedule(args: argparse.Namespace) -> int:
    if args.method != "learned":
        _refuse_unless(args, _LEARN_OPTIONS, "--method learned")
    if max(args.nfe) > args.kmax:
        raise BossflowError(
            f"--nfe {max(args.nfe)} is more than --kmax {args.kmax} fine steps; raise --kmax"
        )
    device = _device(args.device)
    with _output_dir(args.out) as out:
        return _schedule(args, out, device)


def _schedule(args: argparse.Namespace, out: Path, device: str) -> int:
    from .bellman import bellman_schedules, cost_matrix
    from .noise import NoiseSource

    learned = args.method == "learned"
    if learned:
        from .learn import LearnConfig, start_steps

        config = LearnConfig(
            iterations=args.learn_iterations,
            lr=args.learn_lr,
            holdout=args.learn_holdout,
            scales=not args.no_scales,
            seed=args.seed,
        )
        config.check()  # before any long phase
        from .learn import _holdout

        try:
            _holdout(args.samples, config.holdout)
        except ConfigError:
            raise ConfigError(
                f"--learn-holdout {args.learn_holdout} leaves no training noise among --samples "
                f"{args.samples}; raise --samples or lower --learn-holdout"
            ) from None
        for k in args.nfe:
            if not start_steps(args.solvers, k):
                raise BossflowError(
                    f"none of --solvers {','.join(args.solvers)} can spend exactly {k} evaluations"
                )
    model = _load(args)
    # a straightened model is measured as it samples: under its recorded guidance
    plain = _conditioning(args, model, _finetuned_guidance(args.finetuned), True, precise=False)
    run = _in_precision(args, model, plain)  # the cost matrix and teacher solves
    _log_conditioning(run)
    noise = NoiseSource(model.sample_shape, seed=args.seed, device=device)
    meta = {"model": model.model_id, "seed": args.seed, "kmax": args.kmax, **_precision_meta(args)}
    cost = cost_matrix(
        run.field,
        noise,
        grid=args.kmax,
        batch_size=args.batch_size,
        metric=args.metric,
        samples=args.samples,
        cache=out / "cost_matrix.npz",
        progress=not args.quiet,
        meta=meta,
        cond=run.cond,
    )
    # Bellman schedules for every budget, and for the step counts the learned samplers start from
    budgets = set(args.nfe)
    if learned:
        budgets |= {steps for k in args.nfe for steps in start_steps(args.solvers, k).values()}
    schedules = bellman_schedules(cost, sorted(budgets))
    print(f"Bellman schedules for {model.model_id} (K_max={args.kmax}, {cost.count} samples)")
    print(f"{'NFE':>4}  {'cost':>12}  times")
    for k, s in sorted(schedules.items()):
        if k in args.nfe:
            s.save(out / f"schedule_nfe{k}.json")
            times = " ".join(f"{t:.3f}" for t in s.times)
            print(f"{k:>4}  {_num(s.cost):>12}  {times}")
    print(f"wrote {out / 'cost_matrix.npz'} and {len(args.nfe)} schedule files in {out}")
    if learned:
        _learn_samplers(args, out, model, noise, schedules, config, run, plain)
    return 0


def _learn_samplers(args, out: Path, model, noise, schedules, config, run, plain) -> None:
    """Learn one sampler per budget (best solver family on held-out noises) from the Bellman ones."""
    from .learn import learn_best_sampler, teacher_endpoints

    z = noise.take(args.samples)
    print(f"teacher: {args.teacher_steps} Heun steps from each of the {args.samples} noises")
    teacher = teacher_endpoints(
        run.field, z, args.teacher_steps, "heun", args.batch_size, out / "teacher.pt",
        progress=not args.quiet, cond=run.cond,
    )  # fmt: skip
    # the teacher ran in --precision; learning backpropagates through the network in float32
    # (fp16 gradients of a small final error underflow), in its own layout
    _plain_layout(model)
    run = plain
    prov = {"model": model.model_id, "seed": args.seed, "teacher": f"heun {args.teacher_steps}"}
    prov.update(_precision_meta(args))  # of the teacher solves (learning runs in float32)
    print(f"{'NFE':>4}  {'solver':>8}  {'held-out MSE':>12}  {'Bellman start':>13}  times")
    for k in sorted(args.nfe):
        best, results = learn_best_sampler(
            run.field, z, teacher, k, args.solvers, config, schedules, None,
            out / "learn", not args.quiet, prov, run.cond,
        )  # fmt: skip
        for solver, r in sorted(results.items()):
            mark = "*" if r is best else " "
            times = " ".join(f"{t:.3f}" for t in r.sampler.times)
            print(
                f"{k:>4} {mark}{solver:>8}  {_num(r.heldout_error):>12}  "
                f"{_num(r.initial_heldout_error):>13}  {times}"
            )
        best.sampler.save(out / f"learned_nfe{k}.json")
    print(
        f"wrote learned_nfe*.json in {out} (* = kept: the first of --solvers, {args.solvers[0]}, "
        f"unless another family's error is lower by {config.margin:g} paired standard errors, on "
        "the training and the held-out noises)"
    )


# -- sample ------------------------------------------------------------------------------------
def cmd_sample(args: argparse.Namespace) -> int:
    from . import distributed as dist
    from .noise import NoiseSource, cond_reader
    from .solvers import sample

    if args.schedule is not None and args.nfe is not None:
        raise BossflowError("sample takes one schedule: give --schedule FILE or --nfe K, not both")
    if args.save_tensor is not None:  # checked before sampling, not when writing after it
        if Path(args.out).suffix == ".pt":
            raise ConfigError(
                f"--out {args.out} already saves the tensor; drop --save-tensor (or give --out a "
                ".png name)"
            )
        if Path(args.save_tensor).is_dir():
            raise ConfigError(f"--save-tensor {args.save_tensor} is a folder; give a .pt file name")
    device = _device(args.device)
    schedules = _schedules_from_args(args)
    ((name, schedule),) = schedules.items()
    with _output_file(args.out) as out, contextlib.ExitStack() as stack:
        if args.save_tensor is not None:
            stack.enter_context(_output_file(args.save_tensor))
        model = _load(args)
        _require_plotting(tuple(model.sample_shape), report=False)
        run = _conditioning(args, model, _finetuned_guidance(args.finetuned), student=True)
        _log_conditioning(run)
        z = NoiseSource(model.sample_shape, seed=args.seed, device=device).take(args.n)
        take_cond = cond_reader(run.rows(args.n), args.n, "sample")

        def block(rows: range):  # several processes: each samples a block, all get all
            c = take_cond(rows)
            return sample(run.field, z[rows.start : rows.stop], schedule, args.solver, cond=c)

        x = dist.map_rows(block, args.n, z.device)
        written, notes = _save_samples(x, model, out, args.save_tensor, args.scale, name)
    for note in notes:
        print(f"note: {note}")
    solver = args.solver or getattr(schedule, "solver", "euler")
    print(f"{args.n} samples of {model.model_id} with {name} ({solver}) -> {', '.join(written)}")
    return 0


def _save_samples(x, model, out: Path, save_tensor: str | None, scale: int, title: str):
    """Write samples in the forms their shape allows; returns (paths written, notes)."""
    import torch

    from .io import atomic_write
    from .report import plot_points, save_grid

    shape = tuple(model.sample_shape)
    written: list[str] = []
    notes: list[str] = []
    tensor_path = save_tensor
    picture = out
    if out.suffix == ".pt":  # --out x.pt asks for the tensor; a picture goes beside it
        tensor_path, picture = tensor_path or out, out.with_suffix(".png")
    if _is_image(shape):
        value_range = model.value_range
        grid = save_grid(x.float().cpu(), picture, scale=scale, value_range=value_range)
        written.append(str(grid))
    elif _is_points(shape):  # the tensor too only when asked for, as for images
        written.append(str(plot_points({title: x.float().cpu()}, picture, title=title)))
        notes.append("2-D points: drawn as a scatter plot; no image grid")
    else:
        tensor_path = tensor_path or out.with_suffix(".pt")
        notes.append(
            f"samples shaped ({_shape_text(shape)}) are not 1- or 3-channel images, so no PNG "
            f"was drawn; the samples are saved as a tensor in {tensor_path}"
        )
    if tensor_path:
        samples = x.detach().cpu()
        atomic_write(tensor_path, lambda p: torch.save({"samples": samples}, p))
        written.append(str(tensor_path))
    return written, notes


# -- evaluate ----------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    import copy

    from . import distributed
    from .checkpoint import module_fingerprint
    from .evaluation import EvalEntry, evaluate_methods
    from .io import ensure_dir
    from .metrics import frechet_backend
    from .noise import STAGE_OFFSETS, NoiseSource, OffsetNoise
    from .report import markdown_table, write_report

    out = ensure_dir(args.out)
    base = _load(args, finetuned=False)
    model = base
    if args.finetuned:
        from .spec import load_finetuned

        model = load_finetuned(copy.deepcopy(base), args.finetuned)
    iterations = _finetuned_iterations(args.finetuned)
    schedules = _schedules_from_args(args)
    recorded = _finetuned_guidance(args.finetuned)
    base_run = _conditioning(args, base, recorded)
    run = _conditioning(args, model, recorded, student=True) if args.finetuned else base_run
    _log_conditioning(base_run)
    # What can be measured and drawn depends on the sample shape only: decided before computing.
    shape = tuple(model.sample_shape)
    notes = _shape_notes(shape)
    _require_plotting(shape, report=True)
    log = _stage_log(args.quiet)
    for note in notes:
        print(f"note: {note}")
    entries, warnings = [], []
    teacher = _finetuned_json(args.finetuned).get("base_fingerprint")  # {} without --finetuned
    if teacher is not None and teacher != (given := module_fingerprint(base.field)):
        warnings.append(
            f"{args.finetuned} was straightened from another model than {base.model_id!r} "
            f"(fingerprint {teacher} there, {given} here): the "
            "reference solve is this model's, not its teacher's; pass the --model/--checkpoint "
            "it was straightened from"
        )
    for name, s in schedules.items():
        label = args.method or s.method
        other = _foreign_schedule(s, base, model)
        if other is not None:
            warnings.append(
                f"schedule {name!r} was made for model {other!r}, not {model.model_id!r}; it is "
                f"reported as '{label} (other model)'"
            )
            label = f"{label} (other model)"
        entries.append(EvalEntry(label, run.field, s, solver=args.solver, iterations=iterations))
    keys = [(e.label, e.nfe) for e in entries]
    clash = next((k for k in keys if keys.count(k) > 1), None)
    if clash is not None:  # refused here, before the reference solve, not after it
        raise ConfigError(
            f"two schedules would both be reported as {clash[0]} at {clash[1]} NFE; evaluate them "
            "in separate runs, or label them with --method"
        )
    for line in warnings if distributed.is_rank_zero() else ():  # said once, not per process
        print(f"bossflow evaluate: warning: {line}", file=sys.stderr)
    frechet = model.dataset == "digits" and _is_image(shape)
    if frechet and args.samples < 2:  # refused before the reference solve, not after it
        raise ConfigError(
            f"--samples {args.samples}: the Fréchet distance on {model.dataset} needs at least 2"
        )
    source = NoiseSource(model.sample_shape, seed=args.seed, device=_device(args.device))
    noise = OffsetNoise(source, STAGE_OFFSETS["eval"])(range(args.samples))
    # The reference is the *base* model's fine solve: a straightened model is measured against
    # the trajectories it was trained to shortcut, not against its own fine solve.
    log(f"[1/3] reference solve: {args.reference_steps} Euler steps on {args.samples} noises")
    cond = base_run.rows(args.samples)
    reference = _reference_in_chunks(
        base_run.field, noise, args.reference_steps, not args.quiet, cond=cond
    )
    data = features = None
    if frechet:
        from .data import load_dataset
        from .pretrained import load_digits_classifier

        data = load_dataset("digits", "heldout").images.to(noise.device)
        features = load_digits_classifier(device=noise.device).features
    solvers = ", ".join(sorted({e.solver for e in entries}))
    log(f"[2/3] sampling {len(entries)} schedule(s) with {solvers}")
    low, high = model.value_range
    data_range = high - low
    records, samples = evaluate_methods(
        entries, noise, reference, data, features, log, cond, data_range=data_range
    )
    if not _is_image(shape):  # PSNR is an image measure
        from dataclasses import replace

        records = [replace(r, psnr=math.nan) for r in records]
    log("[3/3] report")
    shown = 16 if _is_image(shape) else 2000
    drawn = None
    if _is_image(shape) or _is_points(shape):
        drawn = {n: samples[(e.label, e.nfe)][:shown].cpu() for n, e in zip(schedules, entries)}
    report = write_report(
        out,
        records,
        schedules=schedules,
        samples=drawn,
        notes=notes,
        extra={
            "model": model.model_id,
            "reference_model": base.model_id,
            "samples": args.samples,
            "seed": args.seed,
            "solvers": {n: e.solver for n, e in zip(schedules, entries)},
            "finetuned_iterations": iterations,
            "conditioning": base_run.description,
            "warnings": warnings,
            **_precision_meta(args),
            **({"frechet_backend": frechet_backend()} if features is not None else {}),
            "data_range": data_range,
        },
        title=f"bossflow evaluate: {model.model_id}",
        value_range=model.value_range,
    )
    print(markdown_table(records))
    print(f"report: {report}")
    return 0


def _require_plotting(shape: tuple[int, ...], report: bool) -> None:
    """Fail before sampling if the figures this shape gets need a missing optional package."""
    from .errors import require

    if report or _is_points(shape):
        require("matplotlib", "plots", "plots")
    if _is_image(shape):
        require("PIL", "plots", "sample grids")


def _stage_log(quiet: bool):
    def log(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    return log


def _shape_notes(shape: tuple[int, ...]) -> list[str]:
    """What evaluate skips for samples of this shape, and why."""
    if _is_image(shape):
        return []
    what = "2-D points" if _is_points(shape) else f"samples shaped ({_shape_text(shape)})"
    drawn = "they are drawn as a scatter plot" if _is_points(shape) else "no sample figure is drawn"
    return [
        f"{what} are not 1- or 3-channel images: PSNR, sample grids and the Fréchet distance in "
        f"image features are skipped; {drawn}"
    ]


def _reference_in_chunks(field, noise, steps: int, progress: bool, chunk: int = 64, cond=None):
    """:func:`reference_solve` of ``noise`` in chunks, with a progress bar on a terminal."""
    import torch

    from . import distributed
    from .noise import cond_reader
    from .progress import progress_bar
    from .solvers import reference_solve

    take_cond = cond_reader(cond, noise.shape[0], "the reference solve")
    chunk *= distributed.world_size()  # several processes: each solves `chunk` of every chunk
    parts = []
    with progress_bar(
        total=noise.shape[0], desc="reference", unit="noise", enabled=progress
    ) as bar:
        for start in range(0, noise.shape[0], chunk):
            rows = take_cond(range(start, min(start + chunk, noise.shape[0])))
            part = reference_solve(field, noise[start : start + chunk], steps=steps, cond=rows)
            parts.append(part)
            bar.update(parts[-1].shape[0])
    return torch.cat(parts)


def _finetuned_json(path: str | None) -> dict:
    """The provenance JSON that save_straightened writes next to ``model.safetensors`` ({} when
    there is no ``--finetuned`` or no readable JSON: weights without their provenance file)."""
    if not path:
        return {}
    try:
        meta = json.loads(Path(path).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _finetuned_guidance(path: str | None) -> dict | None:
    """The guidance a straightened file was trained under, from its JSON: ``{"scale", "mode"}``
    (``mode`` keep or distill), or ``None`` (unguided, or no readable JSON)."""
    recorded = _finetuned_json(path).get("guidance")
    ok = isinstance(recorded, dict) and isinstance(recorded.get("scale"), (int, float))
    return recorded if ok and recorded.get("mode") in ("keep", "distill") else None


def _finetuned_iterations(path: str | None) -> int | None:
    """``iterations`` from the straightened file's JSON (``None`` when unknown)."""
    value = _finetuned_json(path).get("iterations")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _foreign_schedule(schedule, base, model) -> str | None:
    """The model a schedule was made for, if it is recorded and is neither ``base`` nor ``model``."""
    from .straighten import module_fingerprint

    prov = schedule.provenance
    made_for = prov.get("model")
    if prov.get("model_fingerprint") is not None:
        ours = {module_fingerprint(base.field), module_fingerprint(model.field)}
        return None if prov["model_fingerprint"] in ours else str(made_for or "another model")
    if made_for is None or made_for in (base.model_id, model.model_id):
        return None
    return str(made_for)


# -- straighten --------------------------------------------------------------------------------
def cmd_straighten(args: argparse.Namespace) -> int:
    from .schedule import Schedule

    # Everything that can be checked without the model is checked before the long phases.
    device = _device(args.device)
    config = _straighten_config(args)
    schedule = Schedule.load(args.schedule)
    kmax = _schedule_kmax(schedule, args.schedule, args.kmax)
    with _output_dir(args.out) as out:
        return _straighten(args, out, device, config, schedule, kmax)


def _straighten_config(args: argparse.Namespace):
    """The :class:`StraightenConfig` of the options, checked (holdout against --pairs, peft)."""
    from .errors import require
    from .straighten import StraightenConfig

    holdout = args.holdout
    if isinstance(holdout, float):
        if not 0.0 <= holdout < 1.0:
            raise ConfigError(
                f"--holdout {_num(holdout)} is not a fraction in [0, 1); give a fraction such as "
                "0.1 or a count such as 100"
            )
        held = max(1, round(holdout * args.pairs)) if holdout > 0 else 0
    else:
        if holdout < 0:
            raise ConfigError(f"--holdout {holdout} is negative; give a fraction or a count >= 0")
        held = holdout
    if held >= args.pairs:
        raise ConfigError(
            f"--holdout {_num(holdout)} holds out {held} of the {args.pairs} --pairs noises and "
            "leaves none for training; hold out fewer or raise --pairs"
        )
    if args.select == "best" and held == 0:
        raise ConfigError(
            "--select best needs held-out noises: give --holdout > 0 or --select last"
        )
    if args.lora_rank > 0:
        require("peft", "lora", f"--lora-rank {args.lora_rank} (LoRA straightening)")
    else:
        _refuse_unless(
            args, ["lora_targets", "lora_alpha"], "--lora-rank r > 0 (LoRA straightening)"
        )
    config = StraightenConfig(
        iterations=args.iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        lora_rank=args.lora_rank,
        lora_targets=args.lora_targets,
        lora_alpha=args.lora_alpha,
        seed=args.seed,
        objective=args.objective,
        holdout=holdout,
        select=args.select,
        eval_every=max(1, args.iterations // 20),
        checkpoint_every=args.checkpoint_every,
        guidance=args.guidance_mode,
        sharding=args.sharding,
    )
    config.check()
    from .straighten.train import check_batch_split

    check_batch_split(config.batch_size, "--batch-size")  # before the pairs, not after them
    return config


def _schedule_kmax(schedule, path: str, default: int) -> int:
    """The fine grid a schedule was made on (its recorded ``k_max``), else ``--kmax``."""
    if "k_max" not in schedule.provenance:
        return default
    raw = schedule.provenance["k_max"]
    whole = (
        isinstance(raw, (int, float))
        and not isinstance(raw, bool)
        and math.isfinite(raw)
        and raw == int(raw)
        and raw >= 1
    )
    if not whole:
        shown = "null" if raw is None else repr(raw) if isinstance(raw, str) else str(raw)
        raise ConfigError(
            f"schedule file {path} records k_max {shown}, which is not a positive whole number; "
            "fix it, or delete the k_max entry and pass --kmax"
        )
    return int(raw)


def _straighten(args, out: Path, device: str, config, schedule, kmax: int) -> int:
    from .noise import STAGE_OFFSETS, NoiseSource, OffsetNoise
    from .straighten import make_pairs, save_straightened, straighten

    model = _load(args)
    if not any(True for _ in model.field.parameters()):
        raise ConfigError(
            f"{model.model_id} has no weights to fine-tune; straighten needs a network (the "
            "built-in spiral is an analytic field: use it with schedule, sample and evaluate)"
        )
    recorded = _finetuned_guidance(args.finetuned)  # None without --finetuned
    # the teacher's fine trajectories run in --precision; fine-tuning runs in float32
    run = _conditioning(args, model, recorded, student=True, precise=False)
    teacher = _in_precision(args, model, run)
    _log_conditioning(run)
    if run.guidance_scale is None:
        _refuse_unless(args, ["guidance_mode"], "a guided model (--guidance-scale)")
    if config.lora_rank > 0:  # unknown --lora-targets: said now, not after the pairs
        from .straighten.adapters import lora_target_names

        lora_target_names(model.field, config.lora_targets)
    source = NoiseSource(model.sample_shape, seed=args.seed, device=device)
    pairs = make_pairs(
        teacher.field,
        OffsetNoise(source, STAGE_OFFSETS["pairs"]),
        [schedule],
        out / "pairs",
        fine_grid=kmax,
        samples=args.pairs,
        batch_size=args.batch,
        progress=not args.quiet,
        meta={"model": model.model_id, "seed": args.seed, **_precision_meta(args)},
        cond=teacher.cond,
    )
    result = straighten(
        run.field, pairs, schedule, config, out / "train", not args.quiet, cond=run.cond
    )
    if recorded is not None and recorded["mode"] == "distill":  # still a distilled student
        result.teacher_guidance = recorded
    first = _finetuned_json(args.finetuned).get("base_fingerprint")
    if first is not None:  # straightened again: the base it all came from stays the reference
        result.base_fingerprint = first
    path = save_straightened(result, out / "model.safetensors")
    last = result.history[-1] if result.history else {}
    print(
        f"{args.objective}: {result.iterations} iterations in {result.wall_s:.1f} s, held-out "
        f"one-step error {_num(last.get('heldout_loss'))} (best at iteration "
        f"{result.best_iteration})"
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
        for k in (
            "seed",
            "iterations",
            "pair_samples",
            "eval_samples",
            "batch_size",
            "model",
            "guidance_scale",
        )  # fmt: skip
        if getattr(args, k) is not None
    }
    config = replace(config, **overrides)
    report = run_demo(args.out, config, device=_device(args.device), progress=not args.quiet)
    if args.quiet:  # the stage lines and the table are off; where the results are is not
        print(f"wrote {report}")
    return 0


# -- train-base ----------------------------------------------------------------------------------
def cmd_train_base(args: argparse.Namespace) -> int:
    from . import distributed
    from .io import ensure_dir
    from .recipes.digits import train_and_save

    if distributed.is_distributed():  # every process would train the same model in full
        raise ConfigError(
            "train-base trains the small built-in models on one process; run it without torchrun"
        )

    if args.conditional and args.classifier_steps:
        raise ConfigError(
            "--classifier-steps sets the unconditional run's classifier; --conditional trains the "
            "flow model only: drop one of them"
        )
    out = ensure_dir(args.out)
    flow = {"steps": args.steps} if args.steps else {}
    classifier = {"steps": args.classifier_steps} if args.classifier_steps else {}
    if args.conditional:
        from .recipes.digits import train_and_save_conditional

        result = train_and_save_conditional(
            out,
            dataset=args.dataset,
            seed=args.seed,
            flow=flow,
            check_samples=args.check_samples,
            progress=not args.quiet,
        )
        print(
            f"wrote the class-conditional model to {result['paths'][0]} (guidance scale "
            f"{result['flow']['guidance']['scale']}); use it with --model digits-cond "
            f"--checkpoint {result['paths'][0]}"
        )
        return 0
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
    from . import __version__
    from .bellman.cost import METRICS
    from .data import DATASETS
    from .pipeline import DemoConfig
    from .schedule import SCHEDULES
    from .solvers import SOLVERS
    from .straighten import OBJECTIVES, StraightenConfig
    from .straighten.train import GUIDANCE, SHARDING

    parser = _Parser(
        prog="bossflow",
        description="Bellman optimal step sizes and straightening for flow-matching models. "
        "Time runs from 0 (noise) to 1 (data). Run 'bossflow COMMAND --help' for a command's "
        "options.",
    )
    parser.add_argument("--version", action="version", version=f"bossflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "schedule",
        help="measure the cost matrix and write Bellman optimal schedules",
        description="Run fine Euler trajectories of the model, measure the cost of one Euler jump "
        "between any two fine-grid times (paper eq. 5) and pick, by dynamic programming, the "
        "least-cost schedule for each NFE. Rerunning with the same --out resumes an interrupted run.",
    )
    add_model_options(
        p, precision=" (the cost matrix and teacher solves; sampler learning runs in float32)"
    )
    p.add_argument(
        "--nfe",
        type=_int_list,
        default=[2, 4, 6, 8],
        help="Euler step budgets, comma-separated",
    )
    p.add_argument(
        "--kmax", type=_positive, default=100, help="intervals N of the fine uniform grid"
    )
    p.add_argument(
        "--samples",
        type=_positive,
        default=256,
        help="number of noises M averaged in the cost matrix",
    )
    p.add_argument(
        "--batch-size",
        type=_positive,
        default=64,
        help="trajectories integrated at once; does not change the result",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="noise seed: sample m's noise depends only on (seed, m)"
    )
    p.add_argument(
        "--metric",
        default="sq_l2",
        choices=list(METRICS),
        help="cost of one Euler jump (sq_l2 is the paper's)",
    )
    p.add_argument(
        "--out",
        default="runs/schedule",
        help="output folder for cost_matrix.npz and schedule_nfe*.json",
    )
    g = p.add_argument_group(
        "learned samplers (--method learned)",
        "Fit each budget's times and per-step velocity scales to the final error against fine "
        "teacher solves of the same noises (network frozen), starting from the Bellman schedule; "
        "one sampler per solver family, the best on held-out noises is kept. Writes "
        "learned_nfe{K}.json beside the Bellman schedules.",
    )
    g.add_argument(
        "--method",
        choices=["bellman", "learned"],
        default="bellman",
        help="bellman: the paper's DP schedules; learned: also learn samplers from them",
    )
    g.add_argument(
        "--solvers",
        type=_choice_list(SOLVERS, "solver"),
        default=["euler", "ab2"],
        help="solver families to learn, comma-separated (euler, heun, midpoint, ab2, ab3)",
    )
    g.add_argument(
        "--no-scales", action="store_true", help="learn times only (a plain Euler result exports)"
    )
    g.add_argument(
        "--teacher-steps",
        type=_positive,
        default=200,
        help="Heun steps of the teacher solve from each noise",
    )
    g.add_argument(
        "--learn-iterations", type=_positive, default=200, help="Adam steps per sampler at most"
    )
    g.add_argument(
        "--learn-lr", type=_positive_float, default=0.05, help="Adam learning rate of the sampler"
    )
    g.add_argument(
        "--learn-holdout",
        type=_fraction_or_count,
        default=0.25,
        help="noises held out to pick and stop the learning: a fraction or a count",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser(
        "sample",
        help="sample from a model on one schedule and write a PNG grid",
        description="Sample --samples noises with one schedule: a schedule JSON from 'bossflow "
        "schedule' or --nfe K steps of a built-in --spacing. Images (1 or 3 channels) become a "
        "PNG grid, 2-D points a scatter plot; any other shape is saved as a tensor (.pt).",
    )
    add_model_options(p)
    p.add_argument("--schedule", help="one schedule JSON (from 'bossflow schedule')")
    p.add_argument(
        "--nfe", type=_positive, help="steps of a built-in --spacing grid, instead of --schedule"
    )
    p.add_argument(
        "--spacing", default="uniform", choices=list(SCHEDULES), help="built-in grid for --nfe"
    )
    p.add_argument(
        "--solver",
        choices=list(SOLVERS),
        help="ODE solver (default: a sampler file's own, else euler)",
    )
    p.add_argument(
        "--samples", "--n", dest="n", type=_positive, default=64,
        help="number of samples (--n: the old name; under torchrun use --samples, torchrun "
        "reads --n as an abbreviation of its own options)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--scale", type=_positive, default=8, help="pixel upscaling of the grid")
    p.add_argument(
        "--out",
        default="samples.png",
        help="PNG file to write (samples that are not images go to the same name with .pt)",
    )
    p.add_argument(
        "--save-tensor", help="also save the raw samples to this .pt file (default: not saved)"
    )
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "evaluate",
        help="compare schedules by error to a reference solve (and Fréchet distance on digits)",
        description="Sample the same held-out noises with every schedule given and compare each "
        "with a fine Euler reference solve from the same noise: MSE, PSNR (images), Fréchet "
        "distance (digits). Writes report.md, plots and results.json (last) in --out.",
    )
    add_model_options(p)
    p.add_argument(
        "--schedule",
        action="append",
        help="a schedule JSON (from 'bossflow schedule'); repeat the option for several "
        "(default: none)",
    )
    p.add_argument(
        "--nfe", type=_int_list, help="step counts of --spacing grids, comma-separated, e.g. 2,4"
    )
    p.add_argument(
        "--spacing",
        default=["uniform"],
        type=_choice_list(SCHEDULES, "spacing"),
        help=f"built-in grids for --nfe, comma-separated from {', '.join(SCHEDULES)}",
    )
    p.add_argument("--samples", type=_positive, default=256, help="held-out evaluation noises")
    p.add_argument(
        "--reference-steps", type=_positive, default=1000, help="Euler steps of the reference solve"
    )
    p.add_argument(
        "--method",
        help="method label in the results, any text, e.g. boss for a --finetuned model "
        "(default: each schedule's own: uniform, edm, bellman)",
    )
    p.add_argument(
        "--solver",
        choices=list(SOLVERS),
        help="solver used on every plain schedule (a sampler file brings its own); NFE is "
        "counted (default: a sampler file's own, else euler)",
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--out", default="runs/evaluate", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no stage lines or progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "straighten",
        help="fine-tune a model on a Bellman schedule (BOSS, full or LoRA) or by reflow",
        description="Make straightening pairs (reference states at the schedule's times) and "
        "fine-tune the model so one Euler step per interval lands on them (paper eq. 9). "
        "Rerunning with the same --out resumes pairs and training.",
    )
    add_model_options(p, precision=" (the teacher's pairs; fine-tuning runs in float32)")
    lib = StraightenConfig()  # the library's defaults are the CLI's
    p.add_argument(
        "--schedule", required=True, help="schedule JSON from 'bossflow schedule' (required)"
    )
    p.add_argument(
        "--pairs",
        type=_positive,
        default=4096,
        help="training noises, of which --holdout are held out for validation",
    )
    p.add_argument(
        "--kmax",
        type=_positive,
        default=100,
        help="fine grid intervals if the schedule does not record its k_max",
    )
    p.add_argument(
        "--iterations", type=_positive, default=lib.iterations, help="optimisation steps"
    )
    p.add_argument("--batch-size", type=_positive, default=lib.batch_size, help="pairs per step")
    p.add_argument(
        "--batch",
        type=_positive,
        default=256,
        help="trajectories integrated at once while making pairs",
    )
    p.add_argument("--lr", type=_positive_float, default=lib.lr, help="peak learning rate")
    p.add_argument(
        "--warmup",
        type=_non_negative,
        default=lib.warmup,
        help="iterations of linear learning-rate warmup",
    )
    p.add_argument(
        "--lora-rank",
        type=_non_negative,
        default=lib.lora_rank,
        help="0: full fine-tuning; r > 0: LoRA adapters of rank r (needs peft)",
    )
    p.add_argument(
        "--lora-targets",
        type=_name_list,
        default=None,
        help="layers that get LoRA adapters: names or name suffixes, comma-separated (e.g. "
        "to_q,to_k,to_v,to_out.0) (default: the attention, projection and feed-forward linears "
        "of a diffusers model, every Linear and Conv2d of any other)",
    )
    p.add_argument(
        "--lora-alpha",
        type=_positive_float,
        default=lib.lora_alpha,
        help="LoRA scale numerator: adapters add (alpha / r) B A (default: not set, alpha = r, a "
        "scale of 1; the official BOSS code uses alpha = 1)",
    )
    p.add_argument(
        "--sharding",
        choices=list(SHARDING),
        default=lib.sharding,
        help="under torchrun, full fine-tuning: ddp (every process holds the model) or fsdp "
        "(FSDP2: weights, gradients, Adam moments and EMA split over the processes, for models "
        "whose training state does not fit one device); LoRA runs use ddp",
    )
    p.add_argument(
        "--guidance-mode",
        choices=list(GUIDANCE),
        default=lib.guidance,
        help="with --guidance-scale: keep (the straightened network is sampled with the same "
        "guidance) or distill (it learns the guided velocity and is sampled without guidance, "
        "one call of B rows)",
    )
    p.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        default=lib.objective,
        help="boss: one Euler step per schedule interval (paper eq. 9); reflow: the baseline",
    )
    p.add_argument(
        "--holdout",
        type=_fraction_or_count,
        default=lib.holdout,
        help="noises held out to track the one-step error: a fraction (0.1) or a count (100)",
    )
    p.add_argument(
        "--select",
        choices=["best", "last"],
        default=lib.select,
        help="keep the weights with the best held-out error, or the last ones",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_non_negative,
        default=lib.checkpoint_every,
        help="iterations between checkpoints (0: only at the end)",
    )
    p.add_argument("--seed", type=int, default=lib.seed, help="noise and training seed")
    p.add_argument(
        "--out", default="runs/straighten", help="output folder (pairs/, train/, model.safetensors)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_straighten)

    p = sub.add_parser(
        "demo",
        help="the whole method on the shipped digits model, with a report",
        description="Bellman schedules for NFE 2, 4, 6, 8 -> BOSS (full and LoRA) for NFE 2 and 4 "
        "-> reflow at the same iterations -> learned samplers on the base and BOSS models -> "
        "evaluation of every method on held-out noises -> report.md, results.json, plots and "
        "sample grids. Rerun to resume.",
    )
    full, quick = DemoConfig(), DemoConfig.quick()

    def sizes(name: str) -> str:
        return f"(default: {getattr(full, name)}; with --quick {getattr(quick, name)})"

    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="a sub-minute version (tiny sizes)")
    p.add_argument("--seed", type=int, help=f"seed of every noise and training run {sizes('seed')}")
    p.add_argument(
        "--iterations", type=_positive, help=f"fine-tuning iterations per run {sizes('iterations')}"
    )
    p.add_argument(
        "--pair-samples", type=_positive, help=f"straightening noises {sizes('pair_samples')}"
    )
    p.add_argument(
        "--eval-samples", type=_positive, help=f"held-out evaluation noises {sizes('eval_samples')}"
    )
    p.add_argument(
        "--batch-size",
        type=_positive,
        help="fine-tuning batch, split over the processes under torchrun (a multiple of their "
        f"number) {sizes('batch_size')}",
    )
    p.add_argument(
        "--model",
        choices=["digits", "digits-cond"],
        default="digits",
        help="the embedded model: digits, or digits-cond (class-conditional, sampled with "
        "classifier-free guidance; noise m gets label m mod 10)",
    )
    p.add_argument(
        "--guidance-scale",
        type=_finite_float,
        metavar="W",
        help="digits-cond's guidance scale (default: the scale recorded with its weights)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... or auto")
    p.add_argument("--quiet", action="store_true", help="no stage lines or progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "train-base",
        help="retrain the shipped digits model and classifier (writes .safetensors + .json)",
        description="Train the small digits UNet (flow matching) and the digit classifier used "
        "for the Fréchet distance, from scratch, and write them as .safetensors + .json.",
    )
    p.add_argument("--out", default="runs/base", help="folder for the weights")
    p.add_argument("--steps", type=_positive, help="flow training steps (default: as shipped)")
    p.add_argument(
        "--classifier-steps", type=_positive, help="classifier training steps (default: as shipped)"
    )
    p.add_argument(
        "--check-samples",
        type=_at_least_two,
        default=500,
        help="samples drawn to check the trained flow",
    )
    p.add_argument(
        "--dataset",
        default="digits",
        choices=list(DATASETS),
        help="training data (mnist needs the 'mnist' extra)",
    )
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument(
        "--conditional",
        action="store_true",
        help="train the class-conditional model (label dropout for classifier-free guidance) "
        "instead, checked with the shipped classifier; writes DATASET-cond.safetensors + .json",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_base)
    return parser


# Commands whose --out is a folder they write into; main() holds an output_lock on it.
_RESUMES = {"schedule", "straighten", "demo", "train-base"}  # (evaluate and sample keep none)
_WRITES_OUT_FOLDER = {"schedule", "straighten", "evaluate", "demo", "train-base"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bossflow`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = _given_options(parser, sys.argv[1:] if argv is None else list(argv))
    from . import distributed

    with _terminate_as_interrupt():
        return _run(args, argv, distributed)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (torchrun stopping its workers after a failure or a Ctrl-C, a job scheduler's
    stop) unwinds like Ctrl-C: atomic writes remove their temporaries and the output lock is
    released (by default the process ended at once, leaving a half-written checkpoint's
    temporary beside the checkpoint)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return

    def interrupt(signum: int, frame: object) -> None:
        # once: a second SIGTERM (a scheduler's and torchrun's both) must not break the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        # (None: a handler installed outside Python, which cannot be put back from here)
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _run(args: argparse.Namespace, argv: Sequence[str] | None, distributed: Any) -> int:
    """:func:`main`'s body: the command, its output lock, and one message per failure."""
    try:
        # torchrun (WORLD_SIZE > 1): join the process group; only rank 0 prints
        if distributed.init_from_env(getattr(args, "device", None)) and distributed.rank() > 0:
            import os
            import warnings

            args.quiet, sys.stdout = True, open(os.devnull, "w")  # noqa: SIM115
            warnings.simplefilter("ignore")  # rank 0 shows the same warnings once
        if args.command in _WRITES_OUT_FOLDER:  # one run at a time per output folder
            from .io import output_lock

            command = " ".join(["bossflow", *(sys.argv[1:] if argv is None else argv)])
            # checked and created before the lock; removed again if the run fails and leaves it empty
            with _output_dir(args.out) as out, output_lock(out, command[:200]):
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except BossflowError as err:
        if distributed.report_failure(err):  # one message per job, from the rank that failed
            where = distributed.rank_label()
            print(f"bossflow {args.command}: error: {where}{err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `bossflow ... | head`: the reader left; no traceback about it
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command ended by SIGPIPE
    except Exception as err:  # a bug: the traceback is printed; the other ranks stop waiting
        distributed.report_failure(err)
        raise
    except KeyboardInterrupt:
        # Ctrl-C reaches every rank: one message; a rank interrupted alone stops the others
        if distributed.report_failure(KeyboardInterrupt("interrupted")):
            again = "resume" if args.command in _RESUMES else "start again"
            print(f"bossflow {args.command}: interrupted; rerun the same command to {again}",
                  file=sys.stderr)  # fmt: skip
        return 130
    finally:
        distributed.shutdown()


def _given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dest names of the options ``argv`` gives: parsed again with no defaults at all
    (``parser``, done with, loses its defaults)."""

    def no_defaults(p: argparse.ArgumentParser) -> None:
        p._defaults.clear()  # set_defaults(func=...)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    no_defaults(sub)
            elif action.option_strings:
                action.default = argparse.SUPPRESS

    no_defaults(parser)
    parsed, _ = parser.parse_known_args(argv)
    return set(vars(parsed)) - {"command"}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["main", "build_parser"]
