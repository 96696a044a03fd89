"""Saving and loading the small models bossflow ships (and any model saved the same way).

A saved model is two files side by side:

- ``<name>.safetensors``: the state dict (float32 tensors).
- ``<name>.json``: ``{"format": "bossflow-pretrained", "format_version": 1, "class": ...,
  "config": {...constructor kwargs...}, "sha256": <hash of the .safetensors file>,
  "provenance": {...how it was made...}}``.

Loading is strict: the architecture is rebuilt from ``class`` and ``config``, and every key of its
state dict must be present in the file with the same shape, and nothing else may be. A file whose
hash does not match the JSON, or that cannot be parsed, raises :class:`CheckpointError`.

Built-in names resolve to the package's ``assets/`` folder:

- ``"digits"``: :class:`~bossflow.models.unet.DigitUNet`, a rectified-flow velocity field trained on
  scikit-learn digits (time convention: noise at ``t = 0``, data at ``t = 1``).
- ``"digits-classifier"``: :class:`~bossflow.models.unet.DigitClassifier` for those digits, whose
  features define the Fréchet distance of the demo.
- ``"digits-cond"``: the class-conditional :class:`~bossflow.models.unet.DigitUNet` on the same
  digits (``num_classes = 10``, null label 10, trained with label dropout for classifier-free
  guidance), called ``v(x, t, class_labels=y)``. Its JSON records the default guidance scale
  (``provenance["guidance"]["scale"]``, see :func:`guidance_defaults`); :func:`class_labels_cond`
  and :func:`null_class_cond` make its conditioning.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import safetensors.torch
import torch
from torch import Tensor, nn

from .checkpoint import state_dict_problems
from .errors import CheckpointError, ConfigError
from .io import atomic_write_bytes, ensure_dir
from .models.unet import DigitClassifier, DigitUNet

__all__ = [
    "BUILTIN_MODELS",
    "MODEL_CLASSES",
    "FORMAT",
    "save_pretrained",
    "load_pretrained",
    "read_metadata",
    "load_state_dict_strict",
    "load_digits_field",
    "load_digits_classifier",
    "load_digits_cond_field",
    "class_labels_cond",
    "null_class_cond",
    "guidance_defaults",
]

M = TypeVar("M", bound=nn.Module)

FORMAT = "bossflow-pretrained"
_FORMAT_VERSION = 1

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "DigitUNet": DigitUNet,
    "DigitClassifier": DigitClassifier,
}
"""Classes a saved model may name in its JSON; each takes its ``config`` as keyword arguments."""

BUILTIN_MODELS: dict[str, str] = {
    "digits": "rectified-flow UNet velocity field on scikit-learn digits (8x8)",
    "digits-classifier": "digit classifier on scikit-learn digits; features for Fréchet distance",
    "digits-cond": "class-conditional rectified-flow UNet on scikit-learn digits (8x8, labels 0-9)",
}
"""Names that :func:`load_pretrained` resolves to files in the package's ``assets/`` folder."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_pretrained(
    module: nn.Module, directory: str | os.PathLike[str], name: str, provenance: dict[str, Any]
) -> Path:
    """Save ``module`` as ``<directory>/<name>.safetensors`` and ``<directory>/<name>.json``.

    Each file is written atomically (temporary file in the same folder, then ``os.replace``), the
    tensors first. A save interrupted between the two files leaves a JSON whose recorded hash does
    not match the weights, which loading reports.

    Args:
        module: an instance of a class in :data:`MODEL_CLASSES`, with a ``config`` dict holding its
            constructor arguments.
        directory: output folder (created if needed).
        name: file stem, e.g. ``"digits"``.
        provenance: JSON-serialisable description of how the weights were made (call, seed, data,
            metrics ...), stored verbatim.

    Returns:
        Path of the ``.safetensors`` file.

    Raises:
        ConfigError: the module's class is not registered or it has no ``config``.
    """
    cls_name = type(module).__name__
    if MODEL_CLASSES.get(cls_name) is not type(module):
        raise ConfigError(
            f"cannot save a {cls_name}: only {', '.join(MODEL_CLASSES)} can be rebuilt on loading"
        )
    config = getattr(module, "config", None)
    if not isinstance(config, dict):
        raise ConfigError(f"{cls_name} has no 'config' dict of constructor arguments to save")
    directory = ensure_dir(directory)

    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()
    }
    blob = safetensors.torch.save(state, metadata={"format": FORMAT, "class": cls_name})
    meta = {
        "format": FORMAT,
        "format_version": _FORMAT_VERSION,
        "class": cls_name,
        "config": config,
        "sha256": _sha256(blob),
        "num_parameters": sum(p.numel() for p in module.parameters()),
        "provenance": provenance,
    }
    text = json.dumps(meta, indent=2, sort_keys=False) + "\n"
    weights = directory / f"{name}.safetensors"
    atomic_write_bytes(weights, blob)
    atomic_write_bytes(directory / f"{name}.json", text.encode("utf-8"))
    return weights


def _resolve(name_or_path: str | os.PathLike[str]) -> tuple[Any, Any, str]:
    """Find the JSON and safetensors files of a built-in name or a path.

    Args:
        name_or_path: a key of :data:`BUILTIN_MODELS`, or a path to ``<stem>.json``,
            ``<stem>.safetensors`` or ``<stem>``.

    Returns:
        ``(json_file, weights_file, label)``: readable files (``Path`` or package resources) and a
        label for messages.
    """
    key = os.fspath(name_or_path)
    if key in BUILTIN_MODELS:
        assets = resources.files("bossflow") / "assets"
        return assets / f"{key}.json", assets / f"{key}.safetensors", f"built-in model {key!r}"
    path = Path(key)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    json_file, weights = (
        stem.with_name(stem.name + ".json"),
        stem.with_name(stem.name + ".safetensors"),
    )
    if not json_file.is_file() or not weights.is_file():
        raise ConfigError(
            f"{key!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a saved model: "
            f"expected both {json_file} and {weights} to exist (write them with save_pretrained)"
        )
    return json_file, weights, str(stem)


def _read_json(json_file: Any, label: str) -> dict[str, Any]:
    try:
        meta = json.loads(json_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{label}: {json_file} is missing; the package was installed without its assets "
            "(reinstall bossflow, or rebuild them with `bossflow train-base`)"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{label}: {json_file} is corrupt (not valid JSON: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{label}: {json_file} is not a {FORMAT} file")
    if meta.get("format_version") != _FORMAT_VERSION:
        raise CheckpointError(
            f"{label}: format_version {meta.get('format_version')!r} is not supported "
            f"(this bossflow reads version {_FORMAT_VERSION})"
        )
    return meta


def read_metadata(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON of a saved model: class, config, sha256, parameter count and provenance.

    Args:
        name_or_path: a built-in name or a path, as for :func:`load_pretrained`.

    Returns:
        The parsed JSON dict.
    """
    json_file, _, label = _resolve(name_or_path)
    return _read_json(json_file, label)


def load_state_dict_strict(module: nn.Module, state: dict[str, Tensor], label: str = "") -> None:
    """Copy ``state`` into ``module``, requiring exactly the module's keys with their shapes.

    Args:
        module: the model to fill.
        state: tensors by state-dict key.
        label: what is being loaded, for messages.

    Raises:
        CheckpointError: naming every missing, unexpected and wrongly shaped key.
    """
    problems = state_dict_problems(module.state_dict(), state)
    if problems:
        where = f"{label}: " if label else ""
        raise CheckpointError(
            f"{where}the weights do not match {type(module).__name__}({_config_repr(module)}); "
            + "; ".join(problems)
        )
    module.load_state_dict(state, strict=True)


def _config_repr(module: nn.Module) -> str:
    """``key=value, ...`` of a module's ``config`` (empty if it has none), for messages."""
    config = getattr(module, "config", None) or {}
    return ", ".join(f"{k}={v!r}" for k, v in config.items())


def load_pretrained(
    name_or_path: str | os.PathLike[str],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a saved model, strictly, in eval mode.

    Args:
        name_or_path: ``"digits"`` or ``"digits-classifier"`` (shipped in the package), or the path
            of a model written by :func:`save_pretrained` (``.json``, ``.safetensors`` or the stem).
        device: where to put the model (default: CPU).
        dtype: floating dtype of the parameters (default: float32, as saved).

    Returns:
        The rebuilt module (class from the JSON), weights loaded, in eval mode. A ``DigitUNet`` is a
        velocity field ``v(x, t)``, ``x: (B, C, H, W)``, ``t: (B,)`` in [0, 1], data at ``t = 1``.

    Raises:
        ConfigError: unknown name, or neither file found at the path.
        CheckpointError: corrupt files, a hash mismatch, an unknown class, or weights that do not
            fit the architecture (every missing, unexpected or wrongly shaped key is named).
    """
    json_file, weights, label = _resolve(name_or_path)
    meta = _read_json(json_file, label)
    cls = MODEL_CLASSES.get(meta.get("class", ""))
    if cls is None:
        raise CheckpointError(
            f"{label}: unknown model class {meta.get('class')!r}; known: {', '.join(MODEL_CLASSES)}"
        )
    config = meta.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{label}: the JSON has no 'config' dict")
    try:
        module = cls(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{label}: cannot build {cls.__name__}(**{config}): {err}") from None

    try:
        blob = weights.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{label}: {weights} is missing") from None
    recorded = meta.get("sha256")
    if recorded is None:
        raise CheckpointError(
            f"{label}: {json_file} records no sha256 of {weights.name}, so its integrity cannot be "
            "checked (save the model again with save_pretrained)"
        )
    if recorded != _sha256(blob):
        raise CheckpointError(
            f"{label}: {weights} is corrupt or was replaced: its SHA-256 does not match the one "
            f"recorded in {json_file} (save the model again with save_pretrained)"
        )
    try:
        state = safetensors.torch.load(blob)
    except Exception as err:  # safetensors raises its own error types (and others) on bad bytes
        raise CheckpointError(
            f"{label}: {weights} is corrupt (not a readable safetensors file: {err})"
        ) from None
    load_state_dict_strict(module, state, label)
    module.to(device=device if device is not None else "cpu")
    if dtype is not None:
        module.to(dtype=dtype)
    return module.eval()


def _load_builtin(
    name: str, cls: type[M], device: torch.device | str | None, dtype: torch.dtype | None
) -> M:
    model = load_pretrained(name, device=device, dtype=dtype)
    if not isinstance(model, cls):
        raise CheckpointError(
            f"built-in model {name!r} is a {type(model).__name__}, expected {cls.__name__}; "
            "the package assets were replaced (reinstall bossflow)"
        )
    return model


def load_digits_field(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> DigitUNet:
    """The shipped rectified-flow UNet on scikit-learn digits, in eval mode.

    A velocity field ``v(x, t)``: ``x`` of shape (B, 1, 8, 8) (data scaled to [-1, 1]), ``t`` of
    shape (B,) in [0, 1], noise at ``t = 0`` and data at ``t = 1``.

    Args:
        device: where to put it (default CPU).
        dtype: parameter dtype (default float32).

    Returns:
        The :class:`~bossflow.models.unet.DigitUNet`.
    """
    return _load_builtin("digits", DigitUNet, device, dtype)


def load_digits_classifier(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> DigitClassifier:
    """The shipped classifier for scikit-learn digits (inputs in [-1, 1]), in eval mode.

    Args:
        device: where to put it (default CPU).
        dtype: parameter dtype (default float32).

    Returns:
        The :class:`~bossflow.models.unet.DigitClassifier`.
    """
    return _load_builtin("digits-classifier", DigitClassifier, device, dtype)


def load_digits_cond_field(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> DigitUNet:
    """The shipped class-conditional rectified-flow UNet on scikit-learn digits, in eval mode.

    A conditional velocity field ``v(x, t, class_labels=y)``: ``x`` of shape (B, 1, 8, 8) in
    [-1, 1], ``t`` of shape (B,) in [0, 1] (noise at 0, data at 1), ``y`` (B,) int64 digits 0-9,
    or 10 (the null label) for the unconditional field. Guide it with
    ``bossflow.field.Guided(field, scale, uncond=null_class_cond(10))``; the default scale is in
    :func:`guidance_defaults`.

    Args:
        device: where to put it (default CPU).
        dtype: parameter dtype (default float32).

    Returns:
        The :class:`~bossflow.models.unet.DigitUNet` (``num_classes = 10``).
    """
    return _load_builtin("digits-cond", DigitUNet, device, dtype)


def class_labels_cond(
    samples: int | range | Sequence[int] | Tensor, num_classes: int
) -> dict[str, Tensor]:
    """Per-sample class labels, fixed by the sample's index: label ``m % num_classes`` for sample m.

    Every stage of a run then gives its noise ``m`` the same label however it is batched or
    resumed, and any ``num_classes`` consecutive samples cover every class once. Usable as a
    per-sample conditioning callable: ``functools.partial(class_labels_cond,
    num_classes=10)(range(a, b))`` is the conditioning of samples a..b-1.

    Args:
        samples: the sample indices: a count M (indices 0..M-1), a ``range``, a sequence or a 1-D
            integer tensor of indices >= 0.
        num_classes: number of classes (the null label ``num_classes`` is never produced).

    Returns:
        ``{"class_labels": labels}``, labels int64 of shape (M,) on the CPU.

    Raises:
        ConfigError: ``num_classes < 1`` or negative indices.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if isinstance(samples, int) and not isinstance(samples, bool):
        samples = range(samples)
    if isinstance(samples, range) and samples.step == 1:
        index = torch.arange(samples.start, max(samples.start, samples.stop), dtype=torch.int64)
    else:
        index = torch.as_tensor(list(samples) if not isinstance(samples, Tensor) else samples)
        index = index.to(device="cpu", dtype=torch.int64).reshape(-1)
    if index.numel() and int(index.min()) < 0:
        raise ConfigError(f"sample indices must be >= 0, got {int(index.min())}")
    return {"class_labels": index % num_classes}


def null_class_cond(num_classes: int) -> dict[str, Tensor]:
    """The unconditional input of a class-conditional model: ``{"class_labels": tensor([C])}``.

    One row, shared by every sample: what :class:`bossflow.field.Guided` takes as ``uncond``.

    Args:
        num_classes: number of classes ``C``; the null label is ``C``.

    Returns:
        ``{"class_labels": tensor([num_classes])}`` (int64, CPU; ``Guided`` moves it).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return {"class_labels": torch.tensor([num_classes], dtype=torch.int64)}


def guidance_defaults(name_or_path: str | os.PathLike[str] = "digits-cond") -> dict[str, Any]:
    """What a run needs to sample a saved class-conditional model with guidance.

    Args:
        name_or_path: a built-in name or a path, as for :func:`load_pretrained`.

    Returns:
        ``{"cond_key": "class_labels", "num_classes": C, "null_label": C, "guidance_scale": w}``;
        ``w`` is the scale recorded in the provenance (``provenance["guidance"]["scale"]``), 1.0
        (plain conditional sampling) if none was recorded.

    Raises:
        ConfigError: the model is not a class-conditional ``DigitUNet``.
    """
    meta = read_metadata(name_or_path)
    num_classes = (meta.get("config") or {}).get("num_classes", 0)
    if meta.get("class") != "DigitUNet" or not num_classes:
        raise ConfigError(
            f"{os.fspath(name_or_path)!r} is not a class-conditional DigitUNet (its config has no "
            "num_classes); train one with `bossflow train-base --conditional`"
        )
    guidance = (meta.get("provenance") or {}).get("guidance") or {}
    return {
        "cond_key": "class_labels",
        "num_classes": int(num_classes),
        "null_label": int(num_classes),
        "guidance_scale": float(guidance.get("scale", 1.0)),
    }
