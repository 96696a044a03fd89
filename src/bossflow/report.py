"""Reports: sample grids (Pillow), plots (matplotlib), a markdown table and ``results.json``.

Pillow and matplotlib are the optional extra ``plots`` and are imported only when an image is
drawn. Plots use matplotlib's object-oriented API on an Agg canvas (``matplotlib.figure.Figure``),
so no display is opened and the global backend and pyplot state are left alone. Every file is
written atomically (:func:`bossflow.io.atomic_write`): it is either complete or absent.

``results.json`` is strict JSON: non-finite floats (a PSNR of ``inf`` for an exact match, a NaN
standard error from one sample) are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"``, which
:func:`read_results` (and Python's ``float``) turn back into floats.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import BossflowError, ConfigError, require
from .io import atomic_write_bytes, atomic_write_text, ensure_dir
from .metrics import EvalRecord, method_rank
from .sampler import Sampler
from .schedule import Schedule

__all__ = [
    "text_grid",
    "save_grid",
    "save_comparison_grid",
    "plot_schedules",
    "plot_points",
    "plot_error_vs_nfe",
    "markdown_table",
    "write_results",
    "read_results",
    "write_report",
]

_RESULTS_FORMAT = "bossflow.results/1"
#: The label of a fine reference solve's own row: drawn as a horizontal line in plots.
REFERENCE_LABEL = "reference"
_PLOT_METRICS = ("mse_to_reference", "psnr", "frechet")
_METRIC_LABELS = {
    "mse_to_reference": "MSE to reference (per dimension)",
    "psnr": "PSNR (dB)",
    "frechet": "Fréchet distance",
}


# -- image grids --------------------------------------------------------------------------------
_SHADES = " .:-=+*#%@"


def text_grid(
    rows: Mapping[str, Tensor],
    value_range: tuple[float, float] = (-1.0, 1.0),
    max_images: int = 8,
) -> str:
    """Grey-scale images as text, one row of images per entry, for terminals and markdown.

    Each pixel becomes two characters from ``" .:-=+*#%@"`` (dark to bright), so small images
    such as 8x8 digits stay readable without a picture. Colour images are averaged to grey.

    Args:
        rows: label -> (B, C, H, W) images; the first ``max_images`` of each are drawn.
        value_range: the pixel values drawn darkest and brightest.
        max_images: images per row.

    Returns:
        The text, one label line above each row of images.
    """
    lines: list[str] = []
    for label, images in rows.items():
        pixels = _to_uint8(images[:max_images], value_range).astype(np.float64).mean(-1)
        idx = np.minimum((pixels / 256.0 * len(_SHADES)).astype(int), len(_SHADES) - 1)
        lines.append(label)
        for y in range(idx.shape[1]):
            lines.append("  ".join("".join(2 * _SHADES[v] for v in img[y]) for img in idx).rstrip())
        lines.append("")
    return "\n".join(lines)


def _to_uint8(images: Tensor, value_range: tuple[float, float]) -> np.ndarray:
    """(B, C, H, W) tensor -> (B, H, W, C) uint8, ``lo -> 0`` and ``hi -> 255`` (clamped)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ConfigError(
            f"images must be a tensor shaped (B, C, H, W) with C = 1 or 3, got {shape}"
        )
    if images.shape[0] == 0:
        raise ConfigError("cannot draw a grid of zero images")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ConfigError(f"value_range must be (low, high) with low < high, got {value_range!r}")
    x = images.detach().cpu().double()
    # Non-finite pixels (a diverged sample) are drawn, not fatal: NaN and -inf as low, +inf as high.
    x = torch.nan_to_num(x, nan=lo, posinf=hi, neginf=lo).clamp(lo, hi)
    x = torch.round((x - lo) / (hi - lo) * 255.0).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _tile(pixels: np.ndarray, nrow: int, padding: int, pad_value: int) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (rows*(H+p)+p, nrow*(W+p)+p, C) array, row-major order."""
    b, h, w, c = pixels.shape
    rows = math.ceil(b / nrow)
    grid = np.full(
        (rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8
    )
    for k in range(b):
        r, q = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y : y + h, x : x + w] = pixels[k]
    return grid


def _upscale(grid: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an (H, W, C) array by an integer factor."""
    if not isinstance(scale, int) or scale < 1:
        raise ConfigError(f"scale must be a positive integer, got {scale!r}")
    return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def _pil_image(array: np.ndarray):
    """(H, W, 1 or 3) uint8 -> a Pillow image (mode L or RGB)."""
    image_mod = require("PIL.Image", "plots", "sample grids")
    # uint8 (H, W) becomes mode L, (H, W, 3) mode RGB.
    return image_mod.fromarray(
        np.ascontiguousarray(array[:, :, 0] if array.shape[2] == 1 else array)
    )


def _save_png(image: Any, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    return atomic_write_bytes(path, data)


def save_grid(
    images: Tensor,
    path: str | os.PathLike,
    nrow: int | None = None,
    scale: int = 8,
    value_range: tuple[float, float] = (-1.0, 1.0),
    padding: int = 1,
    pad_value: int = 128,
) -> Path:
    """Write a PNG grid of images, upscaled with nearest-neighbour so 8x8 digits are visible.

    The grid is laid out at the images' own resolution (``padding`` pixels of grey ``pad_value``
    around and between images) and then every pixel becomes a ``scale`` x ``scale`` block, so the
    PNG is ``scale * (rows * (H + padding) + padding)`` pixels high and
    ``scale * (nrow * (W + padding) + padding)`` wide. Values map linearly from ``value_range`` to
    0..255 (``-1`` black, ``+1`` white by default), clamped; NaN is drawn as the low value.

    Args:
        images: (B, C, H, W) with C = 1 (grey) or 3 (RGB).
        path: output PNG file.
        nrow: images per row (default ``ceil(sqrt(B))``).
        scale: integer upscaling factor.
        value_range: (low, high) values mapped to black and white.
        padding: pixels between images, before upscaling.
        pad_value: grey level 0..255 of the padding.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    pixels = _to_uint8(images, value_range)
    if nrow is None:
        nrow = math.ceil(math.sqrt(pixels.shape[0]))
    if not isinstance(nrow, int) or nrow < 1:
        raise ConfigError(f"nrow must be a positive integer, got {nrow!r}")
    grid = _upscale(_tile(pixels, nrow, padding, pad_value), scale)
    return _save_png(_pil_image(grid), path)


def save_comparison_grid(
    rows: Mapping[str, Tensor],
    path: str | os.PathLike,
    ncol: int | None = None,
    scale: int = 8,
    value_range: tuple[float, float] = (-1.0, 1.0),
    padding: int = 1,
    pad_value: int = 128,
) -> Path:
    """Write a PNG with one row of samples per method and the method's label on the left.

    Column ``j`` of every row should come from the same noise, so the rows compare methods sample
    by sample. The labels are drawn in Pillow's default font, black on white.

    Args:
        rows: label -> (B, C, H, W) samples; all with the same C, H, W. Rows keep the mapping's order.
        path: output PNG file.
        ncol: images per row (default: as many as the shortest row has); the first ``ncol`` of each
            row are drawn.
        scale: integer nearest-neighbour upscaling factor of the images.
        value_range: (low, high) values mapped to black and white.
        padding: pixels between images, before upscaling.
        pad_value: grey level 0..255 of the padding.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not isinstance(rows, Mapping) or not rows:
        raise ConfigError("rows must be a non-empty mapping of label -> (B, C, H, W) samples")
    pixels = {str(label): _to_uint8(images, value_range) for label, images in rows.items()}
    shapes = {label: p.shape[1:] for label, p in pixels.items()}
    if len(set(shapes.values())) > 1:
        raise ConfigError(f"all rows must have the same (H, W, C) image shape, got {shapes}")
    if ncol is None:
        ncol = min(p.shape[0] for p in pixels.values())
    short = {label: p.shape[0] for label, p in pixels.items() if p.shape[0] < ncol}
    if not isinstance(ncol, int) or ncol < 1 or short:
        raise ConfigError(
            f"ncol must be a positive integer no larger than every row's batch, got {ncol!r} "
            f"(rows with fewer images: {short})"
        )
    strips = [_upscale(_tile(p[:ncol], ncol, padding, pad_value), scale) for p in pixels.values()]
    # Consecutive strips share their padding line: drop the top one of every strip but the first.
    pad_px = padding * scale
    body = np.concatenate([strips[0]] + [s[pad_px:] for s in strips[1:]], axis=0)

    image_mod = require("PIL.Image", "plots", "sample grids")
    draw_mod = require("PIL.ImageDraw", "plots", "sample grids")
    font_mod = require("PIL.ImageFont", "plots", "sample grids")
    font = font_mod.load_default()
    measure = draw_mod.Draw(image_mod.new("L", (1, 1)))
    boxes = {label: measure.textbbox((0, 0), label, font=font) for label in pixels}
    margin = max(4, scale)
    label_w = max(box[2] for box in boxes.values()) + 2 * margin

    strip_h = strips[0].shape[0] - pad_px
    canvas = _pil_image(body)
    mode, white = canvas.mode, (255 if canvas.mode == "L" else (255, 255, 255))
    out = image_mod.new(mode, (label_w + canvas.width, canvas.height), white)
    out.paste(canvas, (label_w, 0))
    draw = draw_mod.Draw(out)
    black = 0 if mode == "L" else (0, 0, 0)
    for r, (label, box) in enumerate(boxes.items()):
        centre = pad_px + r * strip_h + (strip_h - pad_px) / 2
        y = centre - (box[1] + box[3]) / 2
        draw.text((margin - box[0], y), label, fill=black, font=font)
    return _save_png(out, path)


# -- plots --------------------------------------------------------------------------------------
def _figure(width: float = 6.0, height: float = 4.0):
    """A matplotlib Figure on an Agg canvas, with no pyplot and no global backend change."""
    require("matplotlib", "plots", "plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Any, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    return atomic_write_bytes(path, data)


def plot_schedules(
    schedules: Mapping[str, Schedule],
    path: str | os.PathLike,
    title: str = "Schedules: time t_k after k steps",
) -> Path:
    """Plot each schedule's time ``t_k`` against its step index ``k`` (one line per schedule).

    Args:
        schedules: label -> :class:`~bossflow.schedule.Schedule` or
            :class:`~bossflow.sampler.Sampler` (its times are drawn).
        path: output PNG file.
        title: the plot's title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not isinstance(schedules, Mapping) or not schedules:
        raise ConfigError("schedules must be a non-empty mapping of name -> Schedule")
    for name, schedule in schedules.items():
        if not isinstance(schedule, (Schedule, Sampler)):
            raise ConfigError(
                f"schedules[{name!r}] is a {type(schedule).__name__}, not a Schedule or Sampler"
            )
    fig = _figure()
    ax = fig.add_subplot()
    for name, schedule in schedules.items():
        ax.plot(np.arange(len(schedule.times)), schedule.times, marker="o", label=str(name))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step index k")
    ax.set_ylabel("time t_k (0 = noise, 1 = data)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save_figure(fig, path)


def plot_points(
    rows: Mapping[str, Tensor],
    path: str | os.PathLike,
    title: str = "Samples",
    max_points: int = 2000,
) -> Path:
    """Scatter plot of 2-D point samples, one colour per entry (e.g. per method).

    Args:
        rows: label -> (B, 2) samples.
        path: output PNG file.
        title: the plot's title.
        max_points: at most this many points of each entry are drawn.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not isinstance(rows, Mapping) or not rows:
        raise ConfigError("rows must be a non-empty mapping of label -> (B, 2) points")
    for label, x in rows.items():
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ConfigError(f"points {label!r} must be a tensor shaped (B, 2), got {shape}")
    fig = _figure(5.0, 5.0)
    ax = fig.add_subplot()
    for label, x in rows.items():
        pts = x[:max_points].detach().cpu().double().numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.6, label=str(label))
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("x[0]")
    ax.set_ylabel("x[1]")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(rows) > 1:
        ax.legend(markerscale=3)
    return _save_figure(fig, path)


def _as_records(records: Iterable[EvalRecord | Mapping[str, Any]]) -> list[EvalRecord]:
    out = []
    for r in records:
        out.append(r if isinstance(r, EvalRecord) else EvalRecord.from_dict(r))
    return out


def _sorted(records: list[EvalRecord]) -> list[EvalRecord]:
    """By method (:func:`~bossflow.metrics.method_rank`), then NFE, then iterations."""
    return sorted(
        records,
        key=lambda r: (
            method_rank(r.method),
            r.nfe,
            -1 if r.iterations is None else r.iterations,
        ),
    )


def plot_error_vs_nfe(
    records: Iterable[EvalRecord | Mapping[str, Any]],
    path: str | os.PathLike,
    metric: str = "mse_to_reference",
    title: str | None = None,
) -> Path:
    """Plot a metric against NFE, one line per method.

    The y axis is logarithmic for ``mse_to_reference`` and ``frechet`` (points that are zero,
    missing or non-finite cannot be drawn there and are left out, which drops the ``reference``
    row's zero error) and linear for ``psnr``. ``mse_to_reference`` gets error bars of one standard
    error (``mse_stderr``). Rows labelled ``reference`` (a fine solve with hundreds of steps) are
    drawn as horizontal dashed lines, not as points at their NFE, which would squeeze every other
    method against the y axis.

    Args:
        records: :class:`~bossflow.metrics.EvalRecord` objects or their dicts.
        path: output PNG file.
        metric: ``"mse_to_reference"``, ``"psnr"`` or ``"frechet"``.
        title: the plot's title (default: the metric against NFE).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if metric not in _PLOT_METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of {list(_PLOT_METRICS)}")
    log_y = metric != "psnr"
    fig = _figure()
    ax = fig.add_subplot()
    nfes: set[int] = set()
    recs = _sorted(_as_records(records))
    drawn = False
    for method in dict.fromkeys(r.method for r in recs):  # report order, each once
        rows = [r for r in recs if r.method == method]
        pts = [(r, getattr(r, metric)) for r in rows]
        pts = [
            (r, v) for r, v in pts if v is not None and math.isfinite(v) and (v > 0 or not log_y)
        ]
        if not pts:
            continue
        drawn = True
        if method == REFERENCE_LABEL:
            for r, v in pts:
                ax.axhline(
                    v, color="black", linestyle="--", linewidth=1, label=f"{method} ({r.nfe} steps)"
                )
            continue
        x = [r.nfe for r, _ in pts]
        y = [v for _, v in pts]
        nfes.update(x)
        yerr = None
        if metric == "mse_to_reference":
            yerr = [r.mse_stderr if math.isfinite(r.mse_stderr) else 0.0 for r, _ in pts]
        ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, label=method)
    if log_y:
        ax.set_yscale("log")
    if nfes:
        ax.set_xticks(sorted(nfes))
    if drawn:
        ax.legend()
    ax.set_xlabel("NFE")
    ax.set_ylabel(_METRIC_LABELS[metric])
    ax.set_title(title or f"{_METRIC_LABELS[metric]} vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    return _save_figure(fig, path)


# -- tables and results.json --------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    if value is None or math.isnan(value):
        return "—"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return format(value, spec)


def markdown_table(records: Iterable[EvalRecord | Mapping[str, Any]]) -> str:
    """A markdown table of records, sorted by method (:func:`~bossflow.metrics.method_rank`) then NFE.

    Columns: method | NFE | MSE to reference (± s.e.) | PSNR (dB) | Fréchet | wall s | iterations.
    MSE and standard error use 3 and 2 significant digits, PSNR 2 decimals, Fréchet 4 significant
    digits, wall time 3 significant digits; missing values are "—", infinite ones "∞".

    Returns:
        The table, one line per record after the header, ending with a newline.
    """
    lines = [
        "| method | NFE | MSE to reference (± s.e.) | PSNR (dB) | Fréchet | wall s | iterations |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in _sorted(_as_records(records)):
        mse = _fmt(r.mse_to_reference, ".3g")
        if not math.isnan(r.mse_stderr):
            mse += f" ± {_fmt(r.mse_stderr, '.2g')}"
        iterations = "—" if r.iterations is None else str(r.iterations)
        cells = [
            r.method,
            str(r.nfe),
            mse,
            _fmt(r.psnr, ".2f"),
            _fmt(r.frechet, ".4g"),
            _fmt(r.wall_s, ".3g"),
            iterations,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(obj: Any, where: str) -> Any:
    """A strict-JSON copy of ``obj``: non-finite floats -> "inf"/"-inf"/"nan", numpy/torch -> lists."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(obj, (np.ndarray, Tensor)):
        arr = obj.detach().cpu().numpy() if isinstance(obj, Tensor) else obj
        return _jsonable(arr.tolist(), where)
    if isinstance(obj, (os.PathLike,)):
        return os.fspath(obj)
    if isinstance(obj, (EvalRecord, Schedule, Sampler)):
        return _jsonable(obj.to_dict(), where)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise BossflowError(f"{where}: JSON keys must be strings, got {key!r}")
            out[key] = _jsonable(value, f"{where}[{key!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise BossflowError(
        f"{where} is a {type(obj).__name__}, which results.json cannot store; pass numbers, "
        "strings, lists or dicts"
    )


def write_results(
    records: Iterable[EvalRecord | Mapping[str, Any]],
    path: str | os.PathLike,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{"format": ..., "records": [...], **extra}`` as strict JSON, atomically.

    Each record holds ``method``, ``nfe``, ``mse_to_reference``, ``mse_stderr``, ``psnr``,
    ``frechet``, ``wall_s``, ``iterations``; records are sorted as in :func:`markdown_table`.
    Non-finite floats anywhere become the strings ``"inf"``, ``"-inf"``, ``"nan"``; ``None`` is
    ``null`` (e.g. a Fréchet distance that was not measured). NumPy and torch values become
    numbers or lists, paths strings.

    Args:
        records: :class:`~bossflow.metrics.EvalRecord` objects or their dicts.
        path: output file, conventionally ``results.json``.
        extra: provenance (model, seeds, versions, settings ...); may not use the keys
            ``"records"`` or ``"format"``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    extra = dict(extra or {})
    clash = sorted({"records", "format"} & set(extra))
    if clash:
        raise ConfigError(f"extra may not contain the reserved keys {clash}")
    payload = {
        "format": _RESULTS_FORMAT,
        "records": [r.to_dict() for r in _sorted(_as_records(records))],
        **extra,
    }
    text = json.dumps(_jsonable(payload, "results"), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def read_results(path: str | os.PathLike) -> tuple[list[EvalRecord], dict[str, Any]]:
    """Read a file written by :func:`write_results`.

    Returns:
        ``(records, extra)``: the records as :class:`~bossflow.metrics.EvalRecord` (non-finite
        strings turned back into floats) and every other top-level key except ``"format"``, as
        stored (non-finite numbers there stay the strings ``"inf"``, ``"-inf"``, ``"nan"``).

    Raises:
        BossflowError: the file is missing, not JSON, or not a bossflow results file; the message
            names the file and the problem.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BossflowError(f"results file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BossflowError(f"results file {path} is not readable JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise BossflowError(
            f"{path} is not a bossflow results file: expected a JSON object with a 'records' list"
        )
    records = []
    for i, item in enumerate(data["records"]):
        try:
            records.append(EvalRecord.from_dict(item))
        except ConfigError as err:
            raise BossflowError(f"{path}: record {i} is malformed: {err}") from None
    extra = {k: v for k, v in data.items() if k not in ("records", "format")}
    return records, extra


# -- the report ---------------------------------------------------------------------------------
def _sample_kind(rows: Mapping[str, Tensor]) -> str:
    """``"images"`` ((B, C, H, W), C = 1 or 3), ``"points"`` ((B, 2)) or ``"other"``."""
    shapes = {tuple(x.shape[1:]) for x in rows.values() if isinstance(x, Tensor)}
    if len(shapes) == 1:
        (shape,) = shapes
        if len(shape) == 3 and shape[0] in (1, 3):
            return "images"
        if shape == (2,):
            return "points"
    return "other"


def write_report(
    out_dir: str | os.PathLike,
    records: Sequence[EvalRecord | Mapping[str, Any]],
    schedules: Mapping[str, Schedule] | None = None,
    samples: Mapping[str, Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
    title: str = "bossflow report",
    scale: int = 8,
    more_samples: Mapping[str, tuple[str, Mapping[str, Tensor]]] | None = None,
    notes: Sequence[str] = (),
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Write a complete report into ``out_dir`` and return the path of ``report.md``.

    Files written (each atomically; the folder is created if needed), in this order:

    - ``error_vs_nfe.png``: :func:`plot_error_vs_nfe` of the MSE to the reference;
    - ``frechet_vs_nfe.png``: the same for the Fréchet distance, if any record has one;
    - ``schedules.png``: :func:`plot_schedules`, if ``schedules`` is given;
    - ``samples.png``: :func:`save_comparison_grid` of ``samples`` if they are images (1 or 3
      channels), :func:`plot_points` if they are 2-D points; other shapes are not drawn (a note
      in the report says so);
    - one PNG per entry of ``more_samples``, drawn the same way;
    - ``report.md``: the title, :func:`markdown_table`, the notes, every image above, each
      schedule's times and a short provenance (its scalar entries);
    - ``results.json`` *last*: :func:`write_results` of ``records`` and ``extra`` (the full
      provenance). Its presence marks a complete report: a run killed before the end leaves no
      ``results.json`` (one from an earlier run in ``out_dir`` is removed first).

    Args:
        out_dir: output folder (a clear :class:`~bossflow.errors.BossflowError` if it is a file).
        records: the evaluation records.
        schedules: name -> schedule to plot and list.
        samples: method label -> samples from the same noises, one grid row (or one colour) each.
        extra: provenance (model, data, seeds, settings, versions), stored in ``results.json``;
            its strings and numbers are also listed in ``report.md``.
        title: the report's heading.
        scale: upscaling factor of the sample grids.
        more_samples: more sample figures: file name -> (caption, rows like ``samples``).
        notes: lines shown under the results (e.g. what was skipped and why).
        value_range: the image values drawn black and white ((0, 1) for uncentred data).

    Returns:
        Path of ``report.md``.
    """
    from .distributed import is_rank_zero

    if not is_rank_zero():  # several processes: the report is rank 0's (no collective below)
        return Path(out_dir) / "report.md"
    out = ensure_dir(out_dir)
    recs = _sorted(_as_records(records))
    extra = dict(extra or {})
    notes = list(notes)
    # Fail before writing anything if the plotting extra is missing or extra cannot be stored.
    require("matplotlib", "plots", "plots")
    require("PIL", "plots", "sample grids")
    provenance = _jsonable(extra, "extra")
    (out / "results.json").unlink(missing_ok=True)  # written again last, when all is complete

    images: list[tuple[str, str]] = []
    if recs:
        plot_error_vs_nfe(
            recs, out / "error_vs_nfe.png", title="Error against the reference solve vs NFE"
        )
        images.append(("Error against the reference solve vs NFE", "error_vs_nfe.png"))
        if any(r.frechet is not None and math.isfinite(r.frechet) for r in recs):
            plot_error_vs_nfe(recs, out / "frechet_vs_nfe.png", metric="frechet")
            images.append(("Fréchet distance vs NFE", "frechet_vs_nfe.png"))
    if schedules:
        plot_schedules(schedules, out / "schedules.png")
        images.append(("Schedules", "schedules.png"))
    figures = []
    if samples:
        caption = "Samples (one row per method, same noise in each column)"
        figures.append(("samples.png", caption, samples))
    figures += [(name, caption, rows) for name, (caption, rows) in (more_samples or {}).items()]
    for name, caption, rows in figures:
        kind = _sample_kind(rows)
        if kind == "images":
            save_comparison_grid(rows, out / name, scale=scale, value_range=value_range)
        elif kind == "points":
            caption = caption.replace(
                "one row per method, same noise in each column", "one colour per method"
            )
            plot_points(rows, out / name, title=caption)
        else:
            shapes = sorted({tuple(x.shape[1:]) for x in rows.values()})
            notes.append(
                f"{name} not drawn: samples shaped {', '.join(str(s) for s in shapes)} are neither "
                "1- or 3-channel images nor 2-D points"
            )
            continue
        images.append((caption, name))

    parts = [f"# {title}\n", "## Results\n", markdown_table(recs) if recs else "No records.\n"]
    parts.append(
        "MSE: mean squared error per dimension against the reference solve from the same noise "
        "(± one standard error over samples); PSNR from the mean MSE; Fréchet: distance to "
        "held-out data in the feature space named in results.json.\n"
    )
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    for caption, name in images:
        parts.append(f"## {caption}\n\n![{caption}]({name})\n")
    if schedules:
        table = ["| name | solver | K | times | scales |", "|---|---|---:|---|---|"]
        for name, s in schedules.items():
            scales = getattr(s, "scales", None)
            shown = "—" if scales is None else ", ".join(f"{v:.3f}" for v in scales)
            times = ", ".join(f"{t:.4f}" for t in s.times)
            solver = getattr(s, "solver", "euler")
            table.append(f"| {name} | {solver} | {s.steps} | {times} | {shown} |")
        parts.append("## Schedule times\n\n" + "\n".join(table) + "\n")
    parts.append("## Provenance\n")
    short = [
        f"- {key}: {_fmt(value, '.4g') if isinstance(value, float) else value}"
        for key, value in provenance.items()
        if isinstance(value, (str, int, float)) and not isinstance(value, bool)
    ]
    parts.append(
        "\n".join(short)
        + ("\n\n" if short else "")
        + "The full provenance (settings, versions, timings, training histories) is in "
        "[results.json](results.json).\n"
    )
    report = atomic_write_text(out / "report.md", "\n".join(parts))
    write_results(recs, out / "results.json", extra)
    return report
