"""Conditioning and guidance for a run: from files (``--cond``, ``--uncond``) or a model's defaults.

Every long job takes per-sample conditioning as ``cond(rows) -> dict`` (see
:func:`bossflow.noise.cond_reader`); this module builds that callable and the field to run:

- ``--cond FILE``: a ``.safetensors`` file of tensors by keyword (``class_labels``,
  ``encoder_hidden_states`` ...). A tensor of R rows gives noise ``m`` its row ``m mod R``: one
  row is shared by every sample, R = M rows are per sample, and e.g. 10 rows of labels cycle.
- ``--uncond FILE``: the unconditional inputs for classifier-free guidance, by the same keywords;
  one row is shared (a null label, an empty prompt's embedding), R > 1 rows cycle per sample.
- ``--guidance-scale W``: sample ``Guided(field, W, uncond)``, one model call of 2B rows per
  evaluation.

A built-in conditional model (``digits-cond``) brings its own defaults: label ``m mod 10`` for
noise ``m``, the null label for guidance and the scale recorded with its weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .field import Guided

__all__ = ["RunConditioning", "read_tensors", "cycled", "prepare_conditioning"]

Rows = range | Sequence[int]


def read_tensors(path: str | Path, what: str) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file, each with at least one dimension (its rows).

    Raises:
        ConfigError: a missing or unreadable file, no tensors, or a 0-dim tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist or is not a file")
    if path.suffix != ".safetensors":
        raise ConfigError(
            f"{what} {path} must be a .safetensors file of tensors by keyword "
            "(safetensors.torch.save_file({'class_labels': labels}, path))"
        )
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as err:  # any reader error: not a usable file
        raise ConfigError(f"cannot read {what} {path}: {type(err).__name__}: {err}") from None
    if not tensors:
        raise ConfigError(f"{what} {path} holds no tensors")
    flat = [k for k, v in tensors.items() if v.ndim == 0 or v.shape[0] == 0]
    if flat:
        raise ConfigError(
            f"{what} {path}: {flat[0]!r} has no rows (shape {tuple(tensors[flat[0]].shape)}); "
            "give it a first dimension of rows (1 row is shared by every sample)"
        )
    return tensors


def cycled(tensors: dict[str, Tensor], device: Any = None) -> Callable[[Rows], dict[str, Tensor]]:
    """``cond(rows)``: noise ``m`` gets row ``m mod R`` of each tensor (R its number of rows)."""

    def cond(rows: Rows) -> dict[str, Tensor]:
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return {k: v[index % v.shape[0]].to(device) for k, v in tensors.items()}

    return cond


@dataclass
class RunConditioning:
    """What a run samples and with which conditioning.

    Attributes:
        field: the velocity field to run (the model's, or it under :class:`Guided`).
        cond: ``cond(rows) -> dict`` for noises ``rows``, or ``None`` (unconditional).
        guidance_scale: the guidance scale, or ``None`` without guidance.
        description: one line for logs and provenance.
    """

    field: nn.Module
    cond: Callable[[Rows], dict[str, Tensor]] | None
    guidance_scale: float | None
    description: str

    def rows(self, count: int, start: int = 0) -> dict[str, Tensor] | None:
        """The conditioning of noises ``start .. start + count - 1`` (``None``: unconditional)."""
        return None if self.cond is None else self.cond(range(start, start + count))


def prepare_conditioning(
    field: nn.Module,
    info: dict[str, Any] | None = None,
    cond_file: str | Path | None = None,
    uncond_file: str | Path | None = None,
    guidance_scale: float | None = None,
    device: Any = None,
) -> RunConditioning:
    """The field and conditioning of a run (see the module docstring for the files).

    Args:
        field: the model's velocity field.
        info: the model's facts (:attr:`bossflow.spec.LoadedModel.info`); a class-conditional
            built-in has ``cond_key``, ``num_classes``, ``null_label``, ``guidance_scale``.
        cond_file, uncond_file: ``.safetensors`` files (override the built-in defaults).
        guidance_scale: the scale (default: the built-in's; none for other models).
        device: where the conditioning tensors go (the model's device).

    Raises:
        ConfigError: guidance without unconditional inputs or conditioning, an unconditional
            file without a scale, keywords that do not match, unreadable files.
    """
    info = info or {}
    builtin = "num_classes" in info and "cond_key" in info
    parts, tensors, uncond = [], None, None
    if cond_file is not None:
        tensors = read_tensors(cond_file, "--cond")
        parts.append(f"cond {Path(cond_file).name} ({', '.join(sorted(tensors))})")
    if uncond_file is not None:
        uncond = read_tensors(uncond_file, "--uncond")
    if tensors is not None and builtin and set(tensors) != {info["cond_key"]}:
        n = int(info["num_classes"])
        raise ConfigError(
            f"--cond holds {', '.join(map(repr, sorted(tensors)))}; this model is conditioned on "
            f"{info['cond_key']!r} alone ((B,) integer labels 0..{n - 1}, {n} = no class)"
        )
    if tensors is None and builtin:
        from .pretrained import class_labels_cond

        labels = functools.partial(class_labels_cond, num_classes=int(info["num_classes"]))
        parts.append(f"{info['cond_key']} = m mod {info['num_classes']}")
    if uncond is None and builtin:
        from .pretrained import null_class_cond

        uncond = null_class_cond(int(info["num_classes"]))
    if guidance_scale is None and builtin:
        guidance_scale = float(info.get("guidance_scale", 1.0))
    if uncond_file is not None and guidance_scale is None:
        raise ConfigError("--uncond is only used for guidance: give --guidance-scale W as well")
    if guidance_scale is not None and tensors is None and not builtin:
        raise ConfigError(
            "--guidance-scale needs conditioning: give --cond FILE (and --uncond FILE)"
        )

    per_sample_uncond = {}
    shared_uncond = {}
    if guidance_scale is not None:
        if uncond is None:
            raise ConfigError(
                "--guidance-scale needs the unconditional inputs: give --uncond FILE (tensors by "
                "the same keywords as --cond: a null label, an empty prompt's embedding)"
            )
        keys = set(tensors) if tensors is not None else {info["cond_key"]}
        missing = sorted(keys - set(uncond))
        if missing:
            raise ConfigError(
                f"--uncond has no {', '.join(map(repr, missing))}: it needs an unconditional "
                f"value for every --cond keyword ({', '.join(sorted(keys))})"
            )
        for k, v in uncond.items():
            (shared_uncond if v.shape[0] == 1 else per_sample_uncond)[k] = v

    if tensors is not None or per_sample_uncond:
        table = dict(tensors or {})
        table |= {Guided.PREFIX + k: v for k, v in per_sample_uncond.items()}
        from_files = cycled(table, device)
        if tensors is None:  # built-in labels plus per-sample unconditional rows

            def cond(rows: Rows) -> dict[str, Tensor]:
                out = {k: v.to(device) for k, v in labels(rows).items()}
                return out | from_files(rows)
        else:
            cond = from_files
    elif builtin:

        def cond(rows: Rows) -> dict[str, Tensor]:
            return {k: v.to(device) for k, v in labels(rows).items()}
    else:
        cond = None

    if guidance_scale is not None:
        field = Guided(field, guidance_scale, shared_uncond)
        parts.append(f"guidance scale {guidance_scale:g}")
    return RunConditioning(field, cond, guidance_scale, ", ".join(parts) or "unconditional")
