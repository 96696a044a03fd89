"""Model specs: turn ``--model SPEC --checkpoint PATH --convention NAME`` into a velocity field.

A spec is one of

- a built-in name: ``digits`` (the shipped small UNet on scikit-learn digits), ``digits-cond``
  (its class-conditional sibling, for classifier-free guidance), ``spiral`` (an analytic curved
  field, for trying things without a network);
- ``rectified-flow:CONFIG`` with ``--checkpoint``: an official Rectified Flow checkpoint, where
  CONFIG is ``cifar10``, ``celeba_hq``, ``church``, ``bedroom``, ``afhq_cat`` or a JSON config file;
- ``package.module:callable``: a callable returning an ``nn.Module`` (optionally given
  ``--checkpoint`` weights, loaded strictly), called in the convention named by ``--convention``.
"""

from __future__ import annotations

import importlib
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_torch_weights
from .errors import CheckpointError, ConfigError
from .field import (
    DiffusersField,
    FlowMatchingField,
    RectifiedFlowField,
    SpiralField,
    TorchCFMField,
)
from .pretrained import load_state_dict_strict

__all__ = [
    "LoadedModel",
    "load_model",
    "load_finetuned",
    "CONVENTIONS",
    "load_state_dict_file",
    "BUILTIN_MODELS",
]

CONVENTIONS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "bossflow": lambda m: m,
    "rectified-flow": RectifiedFlowField,
    "diffusers": DiffusersField,
    "flow-matching": FlowMatchingField,
    "torchcfm": TorchCFMField,
}


@dataclass
class LoadedModel:
    """A velocity field with what the tools need to know about it.

    Attributes:
        field: the velocity field in bossflow's convention (an ``nn.Module``).
        sample_shape: shape of one sample, e.g. ``(1, 8, 8)``.
        model_id: a short description for provenance (spec, checkpoint).
        centered: data lives in [-1, 1] if True, else in [0, 1] (for images and metrics).
        dataset: name of a built-in data set matching the model, if any (``"digits"``).
        info: extra facts (config, provenance of shipped weights).
    """

    field: nn.Module
    sample_shape: tuple[int, ...]
    model_id: str
    centered: bool = True
    dataset: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def value_range(self) -> tuple[float, float]:
        """The data's (low, high): (-1, 1) when centered, else (0, 1)."""
        return (-1.0, 1.0) if self.centered else (0.0, 1.0)

    def to(self, device: torch.device | str) -> LoadedModel:
        self.field.to(device)
        return self


def load_state_dict_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only``, never pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(map_location))
        state = load_torch_weights(path, map_location)
    except CheckpointError:  # pickled code, refused: the message names the global
        raise
    except Exception as err:  # any reader error means the file is not a usable checkpoint
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {str(err)[:300]}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def load_finetuned(model: LoadedModel, path: str | Path) -> LoadedModel:
    """Load a straightened ``model.safetensors`` strictly into ``model.field`` (in place).

    The file holds the raw network's weights (``save_straightened`` drops the field adapter's
    ``network.`` prefix); a file with the prefix (bossflow before LoRA export) loads too.
    """
    from .straighten.adapters import raw_network

    state = load_state_dict_file(path, map_location="cpu")
    network, prefix = raw_network(model.field)
    if prefix and set(state) == set(model.field.state_dict()):
        network = model.field  # an older file, keyed like the field
    load_state_dict_strict(network, state, str(path))
    model.model_id += f"+{Path(path).name}"
    return model


def _parse_shape(shape: str | Sequence[int] | None) -> tuple[int, ...] | None:
    if shape is None:
        return None
    try:
        if isinstance(shape, str):
            text = shape.strip().removesuffix(",")  # "3,32,32," is still 3 sizes
            dims = tuple(int(s) for s in text.replace("x", ",").split(","))  # "3,,32": an error
        else:  # a tuple, list or torch.Size from Python
            dims = tuple(operator.index(d) for d in shape)
    except (TypeError, ValueError):
        raise ConfigError(
            f"--shape must be comma-separated integers like 3,32,32, got {shape!r}"
        ) from None
    if not dims or min(dims) < 1:
        raise ConfigError(f"--shape must be positive integers like 3,32,32, got {shape!r}")
    return dims


def _trained_on(source: str) -> tuple[tuple[int, ...], str]:
    """The sample shape and data set a ``train-base`` model records (e.g. 1x28x28 MNIST), else
    the shipped models' 1x8x8 digits."""
    from .pretrained import read_metadata

    provenance = read_metadata(source).get("provenance") or {}
    shape = (provenance.get("settings") or {}).get("image_shape") or (1, 8, 8)
    dataset = (provenance.get("data") or {}).get("dataset") or "digits"
    return tuple(int(d) for d in shape), str(dataset)


def _load_digits(checkpoint: str | None, **_: Any) -> LoadedModel:
    from .models.unet import DigitUNet
    from .pretrained import load_pretrained

    model = load_pretrained(checkpoint or "digits")
    if not isinstance(model, DigitUNet):
        raise ConfigError(
            f"--checkpoint {checkpoint} holds a {type(model).__name__}, not a digits velocity "
            "field (a DigitUNet, as bossflow train-base writes)"
        )
    if getattr(model, "num_classes", 0):
        raise ConfigError(
            f"--checkpoint {checkpoint} is a class-conditional digits model; load it with "
            "--model digits-cond"
        )
    model.eval()
    info = dict(getattr(model, "provenance", {}) or {})
    shape, dataset = _trained_on(checkpoint or "digits")
    return LoadedModel(
        model,
        shape,
        "digits" if checkpoint is None else f"digits:{checkpoint}",
        centered=True,
        dataset=dataset,
        info=info,
    )


def _load_digits_cond(checkpoint: str | None, **_: Any) -> LoadedModel:
    """The class-conditional digits UNet; ``info`` says how to condition and guide it.

    ``field(x, t, class_labels=y)`` needs labels (a :class:`~bossflow.errors.ConfigError` says so
    otherwise). ``info`` holds ``cond_key`` (``"class_labels"``), ``num_classes`` (10),
    ``null_label`` (10) and ``guidance_scale`` (the default recorded with the weights). With
    :func:`bossflow.pretrained.class_labels_cond` (label ``m % num_classes`` for sample m) and
    :func:`bossflow.pretrained.null_class_cond` a run builds
    ``Guided(field, info["guidance_scale"], uncond=null_class_cond(info["num_classes"]))`` and
    ``cond=functools.partial(class_labels_cond, num_classes=info["num_classes"])``.
    """
    from .pretrained import guidance_defaults, load_pretrained

    source = checkpoint or "digits-cond"
    info = guidance_defaults(source)  # refuses a model that is not class-conditional
    model = load_pretrained(source)
    shape, dataset = _trained_on(source)
    return LoadedModel(
        model,
        shape,
        "digits-cond" if checkpoint is None else f"digits-cond:{checkpoint}",
        centered=True,
        dataset=dataset,
        info=info,
    )


def _load_spiral(checkpoint: str | None, **_: Any) -> LoadedModel:
    if checkpoint is not None:
        raise ConfigError("the built-in 'spiral' field has no weights; drop --checkpoint")
    return LoadedModel(SpiralField(), (2, 4, 4), "spiral")


BUILTIN_MODELS: dict[str, Callable[..., LoadedModel]] = {
    "digits": _load_digits,
    "digits-cond": _load_digits_cond,
    "spiral": _load_spiral,
}

_SPEC_FORMS = (
    f"use a built-in name ({', '.join(sorted(BUILTIN_MODELS))}), rectified-flow:CONFIG with "
    "--checkpoint, or package.module:callable"
)


def load_model(
    spec: str,
    checkpoint: str | None = None,
    convention: str | None = None,
    shape: str | tuple[int, ...] | None = None,
    device: str | torch.device = "cpu",
    weights: str | None = None,
    sample_keyword: str | None = None,
    timestep_scale: float | None = None,
) -> LoadedModel:
    """Resolve a model spec (see module docstring) to a :class:`LoadedModel` on ``device``.

    The same specs as the command line's ``--model``: ``load_model("digits")`` is the shipped
    model, ``load_model("mypkg.nets:make", shape="2")`` a network of your own. The result's
    ``.field`` is the velocity field and ``.sample_shape`` the shape of one sample. ``weights``
    (``"ema"``, the default, or ``"model"``) picks a rectified-flow checkpoint's weight set.

    Raises:
        ConfigError: the spec is unknown or malformed, or an option does not fit it.
        CheckpointError: the checkpoint cannot be read or does not fit the network.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--model must name a model, got {spec!r}; {_SPEC_FORMS}")
    spec = spec.strip()
    callable_only = {
        "--convention": convention, "--sample-keyword": sample_keyword,
        "--timestep-scale": timestep_scale,
    }  # fmt: skip
    given = [name for name, value in callable_only.items() if value is not None]
    if given and (spec in BUILTIN_MODELS or spec.startswith("rectified-flow:")):
        raise ConfigError(
            f"{', '.join(given)} set how a package.module:callable model is called; {spec!r} "
            "brings its own convention: drop it"
        )
    if weights is not None and not spec.startswith("rectified-flow:"):
        raise ConfigError(
            f"--weights picks the EMA or raw weights of a rectified-flow checkpoint; {spec!r} has "
            "one set: drop it"
        )
    if spec in BUILTIN_MODELS:
        loaded = BUILTIN_MODELS[spec](checkpoint=checkpoint)
    elif spec.startswith("rectified-flow:"):
        loaded = _load_rectified_flow(spec.split(":", 1)[1], checkpoint, weights or "ema", device)
    elif ":" in spec:
        options = _convention_options(convention, sample_keyword, timestep_scale)
        loaded = _load_callable(spec, checkpoint, convention, _parse_shape(shape), options)
    else:
        raise ConfigError(f"unknown model {spec!r}; {_SPEC_FORMS}")
    if shape is not None:
        given = _parse_shape(shape)
        fixed = spec in ("digits", "digits-cond") or spec.startswith("rectified-flow:")
        if fixed and given != tuple(loaded.sample_shape):  # their data and metrics are that size
            mine = ",".join(map(str, loaded.sample_shape))
            raise ConfigError(
                f"--shape {','.join(map(str, given))} differs from the {mine} samples {spec!r} "
                "was trained on; drop --shape"
            )
        loaded.sample_shape = given
    loaded.field.eval()
    return loaded.to(device)


def _load_rectified_flow(config: str, checkpoint: str | None, weights: str, device) -> LoadedModel:
    if not config.strip():
        raise ConfigError(
            "rectified-flow:CONFIG needs a config after the colon: cifar10, celeba_hq, church, "
            "bedroom, afhq_cat or a JSON config file"
        )
    if checkpoint is None:
        raise ConfigError(
            "rectified-flow models need --checkpoint PATH (the released checkpoint_*.pth file)"
        )
    from .models import load_rectified_flow

    field = load_rectified_flow(checkpoint, config, weights=weights, map_location=device)
    return LoadedModel(
        field,
        tuple(field.sample_shape),
        f"rectified-flow:{config}:{Path(checkpoint).name}:{weights}",
        centered=bool(getattr(field, "centered", True)),
        info={"config": getattr(field, "config", None)},
    )


def _dotted(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _convention_options(
    convention: str | None, sample_keyword: str | None, timestep_scale: float | None
) -> dict[str, Any]:
    """Adapter arguments from ``--sample-keyword`` / ``--timestep-scale`` for a convention."""
    options: dict[str, Any] = {}
    if sample_keyword is not None:
        if convention != "diffusers":
            raise ConfigError(
                "--sample-keyword is for --convention diffusers (transformers take the latents "
                "as hidden_states=...)"
            )
        options["sample_keyword"] = sample_keyword
    if timestep_scale is not None:
        if not timestep_scale > 0:
            raise ConfigError(f"--timestep-scale must be positive, got {timestep_scale}")
        if convention == "diffusers":
            options["num_train_timesteps"] = timestep_scale
        elif convention == "rectified-flow":
            options["time_scale"] = timestep_scale
        else:
            raise ConfigError(
                "--timestep-scale is for --convention diffusers (timestep = scale * sigma; FLUX "
                "models: 1) or rectified-flow (time input = scale * t')"
            )
    return options


def _load_callable(spec: str, checkpoint, convention, shape, options=None) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    if not (_dotted(module_name) and _dotted(attr)):
        raise ConfigError(
            f"--model {spec!r} is not package.module:callable (both parts are needed, e.g. "
            f"mypkg.nets:make_model); {_SPEC_FORMS}"
        )
    try:
        _importable_from_cwd()
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"cannot import {module_name!r} from --model {spec!r}: {err}") from None
    except Exception as err:  # the module itself failed while importing
        raise ConfigError(
            f"importing {module_name!r} for --model {spec!r} failed: {type(err).__name__}: {err}"
        ) from None
    factory = module
    for part in attr.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise ConfigError(
                f"module {module_name!r} has no attribute {attr!r} (--model {spec!r})"
            ) from None
    if callable(factory) and not isinstance(factory, nn.Module):
        try:
            network = factory()
        except Exception as err:
            raise ConfigError(
                f"calling {attr}() for --model {spec!r} failed: {type(err).__name__}: {err}; "
                "the callable must take no arguments and return an nn.Module"
            ) from None
    else:
        network = factory
    if not isinstance(network, nn.Module):
        raise ConfigError(f"--model {spec!r} must give an nn.Module, got {type(network).__name__}")
    if checkpoint is not None:
        load_state_dict_strict(network, load_state_dict_file(checkpoint), str(checkpoint))
    convention = convention or "bossflow"
    try:
        wrap = CONVENTIONS[convention]
    except KeyError:
        raise ConfigError(
            f"unknown convention {convention!r}; choose one of {sorted(CONVENTIONS)}"
        ) from None
    shape = shape or getattr(network, "sample_shape", None)
    if shape is None:
        raise ConfigError(
            f"the sample shape of {spec!r} is unknown: pass --shape C,H,W (or give the module a "
            "sample_shape attribute)"
        )
    field = wrap(network, **(options or {}))
    return LoadedModel(field, tuple(shape), spec + (f":{checkpoint}" if checkpoint else ""))


def _importable_from_cwd() -> None:
    """Let ``--model mymodule:make`` import from the current folder, as ``python -m`` does.

    An installed console script puts its own folder first on ``sys.path``, not the current one.
    """
    import os
    import sys

    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
