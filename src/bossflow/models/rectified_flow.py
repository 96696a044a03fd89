"""Official Rectified Flow checkpoints (gnobitab/RectifiedFlow): configs and a strict, safe loader.

A checkpoint saved by the original training code is a ``torch.save`` dict with entries
``optimizer``, ``model``, ``ema`` and ``step``:

* ``model``: the state dict of ``DataParallel(NCSNpp)``, every key prefixed ``module.``; it holds
  the float64 ``sigmas`` buffer and, for Fourier-embedding models, the frozen ``all_modules.0.W``.
* ``ema``: ``{"decay", "num_updates", "shadow_params"}`` where ``shadow_params`` is an unnamed list
  with one tensor per *trainable* parameter, in ``parameters()`` order. Buffers and frozen
  parameters are not in it and come from ``model``, as in the original evaluation code.

:func:`load_rectified_flow` reads such a file without executing pickled code and checks every
key and shape, then returns the network wrapped in bossflow's time convention.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import listing, load_torch_weights, shape_of, state_dict_problems
from ..errors import CheckpointError, ConfigError
from ..field import RectifiedFlowField
from .ncsnpp import NCSNpp, NCSNppConfig

__all__ = ["RF_CONFIGS", "WEIGHT_SETS", "rectified_flow_config", "load_rectified_flow"]

WEIGHT_SETS = ("ema", "model")

# --------------------------------------------------------------------------------------------------
# Configs, in the original layout (sections "model" and "data")
# --------------------------------------------------------------------------------------------------

_CIFAR10_MODEL: dict[str, Any] = {
    "name": "ncsnpp",
    "nf": 128,
    "ch_mult": [1, 2, 2, 2],
    "num_res_blocks": 4,
    "attn_resolutions": [16],
    "resamp_with_conv": True,
    "resblock_type": "biggan",
    "fir": False,
    "fir_kernel": [1, 3, 3, 1],
    "progressive": "none",
    "progressive_input": "none",
    "progressive_combine": "sum",
    "attention_type": "ddpm",
    "embedding_type": "positional",
    "fourier_scale": 16,
    "scale_by_sigma": False,
    "dropout": 0.15,
    "conditional": True,
    "skip_rescale": True,
    "init_scale": 0.0,
    "normalization": "GroupNorm",
    "nonlinearity": "swish",
    "conv_size": 3,
    "sigma_min": 0.01,
    "sigma_max": 50,
    "num_scales": 1000,
    "beta_min": 0.1,
    "beta_max": 20.0,
    "ema_rate": 0.999999,
}

# The four 256x256 NCSN++ models share one architecture (configs/default_lsun_configs.py).
_NCSNPP_256_MODEL: dict[str, Any] = {
    **_CIFAR10_MODEL,
    "ch_mult": [1, 1, 2, 2, 2, 2, 2],
    "num_res_blocks": 2,
    "fir": True,
    "progressive": "output_skip",
    "progressive_input": "input_skip",
    "embedding_type": "fourier",
    "scale_by_sigma": True,
    "dropout": 0.0,
    "sigma_max": 378,
    "num_scales": 2000,
    "ema_rate": 0.999,
}


def _config_256(dataset: str, centered: bool, **extra: Any) -> dict[str, Any]:
    data = {"dataset": dataset, "image_size": 256, "num_channels": 3, "centered": centered}
    return {"model": dict(_NCSNPP_256_MODEL), "data": {**data, **extra}}


_CHURCH = _config_256("LSUN", False, category="church_outdoor")
_CHURCH["model"]["sigma_max"] = 380

RF_CONFIGS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "cifar10": {
            "model": dict(_CIFAR10_MODEL),
            "data": {"dataset": "CIFAR10", "image_size": 32, "num_channels": 3, "centered": True},
        },
        "celeba_hq": _config_256("CelebA-HQ-Pytorch", True),
        "church": _CHURCH,
        "bedroom": _config_256("LSUN", False, category="bedroom"),
        "afhq_cat": _config_256("AFHQ-CAT-Pytorch", True),
    }
)
"""The released models' configs in the original layout, by name (read-only; copy before editing).

``cifar10``: ``configs/rectified_flow/cifar10_rf_gaussian_ddpmpp.py`` (DDPM++, 32x32).
``celeba_hq``, ``church``, ``bedroom``, ``afhq_cat``: the 256x256 NCSN++ configs
(``celeba_hq_pytorch_rf_gaussian.py``, ``church_rf_gaussian.py``, ``bedroom_rf_gaussian.py``,
``afhq_cat_pytorch_rf_gaussian.py``). Church and Bedroom data are uncentered ([0, 1]).
"""

# Keys that change the network's layers or forward pass must be given.
_MODEL_REQUIRED = (
    "nf",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "resamp_with_conv",
    "resblock_type",
    "fir",
    "progressive",
    "progressive_input",
    "progressive_combine",
    "embedding_type",
    "scale_by_sigma",
    "dropout",
    "conditional",
    "skip_rescale",
    "nonlinearity",
    "sigma_min",
    "sigma_max",
    "num_scales",
)
# Optional keys: their default, or None for keys that do not matter here (kept for provenance).
_MODEL_OPTIONAL: dict[str, Any] = {
    "name": "ncsnpp",
    "fir_kernel": [1, 3, 3, 1],
    "fourier_scale": 16,
    "init_scale": 0.0,
    "normalization": "GroupNorm",
    "attention_type": "ddpm",
    "conv_size": 3,
    "beta_min": None,
    "beta_max": None,
    "ema_rate": None,
}
# Optional keys whose value the original NCSN++ code fixes (any other value is not this network).
_MODEL_FIXED = {
    "name": "ncsnpp",
    "normalization": "groupnorm",
    "attention_type": "ddpm",
    "conv_size": 3,
}
_DATA_REQUIRED = ("image_size", "num_channels", "centered")
_DATA_OPTIONAL = ("dataset", "category", "random_flip", "uniform_dequantization", "root_path")
# Sections of the original config that do not affect the network; accepted and ignored.
_IGNORED_SECTIONS = ("training", "sampling", "eval", "optim", "seed", "device")


def _check_keys(
    section: str, given: Mapping[str, Any], required: tuple[str, ...], optional: tuple[str, ...]
) -> None:
    missing = [k for k in required if k not in given]
    unknown = sorted(k for k in given if k not in required and k not in optional)
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing required keys {missing}")
        if unknown:
            problems.append(f"unknown keys {unknown}")
        raise ConfigError(
            f"config section '{section}': {'; '.join(problems)}. Required keys: "
            f"{list(required)}; optional keys: {list(optional)}."
        )


def _parse_config(raw: Mapping[str, Any], name: str) -> NCSNppConfig:
    """Original layout (``{"model": {...}, "data": {...}, ...}``) -> :class:`NCSNppConfig`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a dict with sections 'model' and 'data', got {raw!r}")
    sections = ("model", "data", *_IGNORED_SECTIONS)
    unknown = sorted(k for k in raw if k not in sections)
    missing = [k for k in ("model", "data") if not isinstance(raw.get(k), Mapping)]
    if unknown or missing:
        raise ConfigError(
            f"config '{name}' must be in the original layout: sections 'model' and 'data' (dicts), "
            f"optionally {list(_IGNORED_SECTIONS)}; missing or not a dict: {missing}; "
            f"unknown: {unknown}."
        )
    model, data = raw["model"], raw["data"]
    _check_keys("model", model, _MODEL_REQUIRED, tuple(_MODEL_OPTIONAL))
    _check_keys("data", data, _DATA_REQUIRED, _DATA_OPTIONAL)
    for key, fixed in _MODEL_FIXED.items():
        value = model.get(key, fixed)
        if (value.lower() if isinstance(value, str) else value) != fixed:
            raise ConfigError(
                f"model.{key}={value!r}: this loader builds the original NCSN++ network, which "
                f"has {key}={_MODEL_OPTIONAL[key]!r}."
            )
    values = {k: model[k] for k in _MODEL_REQUIRED}
    for key in ("fir_kernel", "fourier_scale", "init_scale"):
        values[key] = model.get(key, _MODEL_OPTIONAL[key])
    values.update({k: data[k] for k in _DATA_REQUIRED})
    return NCSNppConfig(name=name, **values)


def rectified_flow_config(
    spec: str | os.PathLike | Mapping[str, Any] | NCSNppConfig,
) -> NCSNppConfig:
    """The network config of a Rectified Flow model.

    Args:
        spec: a built-in name (``cifar10``, ``celeba_hq``, ``church``, ``bedroom``, ``afhq_cat``,
            see :data:`RF_CONFIGS`), a dict or a JSON file in the original layout (sections
            ``model`` and ``data``, as the original ``configs/*.py`` define them), or an
            :class:`NCSNppConfig` (returned as is).

    Returns:
        The validated :class:`NCSNppConfig`.

    Raises:
        ConfigError: unknown name, unreadable file, or missing / unknown / invalid keys; the
            message lists the valid names or keys.
    """
    if isinstance(spec, NCSNppConfig):
        return spec
    if isinstance(spec, Mapping):
        return _parse_config(spec, "custom")
    if isinstance(spec, str) and spec.lower() in RF_CONFIGS:
        return _parse_config(copy.deepcopy(RF_CONFIGS[spec.lower()]), spec.lower())
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"unknown Rectified Flow config {str(spec)!r}: not a built-in name "
            f"({', '.join(RF_CONFIGS)}) and not a file. Pass one of those names, a dict, or a JSON "
            "file with sections 'model' and 'data' as in the original configs."
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"could not read the config file {path} as JSON: {err}") from err
    return _parse_config(raw, path.stem)


# --------------------------------------------------------------------------------------------------
# Reading checkpoints safely
# --------------------------------------------------------------------------------------------------


def _numpy_safe_globals() -> list[Any]:
    """The numpy globals real checkpoints need (the optimizer's ``lr`` is a numpy.float64).

    2022-2023 checkpoints name the scalar reconstructor ``numpy.core.multiarray.scalar``; numpy 2
    moved it to ``numpy._core`` (files saved with numpy 2 use that name), so both names are
    allow-listed.
    """
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed: list[Any] = [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
    ]
    allowed.append(type(np.dtype(np.float64)))  # Float64DType (np.dtypes only from numpy 1.25)
    return allowed


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if not hasattr(torch.serialization, "safe_globals"):
        raise CheckpointError(
            f"reading {path} safely needs torch >= 2.6 (torch.serialization.safe_globals); this is "
            f"torch {torch.__version__}. Upgrade torch, or load the file yourself and pass the dict."
        )
    try:
        return load_torch_weights(
            path,
            allow=_numpy_safe_globals(),
            hint=" (or, if you trust the file, torch.load it yourself and pass the dict)",
        )
    except CheckpointError:  # pickled code, refused: the message names the global
        raise
    except pickle.UnpicklingError as err:  # e.g. "Unsupported operand 110": not a pickle at all
        detail = str(err).rpartition("WeightsUnpickler error:")[2]  # after torch's preamble
        lines = [x.strip() for x in detail.splitlines() if x.strip()]
        lines = [x for x in lines if not x.startswith(("Check the documentation", "Weights only"))]
        reason = lines[0][:200] if lines else ""
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint, or it is truncated or corrupt"
            + (f" ({reason})" if reason else "")
        ) from err
    except Exception as err:  # torch raises RuntimeError, KeyError, EOFError ... on bad files
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint, or it is truncated or corrupt "
            f"({type(err).__name__}: {err})"
        ) from err


def _check_state(
    state: Mapping[str, Any], expected: Mapping[str, Tensor], where: str, prefix: str
) -> None:
    """Raise CheckpointError naming every missing, unexpected or wrongly shaped key."""
    problems = state_dict_problems(expected, state, prefix)
    if problems:
        raise CheckpointError(
            f"{where} does not match the network: " + "; ".join(problems) + ". Check that the "
            "config matches the checkpoint (built-in configs: " + ", ".join(RF_CONFIGS) + ")."
        )


def _select_weights(
    ckpt: Mapping[str, Any], network: NCSNpp, weights: str, source: str
) -> dict[str, Any]:
    """The full state dict to load: ``model`` (or a bare state dict), with EMA weights overlaid."""
    expected = network.state_dict()
    if isinstance(ckpt.get("model"), Mapping):
        raw = ckpt["model"]
        where = f"{source}['model']"
    elif ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        raw = ckpt
        where = source
        if weights == "ema":
            raise CheckpointError(
                f"{source} is a bare state_dict with no 'ema' entry; pass weights='model' to load "
                "its weights as they are."
            )
    else:
        raise CheckpointError(
            f"{source} is not a Rectified Flow checkpoint: expected a dict with 'model' and 'ema' "
            f"entries (as saved by the original training code) or a bare state_dict; found keys "
            f"{listing([str(k) for k in ckpt])}."
        )

    prefix = "module." if raw and all(str(k).startswith("module.") for k in raw) else ""
    state = {str(k)[len(prefix) :]: v for k, v in raw.items()}
    _check_state(state, expected, where, prefix)
    if weights == "model":
        return state

    ema = ckpt.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
    if not isinstance(shadow, (list, tuple)):
        raise CheckpointError(
            f"{source} has no EMA weights ('ema'['shadow_params'] list); pass weights='model'."
        )
    trainable = [name for name, p in network.named_parameters() if p.requires_grad]
    if len(shadow) != len(trainable):
        raise CheckpointError(
            f"{source}['ema']['shadow_params'] has {len(shadow)} tensors but the network has "
            f"{len(trainable)} trainable parameters; the checkpoint does not match the config."
        )
    wrong = [
        f"shadow_params[{i}] -> {prefix}{name} {shape_of(t)} (network: {tuple(expected[name].shape)})"
        for i, (name, t) in enumerate(zip(trainable, shadow))
        if not isinstance(t, Tensor) or t.shape != expected[name].shape
    ]
    if wrong:
        raise CheckpointError(
            f"{source}['ema'] does not match the network: wrong shapes: {listing(wrong)}"
        )
    # Buffers (sigmas) and frozen parameters (Fourier W) are not in the shadow list: keep 'model'.
    state.update(zip(trainable, shadow))
    return state


def load_rectified_flow(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    config: str | os.PathLike | Mapping[str, Any] | NCSNppConfig,
    weights: str = "ema",
    map_location: str | torch.device = "cpu",
    eps: float = 1e-3,
) -> RectifiedFlowField:
    """Load an official Rectified Flow checkpoint as a velocity field in bossflow's convention.

    The file is read with ``torch.load(weights_only=True)``: only tensors, plain containers and
    the numpy scalars the original optimizer state contains are accepted, so no pickled code runs.
    Every key and shape is checked (strict load).

    Args:
        checkpoint: path of a checkpoint saved by the original code (``checkpoint_*.pth``), the
            dict ``torch.load`` returned for it, or a bare ``state_dict`` (with or without the
            ``module.`` prefix; needs ``weights="model"``).
        config: the model's config: a built-in name (``cifar10``, ``celeba_hq``, ``church``,
            ``bedroom``, ``afhq_cat``), a dict or JSON file in the original layout, or an
            :class:`NCSNppConfig`; see :func:`rectified_flow_config`.
        weights: ``"ema"`` (the exponential moving average, what the paper samples with) or
            ``"model"`` (the raw training weights).
        map_location: device to put the network on (the file is always read onto the CPU first,
            so checkpoints saved on ``cuda:0`` load anywhere).
        eps: the original sampler's first network time; bossflow time ``t`` in [0, 1] is fed
            as upstream time ``eps + (1 - eps) t``.

    Returns:
        A :class:`bossflow.field.RectifiedFlowField` in eval mode computing
        ``v(x, t) = network(x, 999 * (eps + (1 - eps) * t))`` (the original Euler sampler's
        velocity: K uniform Euler steps are its K-step sampler) for ``x`` of shape
        (B, C, H, W) and ``t`` of shape (B,), noise at ``t = 0`` and data at ``t = 1``. The raw
        :class:`NCSNpp` is ``.network``. The loader also sets:

        - ``sample_shape``: ``(C, H, W)`` of one sample; draw noise as
          ``torch.randn(n, *field.sample_shape)``.
        - ``centered``: True if samples live in [-1, 1] (map to images with ``(x + 1) / 2``),
          False if in [0, 1] (LSUN Church and Bedroom).
        - ``config``: the :class:`NCSNppConfig` (also has ``data_range`` and ``name``).
        - ``weights``: which weight set was loaded.

    Raises:
        CheckpointError: the file is missing, not a checkpoint, corrupt, contains pickled
            objects, or does not match the config (the message names the keys).
        ConfigError: the config or ``weights`` is invalid.
    """
    if weights not in WEIGHT_SETS:
        raise ConfigError(f"weights={weights!r} is not valid; choose one of {WEIGHT_SETS}")
    cfg = rectified_flow_config(config)
    device = torch.device(map_location)
    if isinstance(checkpoint, Mapping):
        ckpt, source = checkpoint, "the checkpoint dict"
    else:
        ckpt, source = _read_file(Path(checkpoint)), str(checkpoint)
        if not isinstance(ckpt, Mapping):
            raise CheckpointError(
                f"{source} holds a {type(ckpt).__name__}, not a checkpoint dict or state_dict"
            )

    # Build without allocating or initialising weights; every tensor is loaded below.
    with torch.device("meta"):
        network = NCSNpp(cfg)
    state = _select_weights(ckpt, network, weights, source)
    network = network.to_empty(device=device)
    network.load_state_dict(state, strict=True)
    network.eval()

    field = RectifiedFlowField(network, eps=eps)
    field.sample_shape = cfg.sample_shape
    field.centered = cfg.centered
    field.config = cfg
    field.weights = weights
    return field.eval()
