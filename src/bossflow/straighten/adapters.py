"""LoRA adapters and merged weights in the layouts other libraries load (peft, diffusers).

A LoRA straightening run trains rank-r adapters ``W x + (alpha / r) B A x`` on chosen layers of
the velocity network. What it returns (the EMA or selected weights) is kept twice: merged into a
plain module (:attr:`StraightenResult.module`) and as a :class:`LoraAdapter`
(:attr:`StraightenResult.lora`), the adapter alone, which :meth:`LoraAdapter.save` writes as

- ``adapter_config.json`` + ``adapter_model.safetensors``: peft's layout, loaded by
  ``peft.PeftModel.from_pretrained(network, folder)`` (keys ``base_model.model.<layer>.lora_A.weight``);
- ``pytorch_lora_weights.safetensors``, for diffusers models that load LoRA
  (``PeftAdapterMixin``: SD3 / FLUX transformers, ``UNet2DConditionModel``): keys
  ``<component>.<layer>.lora_A.weight`` with the peft config in the file's
  ``lora_adapter_metadata``, as a pipeline's ``save_lora_weights`` writes them, so
  ``model.load_lora_adapter(folder, use_safetensors=True)`` (``prefix="unet"`` for a UNet) and
  ``pipe.load_lora_weights(folder)`` read it.

Layer names are those of the *raw network*: bossflow's adapters (:mod:`bossflow.field`) keep the
user's network as ``.network``, and that prefix is dropped everywhere (:func:`raw_network`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import BossflowError, ConfigError, require
from ..io import atomic_write_bytes, atomic_write_text, ensure_dir

__all__ = [
    "DIFFUSERS_LORA_TARGETS",
    "LoraAdapter",
    "diffusers_component",
    "is_diffusers_model",
    "lora_adapter",
    "lora_target_names",
    "network_state",
    "raw_network",
    "save_diffusers_model",
]

#: Default LoRA targets of a diffusers network (matched as name suffixes, on ``nn.Linear`` and
#: ``nn.Conv2d`` layers): the attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``;
#: the joint-attention context projections ``add_*_proj`` and ``to_add_out`` of SD3 / FLUX), the
#: transformer blocks' ``proj_in`` / ``proj_out`` and the feed-forward linears (``ff.net.0.proj``,
#: ``ff.net.2`` and their ``ff_context`` twins). Embeddings, normalisation layers and the ResNet
#: convolutions of UNets stay frozen. A network that has none of them gets every Linear and Conv2d.
DIFFUSERS_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
_LORA_LAYERS = (nn.Linear, nn.Conv2d)


def raw_network(module: nn.Module) -> tuple[nn.Module, str]:
    """The user's network inside bossflow's field adapters, and the prefix of its keys.

    Follows the ``.network`` of bossflow's adapters (:class:`~bossflow.field.DiffusersField`,
    :class:`~bossflow.field.RectifiedFlowField`, ...) while the wrapper holds no weight of its own, so
    ``module.state_dict()`` is exactly ``{prefix + k: v for k, v in network.state_dict().items()}``.

    Returns:
        ``(network, prefix)``; ``(module, "")`` for a module that wraps nothing.
    """
    from ..field import DiffusersField, FlowMatchingField, RectifiedFlowField, TorchCFMField

    adapters = (DiffusersField, FlowMatchingField, RectifiedFlowField, TorchCFMField)
    prefix = ""
    while True:
        inner = getattr(module, "network", None)
        if not isinstance(module, adapters) or not isinstance(inner, nn.Module):
            return module, prefix  # a user's own `.network` is part of the user's model
        outer, own = module.state_dict().keys(), inner.state_dict().keys()
        if len(outer) != len(own) or not all(k.startswith("network.") for k in outer):
            return module, prefix
        module, prefix = inner, prefix + "network."


def _is_diffusers(network: nn.Module) -> bool:
    return type(network).__module__.startswith("diffusers.")


def diffusers_component(network: nn.Module) -> str | None:
    """The pipeline component a diffusers network's LoRA keys are prefixed with, or ``None``.

    ``"unet"`` for UNets and ``"transformer"`` for the rest, for networks that load LoRA adapters
    (diffusers' ``PeftAdapterMixin``: they have ``load_lora_adapter``); ``None`` for any other
    network (``UNet2DModel`` has no LoRA loader: load its adapter with peft).
    """
    if not _is_diffusers(network) or not hasattr(network, "load_lora_adapter"):
        return None
    return "unet" if "UNet" in type(network).__name__ else "transformer"


def lora_target_names(module: nn.Module, targets: Sequence[str] | None = None) -> list[str]:
    """Exact names (in ``module``) of the ``nn.Linear`` / ``nn.Conv2d`` layers that get LoRA.

    A layer matches a target ``s`` when its name in the raw network (:func:`raw_network`) is ``s``
    or ends with ``"." + s`` (peft's rule for names). Defaults: :data:`DIFFUSERS_LORA_TARGETS` for
    a diffusers network, every Linear and Conv2d otherwise (bossflow's DigitUNet and NCSN++,
    user networks).

    Args:
        module: the velocity field (or raw network).
        targets: layer names or name suffixes of the raw network, e.g. ``["to_q", "to_v"]``;
            ``None`` for the default.

    Returns:
        The matching layers' names in ``module`` (with the adapter prefix), in module order.

    Raises:
        ConfigError: a target that matches no Linear or Conv2d layer, or no such layer at all.
    """
    network, prefix = raw_network(module)
    layers = [n for n, m in network.named_modules() if n and isinstance(m, _LORA_LAYERS)]
    if not layers:
        raise ConfigError(
            f"{type(network).__name__} has no nn.Linear or nn.Conv2d layer to put LoRA adapters "
            "on; use lora_rank=0 (full fine-tuning)"
        )

    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    if targets is None:
        chosen = layers
        if _is_diffusers(network):
            default = [n for n in layers if any(matches(n, s) for s in DIFFUSERS_LORA_TARGETS)]
            chosen = default or layers
    else:
        missing = [s for s in targets if not any(matches(n, s) for n in layers)]
        if missing:
            shown = ", ".join(layers[:8]) + (", ..." if len(layers) > 8 else "")
            raise ConfigError(
                f"lora_targets {missing} match no nn.Linear or nn.Conv2d layer of "
                f"{type(network).__name__}; name layers or name suffixes such as: {shown}"
            )
        chosen = [n for n in layers if any(matches(n, s) for s in targets)]
    return [prefix + n for n in chosen]


@dataclass
class LoraAdapter:
    """LoRA adapters of a straightened network, keyed by the raw network's layer names.

    Attributes:
        rank: ``r``, the rank of every adapter.
        alpha: the scaling numerator (the update is ``alpha / r * B A``).
        target_modules: exact names of the adapted layers in the raw network.
        state: ``"<layer>.lora_A.weight"`` (r, in[, k, k]) and ``"<layer>.lora_B.weight"``
            (out, r[, 1, 1]) tensors: the weights the run returned (EMA or selected).
        network_class: ``module.QualName`` of the raw network the adapters belong to.
        component: diffusers pipeline component (``"unet"`` / ``"transformer"``) for networks that
            load LoRA through diffusers (:func:`diffusers_component`), else ``None``.
    """

    rank: int
    alpha: float
    target_modules: list[str]
    state: dict[str, Tensor]
    network_class: str
    component: str | None = None

    def peft_config(self) -> Any:
        """The ``peft.LoraConfig`` of these adapters (exact layer names as one regular expression:
        peft matches a list of names by suffix, which could catch other layers)."""
        peft = require("peft", "lora", "LoRA adapters")
        return peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=0.0,
            target_modules="|".join(re.escape(n) for n in self.target_modules),
        )

    def _config_dict(self) -> dict[str, Any]:
        config = self.peft_config().to_dict()
        # json cannot write sets; peft's own save_pretrained turns them into lists the same way
        return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the adapters to ``folder`` in peft's layout (and diffusers' for its networks).

        Files (each written atomically): ``adapter_config.json`` and ``adapter_model.safetensors``
        (``peft.PeftModel.from_pretrained(network, folder)``), and, when :attr:`component` is set,
        ``pytorch_lora_weights.safetensors`` (``network.load_lora_adapter(folder,
        prefix=component, use_safetensors=True)``, ``pipe.load_lora_weights(folder)``).

        Returns:
            The folder.
        """
        from safetensors.torch import save as st_save

        folder = ensure_dir(folder)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state.items()}
        config = self._config_dict()
        peft_state = {f"base_model.model.{k}": v for k, v in tensors.items()}
        atomic_write_bytes(folder / PEFT_WEIGHTS_NAME, st_save(peft_state, {"format": "pt"}))
        if self.component is not None:
            c = self.component
            metadata = {
                "format": "pt",
                "lora_adapter_metadata": json.dumps(
                    {f"{c}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True
                ),
            }
            keyed = {f"{c}.{k}": v for k, v in tensors.items()}
            atomic_write_bytes(folder / DIFFUSERS_WEIGHTS_NAME, st_save(keyed, metadata))
        # the config last: a folder with a config has its weights
        config["base_model_name_or_path"] = None
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        atomic_write_text(folder / PEFT_CONFIG_NAME, text)
        return folder


def lora_adapter(wrapped: nn.Module, rank: int, alpha: float | None) -> LoraAdapter:
    """The adapters of a peft ``LoraModel`` over a velocity field, as they are now.

    Call it on the weights to hand out (after the EMA or the selected weights are copied in) and
    before ``merge_and_unload()``. Tensors are cloned, so merging does not change them.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    field = wrapped.model  # the LoraModel's wrapped module: the velocity field
    network, prefix = raw_network(field)
    state: dict[str, Tensor] = {}
    targets = []
    for name, layer in field.named_modules():
        if not isinstance(layer, BaseTunerLayer) or "default" not in layer.lora_A:
            continue
        if not name.startswith(prefix):  # raw_network: the wrapper holds no layer of its own
            raise ConfigError(f"LoRA layer {name} lies outside the network {prefix[:-1]}")
        name = name[len(prefix) :]
        targets.append(name)
        state[f"{name}.lora_A.weight"] = layer.lora_A["default"].weight.detach().clone()
        state[f"{name}.lora_B.weight"] = layer.lora_B["default"].weight.detach().clone()
    cls = type(network)
    return LoraAdapter(
        rank=rank,
        alpha=float(rank if alpha is None else alpha),
        target_modules=targets,
        state=state,
        network_class=f"{cls.__module__}.{cls.__qualname__}",
        component=diffusers_component(network),
    )


def save_diffusers_model(network: nn.Module, folder: str | os.PathLike) -> Path:
    """Write a diffusers ``ModelMixin`` with its own ``save_pretrained`` (``config.json`` +
    ``diffusion_pytorch_model.safetensors``), so ``ModelClass.from_pretrained(folder)`` loads it.

    ``save_pretrained`` writes into a temporary folder beside ``folder``; each file is then renamed
    into ``folder``, so no file there is ever half written.
    """
    folder = ensure_dir(folder)
    try:
        scratch = tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent)
        try:
            network.save_pretrained(scratch, safe_serialization=True)
            for item in sorted(Path(scratch).iterdir(), key=lambda p: p.name == "config.json"):
                os.replace(item, folder / item.name)  # config.json last
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    except (OSError, RuntimeError) as err:
        raise BossflowError(
            f"could not write {folder}: {err} (is the disk full or the folder read-only?)"
        ) from None
    return folder


def is_diffusers_model(network: nn.Module) -> bool:
    """Whether ``network`` is a diffusers ``ModelMixin`` (it has ``save_pretrained``)."""
    return _is_diffusers(network) and callable(getattr(network, "save_pretrained", None))


def network_state(module: nn.Module) -> dict[str, Tensor]:
    """The raw network's state dict (no adapter prefix), cloned to the CPU for saving."""
    # clone: safetensors refuses tensors that share memory (tied weights)
    state = raw_network(module)[0].state_dict()
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
