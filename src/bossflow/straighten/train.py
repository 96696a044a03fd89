"""Straightening (paper eq. 9) and the reflow baseline: one fine-tuning loop, read top to bottom.

BOSS straightening fine-tunes ``v_theta`` so that ONE Euler step on each interval of a schedule
``0 = s_0 < ... < s_K = 1`` lands where the pretrained model's fine trajectory lands. With reference
states ``x_{s_k}`` from a :class:`~bossflow.straighten.pairs.PairStore`:

    L_boss(theta) = E_{m, k} || v_theta(x^m_{s_k}, s_k) - (x^m_{s_{k+1}} - x^m_{s_k}) / (s_{k+1} - s_k) ||^2

with the noise ``m`` and the interval ``k`` drawn uniformly. Reflow (Liu et al. 2023), the baseline
under the same loop and budget, regresses the straight line between the noise ``z = x_0`` and the
model's final sample ``x_1``:

    L_reflow(theta) = E_{m, t ~ U[0, 1]} || v_theta(t x_1 + (1 - t) z, t) - (x_1 - z) ||^2.

Both losses are means over the batch and over every dimension of a sample (``F.mse_loss``),
computed in float32.

The loop: AdamW (weight decay 0 by default, i.e. Adam), learning rate warmed up linearly over
``warmup`` iterations then constant (or cosine down to 0 at ``iterations``), gradient clipping, an
exponential moving average (EMA) of the trainable weights, full fine-tuning or LoRA adapters (peft)
on every ``nn.Linear`` / ``nn.Conv2d``. Every random draw comes from one ``torch.Generator`` seeded
by ``config.seed`` whose state is checkpointed, so a resumed run ends with exactly the weights of an
uninterrupted one.

Straightening overfits small pair pools (see docs: held-out error bottoms out while training error
keeps falling), so a slice of the noises is held out and its one-step interval error
(:func:`eval_interval_error`, evaluated with the EMA weights) is recorded every ``eval_every``
iterations; ``select="best"`` returns the weights with the lowest held-out error.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as dist
from ..errors import CheckpointError, ConfigError, ModelOutputError, require
from ..field import (
    FlowMatchingField,
    Guided,
    Unguided,
    call_field,
    eval_mode,
    guidance_identity,
    time_batch,
    time_dtype,
)
from ..io import atomic_write_bytes, atomic_write_text, ensure_dir
from ..noise import CondLike, cond_fingerprint, cond_reader, same_cond
from ..schedule import Schedule
from ..training import (
    EMA,
    LR_SCHEDULES,
    interpolate,
    learning_rate,
    load_state,
    random_rows,
    save_state,
)
from . import sharding
from .adapters import (
    LoraAdapter,
    is_diffusers_model,
    lora_adapter,
    lora_target_names,
    network_state,
    raw_network,
    save_diffusers_model,
)
from .dropout import RowKeyedDropout
from .pairs import PairStore, module_fingerprint

__all__ = [
    "StraightenConfig",
    "StraightenResult",
    "straighten",
    "eval_interval_error",
    "save_straightened",
    "OBJECTIVES",
    "LR_SCHEDULES",
]

CHECKPOINT_FORMAT = "bossflow.straighten/1"
SELECT = ("last", "best")
#: What straightening a guided field (:class:`~bossflow.field.Guided`) trains: ``keep`` fine-tunes
#: the network under guidance (the student is guided too, 2B rows per evaluation); ``distill``
#: trains the bare network to give the guided velocity in one pass (B rows, no guidance after).
GUIDANCE = ("keep", "distill")
#: How several processes share a full fine-tuning: ``ddp`` replicates the model, ``fsdp`` shards
#: weights, gradients, optimizer state and EMA over them (FSDP2, :mod:`.sharding`).
SHARDING = ("ddp", "fsdp")
# Config fields that change the training trajectory; a checkpoint made with other values cannot
# be resumed. (iterations also matters under a cosine schedule, which decays to 0 at the end.)
_TRAJECTORY_FIELDS = (
    "batch_size",
    "lr",
    "warmup",
    "lr_schedule",
    "grad_clip",
    "ema_decay",
    "weight_decay",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "seed",
    "objective",
    "holdout",
    "amp",
)


@dataclass
class StraightenConfig:
    """Settings of :func:`straighten`.

    Attributes:
        iterations: optimisation steps in total (a resumed run continues up to this number).
        batch_size: pairs per step.
        lr: peak learning rate.
        warmup: iterations of linear warmup from ``lr / warmup`` to ``lr``.
        lr_schedule: ``"constant"`` after warmup, or ``"cosine"`` decay to 0 at ``iterations``.
        grad_clip: max global gradient norm; 0 disables clipping.
        ema_decay: EMA decay of the trainable weights (0 disables the EMA). Early on the decay is
            ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs average too.
        weight_decay: AdamW's decoupled weight decay (0: plain Adam).
        lora_rank: 0 fine-tunes every weight; r > 0 trains rank-r LoRA adapters (peft) on the
            ``lora_targets`` layers, returned both merged into a plain module and as adapters
            (:attr:`StraightenResult.lora`). The usual LoRA setting is 4.
        lora_alpha: LoRA scaling numerator (the update is ``alpha / r * B A``); ``None`` = rank.
        lora_targets: names or name suffixes of the network's ``nn.Linear`` / ``nn.Conv2d``
            layers that get adapters (e.g. ``("to_q", "to_k", "to_v", "to_out.0")``), without
            the field adapter's ``network.`` prefix. ``None``: the attention, projection and
            feed-forward linears of a diffusers network
            (:data:`~bossflow.straighten.adapters.DIFFUSERS_LORA_TARGETS`), every Linear and
            Conv2d of any other.
        seed: seeds the generator behind every random draw (pairs, intervals, times).
        eval_every: record the training loss and held-out error every this many iterations (and
            at the start and the end); 0 records only at the start and the end.
        checkpoint_every: write ``out_dir/checkpoint.pt`` every this many iterations (and at the
            end); 0 only at the end.
        objective: ``"boss"`` (paper eq. 9) or ``"reflow"``.
        holdout: noises held out for validation, the last ones of the store: a fraction in
            (0, 1) or a count (0: none).
        select: ``"last"`` returns the final (EMA) weights; ``"best"`` the recorded ones with the
            lowest held-out error (needs a holdout).
        amp: run the forward pass under bfloat16 autocast (the loss stays float32).
        eval_batch_size: noises per batch when measuring the held-out error.
        guidance: for a guided teacher (:class:`~bossflow.field.Guided`), ``"keep"`` (the
            straightened network is sampled with the same guidance) or ``"distill"`` (it learns
            the guided velocity directly and is sampled without guidance, half the rows).
        sharding: on several processes, ``"ddp"`` (every process holds the whole model) or
            ``"fsdp"`` (full fine-tuning only: weights, gradients, Adam moments and the EMA split
            over the processes, for models whose training state does not fit one device). The
            same optimisation either way; one process ignores it; checkpoints resume across both.
    """

    iterations: int = 1000
    batch_size: int = 16
    lr: float = 2e-4
    warmup: int = 100
    lr_schedule: str = "constant"
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    weight_decay: float = 0.0
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 500
    objective: str = "boss"
    holdout: float | int = 0.1
    select: str = "last"
    amp: bool = False
    eval_batch_size: int = 256
    guidance: str = "keep"
    sharding: str = "ddp"

    def check(self) -> None:
        """Raise :class:`ConfigError` on an impossible setting, naming the valid choices."""
        for name in ("iterations", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup", "eval_every", "checkpoint_every", "lora_rank"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        if self.lora_targets is not None:
            targets = self.lora_targets
            if isinstance(targets, str) or not all(isinstance(s, str) and s for s in targets):
                raise ConfigError(
                    f"lora_targets must be a list of layer names, e.g. ['to_q', 'to_v'], got "
                    f"{targets!r}"
                )
            if not targets:
                raise ConfigError("lora_targets is empty; pass None for the default layers")
            self.lora_targets = tuple(targets)  # a list and a tuple are the same run (resume)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        for name, value, allowed in (
            ("objective", self.objective, OBJECTIVES),
            ("lr_schedule", self.lr_schedule, LR_SCHEDULES),
            ("select", self.select, SELECT),
            ("guidance", self.guidance, GUIDANCE),
            ("sharding", self.sharding, SHARDING),
        ):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; choose one of {list(allowed)}")
        if self.sharding == "fsdp" and self.lora_rank > 0:
            raise ConfigError(
                'sharding="fsdp" is for full fine-tuning; LoRA trains a few adapter weights, '
                'nothing worth sharding: use sharding="ddp" (the default)'
            )
        if self.holdout < 0 or (isinstance(self.holdout, float) and self.holdout >= 1.0):
            raise ConfigError(
                f"holdout must be a fraction in [0, 1) or a count >= 0, got {self.holdout!r}"
            )


@dataclass
class StraightenResult:
    """What :func:`straighten` returns.

    Attributes:
        module: the fine-tuned velocity field, a plain module of the input's architecture (LoRA
            adapters merged), in eval mode.
        history: one dict per record: ``iteration``, ``train_loss`` (mean since the previous
            record; ``None`` at iteration 0), ``heldout_loss`` (mean one-step interval error per
            dimension on the held-out noises, EMA weights; ``None`` without a holdout), ``lr``.
        iterations: iterations done in total (including those before a resume).
        best_iteration: iteration with the lowest held-out error (``None`` without a holdout).
        wall_s: seconds spent training, summed over resumed runs.
        config: the configuration used.
        schedule: the schedule trained for.
        heldout_indices: the store's sample indices held out of training.
        trainable_parameters: number of parameters trained (adapters only with LoRA).
        lora: with LoRA, the adapters of :attr:`module` before they were merged (the same
            returned weights), keyed by the raw network's layer names; ``None`` otherwise.
        guided: for a guided teacher whose guidance was kept, the guidance it is sampled with:
            ``{"scale": w, "uncond": {...}}``; ``None`` otherwise (see :attr:`sampling_field`).
        teacher_guidance: for a guided teacher, ``{"scale": w, "mode": "keep" | "distill"}``
            (saved with the weights, so ``--finetuned`` samples them as trained); else ``None``.
        base_fingerprint: the teacher's :func:`~bossflow.checkpoint.module_fingerprint` (saved,
            so an evaluation against another base model is flagged).
        pairs_meta: the ``meta`` the pairs were made with (model id, seed, the CLI's precision).
        unguided: the field was given as :class:`~bossflow.field.Unguided` (a distilled student
            straightened again): it is sampled that way too.
    """

    module: nn.Module
    history: list[dict[str, Any]]
    iterations: int
    best_iteration: int | None
    wall_s: float
    config: StraightenConfig
    schedule: Schedule
    heldout_indices: list[int] = field(default_factory=list)
    trainable_parameters: int = 0
    lora: LoraAdapter | None = None
    guided: dict[str, Any] | None = None
    teacher_guidance: dict[str, Any] | None = None
    base_fingerprint: str | None = None
    pairs_meta: dict[str, Any] = field(default_factory=dict)
    unguided: bool = False

    @property
    def sampling_field(self) -> nn.Module:
        """The velocity field to sample with: :attr:`module`, under its guidance if kept."""
        if self.guided is not None:
            return Guided(self.module, self.guided["scale"], self.guided["uncond"])
        if self.teacher_guidance is not None or self.unguided:
            return Unguided(self.module)
        return self.module


# --------------------------------------------------------------------------------------------------
# pieces used by the loop


def _device_of(module: Any) -> torch.device:
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


def _dtype_of(module: Any) -> torch.dtype:
    if isinstance(module, nn.Module):
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def eval_interval_error(
    field: Callable[[Tensor, Tensor], Tensor],
    pairs: PairStore,
    schedule: Schedule,
    indices: Sequence[int] | np.ndarray | Tensor,
    batch_size: int = 256,
    cond: CondLike | None = None,
) -> float:
    """Mean one-step interval error of ``field`` on the given noises of a pair store.

    For each noise ``m`` and interval ``k`` of the schedule,

        e^m_k = (1/D) || x^m_{s_k} + (s_{k+1} - s_k) v(x^m_{s_k}, s_k) - x^m_{s_{k+1}} ||^2,

    and the result is the mean of ``e^m_k`` over ``k`` and ``m`` (accumulated in float64): the
    per-dimension squared error of one Euler step per interval against the fine trajectory,
    i.e. ``(s_{k+1} - s_k)^2`` times the straightening loss of eq. 9 on that interval.

    Args:
        field: velocity field ``v(x, t)``; an ``nn.Module`` is evaluated in eval mode.
        pairs: the store holding the reference states.
        schedule: the schedule whose intervals are measured (its times must be in the store).
        indices: sample indices of the store (e.g. held-out noises).
        batch_size: noises per forward pass.
        cond: the conditioning the store was made with (as given to ``make_pairs``).

    Returns:
        The mean error (a Python float).
    """
    cols = pairs.for_schedule(schedule)
    steps = np.diff(schedule.times)
    idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64)
    if idx.size == 0:
        raise ConfigError("eval_interval_error needs at least one sample index")
    device, dtype = _device_of(field), _dtype_of(field)
    take_cond = _pairs_cond(pairs, cond)
    total = 0.0
    with torch.no_grad(), eval_mode(field):
        for a in range(0, idx.size, batch_size):
            c = _to_device(take_cond(idx[a : a + batch_size].tolist()), device)
            # States stay in float32 (at least); only the model's input is in the model's dtype.
            x = pairs.states[idx[a : a + batch_size], :].to(device)  # (b, T, ...)
            x = x[:, torch.as_tensor(cols, device=device)]
            x = x.to(torch.promote_types(x.dtype, torch.float32))  # (b, K + 1, ...)
            for k, h in enumerate(steps):
                t = time_batch(float(schedule.times[k]), x[:, k])
                v = call_field(field, x[:, k].to(dtype), t, "the model", False, c).to(x.dtype)
                jump = x[:, k] + float(h) * v - x[:, k + 1]
                total += float(jump.double().pow(2).flatten(1).mean(1).sum())
    return total / (idx.size * len(steps))


def _heldout_error(
    field: Callable[[Tensor, Tensor], Tensor],
    pairs: PairStore,
    schedule: Schedule,
    indices: np.ndarray,
    batch_size: int,
    cond: CondLike | None,
    split: bool = True,
) -> float:
    """:func:`eval_interval_error` on ``indices``, split over the processes of a multi-process run
    (each takes a contiguous block; the float64 sums are all-reduced). ``split=False``: every
    process measures all of them (a sharded model's forward passes are collective, so every
    process must make the same calls)."""
    if not dist.is_distributed() or not split:
        return eval_interval_error(field, pairs, schedule, indices, batch_size, cond)
    block = dist.split_range(len(indices))
    total = 0.0
    with dist.fail_together():
        if len(block):
            mine = indices[block.start : block.stop]
            total = eval_interval_error(field, pairs, schedule, mine, batch_size, cond) * len(mine)
    return float(dist.all_reduce_sum_float64(torch.tensor(total, dtype=torch.float64))) / len(
        indices
    )


def _pairs_cond(pairs: PairStore, cond: CondLike | None) -> Callable:
    """The reader of ``cond`` for a store's rows, checked against what the store was made with."""
    made = pairs.manifest.get("cond_fingerprint")
    take = cond_reader(cond, int(pairs.manifest["samples"]), "straightening")
    given = cond_fingerprint(take, int(pairs.manifest["samples"]))
    if not same_cond(made, take, int(pairs.manifest["samples"])) if made else given is not None:
        if made is None:
            why = "were made without conditioning, but cond= was given"
        elif given is None:
            why = "were made with conditioning: pass the same cond= as to make_pairs"
        else:
            why = (
                "were made with other conditioning (its first rows differ): pass make_pairs' cond="
            )
        raise ConfigError(f"the pairs in {pairs.path} {why}")
    return take


def _student(model: nn.Module, teacher: Guided | None, mode: str, unguided: bool) -> nn.Module:
    """What the loss sees: the network under the teacher's guidance (``keep``), the bare network
    on the same conditioning (``distill``, or an unguided field straightened again), or the
    network itself (no guidance)."""
    if teacher is None:
        return Unguided(model) if unguided else model
    if mode == "keep":
        return Guided(model, teacher.scale, teacher.uncond)
    return Unguided(model)


def _to_device(cond: dict[str, Tensor] | None, device: torch.device) -> dict[str, Tensor] | None:
    return None if cond is None else {k: v.to(device) for k, v in cond.items()}


def _learning_rate(it: int, config: StraightenConfig) -> float:
    """Linear warmup over ``warmup`` iterations, then constant or cosine decay to 0."""
    return learning_rate(it, config.iterations, config.lr, config.warmup, config.lr_schedule)


def _add_lora(
    module: nn.Module,
    rank: int,
    alpha: float | None,
    generator: torch.Generator,
    targets: Sequence[str] | None = None,
) -> tuple[nn.Module, list[Tensor]]:
    """Wrap ``module`` with rank-``rank`` LoRA adapters on the ``targets`` layers.

    Targets are resolved to exact layer names by
    :func:`~bossflow.straighten.adapters.lora_target_names` (default: every Linear and Conv2d, or
    the attention, projection and feed-forward linears of a diffusers network) and passed to peft
    as one exact regular expression (peft matches a list of names by suffix, which could catch
    other layers). peft initialises ``A``
    from the global RNG; it is drawn again here from ``generator`` (same distribution: Kaiming
    uniform, ``B = 0`` so the wrapped model starts equal to the base), so a run is reproducible.

    Returns:
        ``(wrapped, adapter_params)``: the peft ``LoraModel`` (called like the module; it has
        ``merge_and_unload()``) and its adapter parameters, the only trainable ones.
    """
    import re

    peft = require("peft", "lora", "LoRA straightening")
    from peft.tuners.lora import LoraModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = lora_target_names(module, targets)
    lora_config = peft.LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=0.0,
        target_modules="|".join(re.escape(n) for n in names),
    )
    device = _device_of(module)
    try:
        # peft initialises the layers from torch's global generators (re-initialised below from
        # `generator`): forked, so the caller's random stream does not move
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            wrapped = LoraModel(module, lora_config, "default")
    except Exception as err:  # peft raises many types; the user needs to know it was peft
        raise ConfigError(
            f"peft could not add LoRA adapters to {type(module).__name__} ({type(err).__name__}: "
            f"{err}); use lora_rank=0 for full fine-tuning"
        ) from err
    adapters = []
    for layer in wrapped.modules():
        if isinstance(layer, BaseTunerLayer):
            for dictionary in (layer.lora_A, layer.lora_B):
                adapters.extend(dictionary.parameters())
            for weight in (m.weight for m in layer.lora_A.values()):
                fresh = torch.empty(weight.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
                with torch.no_grad():
                    weight.copy_(fresh)
            for adapter in (*layer.lora_A.parameters(), *layer.lora_B.parameters()):
                if adapter.dtype in (torch.float16, torch.bfloat16):  # as get_peft_model does:
                    adapter.data = adapter.data.float()  # Adam on bf16 adapters barely moves
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    # Exactly the adapters train: the base weights must stay frozen (peft's contract, checked).
    assert {id(p) for p in trainable} == {id(p) for p in adapters}, (
        "peft left base weights trainable"
    )
    return wrapped, adapters


def _holdout_indices(n: int, holdout: float | int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) sample indices: the last ``holdout`` noises are held out."""
    count = int(round(holdout * n)) if isinstance(holdout, float) else int(holdout)
    if isinstance(holdout, float) and holdout > 0:
        count = max(count, 1)
    if count >= n:
        raise ConfigError(
            f"holdout {holdout!r} leaves no training noise in a store of {n}; make more pairs or "
            "hold out fewer"
        )
    return np.arange(n - count), np.arange(n - count, n)


_NEWER_PAIRS_KEYS = ("fine_grid", "dtype")


def _pairs_identity(pairs: PairStore) -> dict[str, Any]:
    m = pairs.manifest
    identity = {
        "times": [float(t) for t in pairs.times],
        "samples": len(pairs),
        "model_fingerprint": m.get("model_fingerprint"),
        "noise_fingerprint": m.get("noise_fingerprint"),
    }
    # conditioning and guidance only when there are some: unconditional checkpoints stay valid;
    # the fine grid and storage dtype likewise only where the store records them
    for key in ("cond_fingerprint", "guidance", *_NEWER_PAIRS_KEYS):
        if m.get(key) is not None:
            identity[key] = m[key]
    return identity


def _check_resumable(
    ckpt: dict[str, Any],
    path: Path,
    config: StraightenConfig,
    schedule: Schedule,
    pairs: PairStore,
    base: str | None,
    guidance: dict[str, Any] | None = None,
) -> None:
    """Raise :class:`CheckpointError` unless ``ckpt`` continues exactly this run."""
    keys = {"config", "schedule", "pairs", "base_fingerprint", "iteration", "model", "optimizer"}
    keys |= {"ema", "generator", "history", "running", "best", "wall_s"}
    if not keys <= ckpt.keys():
        raise CheckpointError(f"{path} lacks {sorted(keys - ckpt.keys())}; delete it to start over")
    saved = ckpt["config"]
    fields = _TRAJECTORY_FIELDS + (("iterations",) if config.lr_schedule == "cosine" else ())
    differ = [
        f"{name}: {saved.get(name)!r} in the checkpoint, {getattr(config, name)!r} now"
        for name in fields
        if saved.get(name) != getattr(config, name)
    ]
    if list(ckpt["schedule"]["times"]) != schedule.tolist():
        differ.append("schedule times")
    mine = _pairs_identity(pairs)
    if isinstance(ckpt["pairs"], dict):  # checkpoints from before the grid and dtype were kept
        mine = {k: v for k, v in mine.items() if k in ckpt["pairs"] or k not in _NEWER_PAIRS_KEYS}
    if ckpt["pairs"] != mine:
        differ.append("pair store (other times, fine grid, dtype, noises, model or sample count)")
    if ckpt["base_fingerprint"] != base:
        differ.append("base model weights")
    if ckpt.get("guidance") != guidance:
        differ.append("guidance (scale, unconditional inputs or keep/distill)")
    if differ:
        raise CheckpointError(
            f"{path} was made by another straightening run ({'; '.join(differ)}). Pass another "
            "out_dir, or delete the checkpoint to start over."
        )
    if ckpt["iteration"] > config.iterations:
        raise CheckpointError(
            f"{path} is already at iteration {ckpt['iteration']}, beyond the {config.iterations} "
            "asked; pass iterations >= that or another out_dir"
        )


# --------------------------------------------------------------------------------------------------
# objectives: what one training batch is


@dataclass(frozen=True)
class Objective:
    """A straightening objective: how a batch ``(x, t, target)`` is drawn from a pair store.

    ``batch(pairs, cols, times, rows, generator, device, part)`` gets the store, the columns
    ``cols`` (K + 1,) of the schedule's times ``times`` (K + 1,) float64, the store rows of the
    batch (drawn by the loop) and the run's generator for any further draw; it returns float32
    tensors on ``device``: inputs ``x`` (B, ...), times ``t`` (B,) and regression targets shaped
    like ``x``. ``part`` (a slice, default all) selects the rows this process trains on: every
    draw is made for the whole batch, so the generator advances as in a single process, and only
    the rows of ``part`` are read and returned.
    """

    name: str
    batch: Callable[..., tuple[Tensor, Tensor, Tensor]]
    description: str


def _boss_batch(pairs, cols, times, rows, generator, device, part=slice(None)):
    """Paper eq. 9: a random interval k per row; target (x_{s_{k+1}} - x_{s_k}) / (s_{k+1} - s_k)."""
    k = torch.randint(len(cols) - 1, (len(rows),), generator=generator)
    rows, k = rows[part], k[part]
    x_k = pairs.states[rows, cols[k]].to(device, torch.float32)
    x_next = pairs.states[rows, cols[k + 1]].to(device, torch.float32)
    h = (times[k + 1] - times[k]).to(device, torch.float32)
    target = (x_next - x_k) / h.view(-1, *([1] * (x_k.ndim - 1)))
    return x_k, times[k].to(device, torch.float32), target


def _reflow_batch(pairs, cols, times, rows, generator, device, part=slice(None)):
    """Reflow: t ~ U[0, 1] on the straight line from the noise to the model's final sample."""
    t = torch.rand(len(rows), generator=generator, dtype=torch.float64)[part]
    t = t.to(device, torch.float32)
    rows = rows[part]
    z = pairs.states[rows, int(cols[0])].to(device, torch.float32)
    x_1 = pairs.states[rows, int(cols[-1])].to(device, torch.float32)
    x_t, target = interpolate(z, x_1, t)
    return x_t, t, target


#: name -> :class:`Objective`; a new objective is one entry here.
OBJECTIVES: dict[str, Objective] = {
    "boss": Objective("boss", _boss_batch, "one Euler step per schedule interval (paper eq. 9)"),
    "reflow": Objective("reflow", _reflow_batch, "straight lines noise -> sample (Liu et al.)"),
}


# --------------------------------------------------------------------------------------------------
# the training state: what a checkpoint carries


@dataclass
class _TrainingState:
    """Everything a run needs to continue exactly where it stopped, besides the model's weights.

    ``best`` is ``{"iteration", "loss", "params"}`` of the lowest held-out error so far.
    """

    iteration: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    best: dict[str, Any] | None = None


class _Run:
    """The pieces of one straightening run that a checkpoint saves and restores.

    Holds the model being trained, its trainable ``params`` (with their names), the optimizer, the
    EMA, the generator and the :class:`_TrainingState`, plus the identity of the run (config,
    schedule, pairs, base weights) that a resumed checkpoint must match.
    """

    def __init__(self, model, params, optimizer, ema, generator, identity, sharded=False):
        self.model, self.params, self.optimizer = model, params, optimizer
        self.ema, self.generator, self.identity = ema, generator, identity
        self.sharded = sharded  # FSDP2: parameters, moments and averages are DTensors
        names = {id(p): n for n, p in model.named_parameters()}
        self.param_names = [names[id(p)] for p in params]
        self.state = _TrainingState()

    def checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint, in plain full tensors whatever the sharding.

        Collective when sharded (every process calls it; rank 0 gets the checkpoint, the others
        ``None``), so a sharded run's checkpoint resumes on any number of processes.
        """
        s = self.state
        if self.sharded:
            model = sharding.full_model_state(self.model)
            optimizer = sharding.full_optimizer_state(self.model, self.optimizer, self.param_names)
            shadow = sharding.full_on_rank_zero(self.ema.shadow) if self.ema else []
            best = s.best
            if best is not None:
                best = {**best, "params": sharding.full_on_rank_zero(best["params"])}
            if not dist.is_rank_zero():
                return None
        else:
            model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
            shadow, best = self.ema.shadow if self.ema else [], s.best
        return {
            "format": CHECKPOINT_FORMAT,
            **self.identity,
            "iteration": s.iteration,
            "model": model,
            "ema": dict(zip(self.param_names, shadow, strict=True)) if self.ema else {},
            "optimizer": optimizer,
            "generator": self.generator.get_state(),
            "history": s.history,
            "running": {"loss_sum": s.loss_sum, "loss_count": s.loss_count},
            "best": best,
            "wall_s": s.wall_s,
        }

    def save(self, path: Path, ckpt: dict[str, Any] | None = None) -> None:
        """Write the checkpoint (``ckpt``, default :meth:`checkpoint`) and ``history.json``."""
        save_state(path, self.checkpoint() if ckpt is None else ckpt)
        atomic_write_text(path.with_name("history.json"), json.dumps(self.state.history, indent=1))

    def restore(self, ckpt: dict[str, Any], path: Path, device: torch.device) -> None:
        try:
            if self.sharded:
                sharding.load_model_state(self.model, ckpt["model"])
                sharding.load_optimizer_state(
                    self.model, self.optimizer, ckpt["optimizer"], self.param_names
                )
            else:
                self.model.load_state_dict(ckpt["model"])  # strict: every key, no extra one
                self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.ema is not None:
                for e, name in zip(self.ema.shadow, self.param_names, strict=True):
                    e.copy_(
                        sharding.like(ckpt["ema"][name], e) if self.sharded else ckpt["ema"][name]
                    )
            self.generator.set_state(ckpt["generator"])
        except (KeyError, TypeError, RuntimeError, ValueError) as err:
            raise CheckpointError(
                f"{path} does not fit this model or run ({type(err).__name__}: {err}); pass "
                "another out_dir or delete it to start over"
            ) from None
        best = ckpt["best"]
        if best is not None:
            values = best["params"]
            if self.sharded:
                values = [sharding.like(t, p) for t, p in zip(values, self.params, strict=True)]
            best = {**best, "params": [t.to(device) for t in values]}
        self.state = _TrainingState(
            ckpt["iteration"],
            ckpt["history"],
            ckpt["wall_s"],
            ckpt["running"]["loss_sum"],
            ckpt["running"]["loss_count"],
            best,
        )


# --------------------------------------------------------------------------------------------------
# the loop


def _read_checkpoint(path: Path | None, check: Callable[[dict], None]) -> dict[str, Any] | None:
    """The checkpoint to resume from on every process (``None``: start afresh).

    Rank 0 reads it and ``check``s it; then the others read the file it checked (the output
    folder is one all processes see, as the pair shards need; sending the checkpoint would put
    its bytes on every device, where a sharded run has no room for them) and all compare what
    they read.
    """
    ckpt = None
    if path is not None and dist.is_rank_zero() and path.exists():
        with dist.fail_together():
            ckpt = load_state(path, CHECKPOINT_FORMAT)
            check(ckpt)
    if dist.broadcast_object(ckpt is not None) and not dist.is_rank_zero():
        with dist.fail_together():
            try:
                ckpt = load_state(path, CHECKPOINT_FORMAT)
            except CheckpointError as err:
                raise ConfigError(
                    f"rank 0 resumes from {path}, which this process cannot read ({err}); "
                    f"{dist.SHARED_FOLDER}"
                ) from None
    if ckpt is not None and dist.is_distributed():
        seen = dist.all_gather_object((ckpt["iteration"], len(ckpt["history"]), ckpt["wall_s"]))
        if len(set(seen)) > 1:
            raise ConfigError(
                f"the processes read different checkpoints in {path} (iteration, records, wall "
                f"time by rank: {seen}); {dist.SHARED_FOLDER}"
            )
    return ckpt


def _step_seed(seed: int, rank: int, iteration: int) -> int:
    """The global generators' seed for one training step of one process."""
    return int(np.random.SeedSequence([seed, rank, iteration]).generate_state(1, np.uint64)[0] >> 1)


def _seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators the model's dropout draws from: the CPU's and ``device``'s (both
    forked by the caller), and no other device's (``torch.manual_seed`` would seed them all)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def _plain_copy(module: nn.Module) -> nn.Module:
    """A private copy of ``module`` in the plain (contiguous) layout: weights a --channels-last
    teacher left channels-last are not what FSDP2 shards (it refuses them), what the returned
    module should hold (load_state_dict keeps a layout), nor what the caller's own training uses."""
    return copy.deepcopy(module).to(memory_format=torch.contiguous_format)


def check_batch_split(batch_size: int, option: str = "batch_size") -> int:
    """The number of processes, when the global ``batch_size`` splits evenly over them.

    Raises:
        ConfigError: it does not (named as ``option``); callers check before making pairs.
    """
    world = dist.world_size()
    if batch_size % world:
        raise ConfigError(
            f"{option} {batch_size} is split over {world} processes; pass a multiple of {world} "
            "(the global batch, the same as one process would use)"
        )
    return world


def straighten(
    field_module: nn.Module,
    pairs: PairStore,
    schedule: Schedule,
    config: StraightenConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    callback: Callable[[dict[str, Any]], None] | None = None,
    cond: CondLike | None = None,
) -> StraightenResult:
    """Fine-tune a copy of ``field_module`` by BOSS straightening (paper eq. 9) or reflow.

    Args:
        field_module: the pretrained velocity field ``v(x, t)`` (``x: (B, ...)``, ``t: (B,)``), an
            ``nn.Module`` (e.g. :class:`~bossflow.field.RectifiedFlowField`). It is deep-copied and
            never modified; training runs on its device and dtype.
        pairs: reference states from :func:`~bossflow.straighten.make_pairs`, holding the
            schedule's times.
        schedule: the schedule ``s_0..s_K`` to straighten for (also measures the held-out error
            under reflow).
        config: settings (defaults: :class:`StraightenConfig`).
        out_dir: folder for ``checkpoint.pt`` and ``history.json``; a run finding a checkpoint of
            the same run there resumes from it. ``None``: no files.
        progress: show a progress bar with the loss (on a terminal only).
        callback: called after every iteration with ``{"iteration", "loss", "lr", "model"}``
            (``loss`` a 0-dim tensor, the global batch's under torchrun; ``model`` the module
            being trained, with its raw weights and, under LoRA, the peft wrapper). Raising from
            it stops the run; the last checkpoint stays for a resume.
        cond: the per-sample conditioning the pairs were made with (the same ``cond=`` as
            :func:`~bossflow.straighten.make_pairs`); each training batch takes the rows of its
            noises. A :class:`~bossflow.field.Guided` ``field_module`` is straightened under its
            guidance (``config.guidance``: keep it, or distill it into the bare network).

    Returns:
        A :class:`StraightenResult`; ``.module`` is a plain module of the input's architecture
        (of the guided network for a :class:`~bossflow.field.Guided` input); sample with
        ``.sampling_field``.

    Raises:
        ConfigError: bad settings, or LoRA impossible on this module.
        CheckpointError: ``out_dir`` holds an unreadable checkpoint or one of another run; the
            pair store lacks the schedule's times.
        BossflowError: ``out_dir`` is a file, or a file cannot be written.
    """
    from ..progress import progress_bar

    config = config or StraightenConfig()
    config.check()
    if not isinstance(field_module, nn.Module):
        raise ConfigError("straighten needs an nn.Module velocity field (wrap it: bossflow.field)")
    take_cond = _pairs_cond(pairs, cond)
    guidance = guidance_identity(field_module)
    made = pairs.manifest.get("guidance")
    if made != json.loads(json.dumps(guidance)):  # as the manifest holds it
        raise ConfigError(
            f"the pairs in {pairs.path} were made with guidance {made}, but the field to "
            f"straighten has guidance {guidance}: straighten the field the pairs were made with "
            "(the same Guided scale and unconditional inputs), or make new pairs"
        )
    if guidance is not None:
        guidance["mode"] = config.guidance
    teacher_guide, field_module = (
        (field_module, field_module.field)
        if isinstance(field_module, Guided)
        else (None, field_module)
    )
    # a distilled student, straightened on as it samples: the bare network trains, called
    # without the unconditional inputs its conditioning may carry
    unguided = isinstance(field_module, Unguided)
    if unguided:
        field_module = field_module.field
    objective = OBJECTIVES[config.objective]
    world = check_batch_split(config.batch_size)
    share = config.batch_size // world
    part = slice(dist.rank() * share, (dist.rank() + 1) * share)  # this process's rows of a batch
    cols = torch.as_tensor(pairs.for_schedule(schedule))  # (K + 1,) store columns of s_0..s_K
    times = torch.tensor(np.array(schedule.times), dtype=torch.float64)
    train_idx, heldout_idx = _holdout_indices(len(pairs), config.holdout)
    if config.select == "best" and heldout_idx.size == 0:
        raise ConfigError('select="best" needs held-out noises: set holdout > 0')
    ckpt_path = None
    if out_dir is not None:
        ckpt_path = ensure_dir(out_dir) / "checkpoint.pt"

    # the model: a private copy, fully trainable or with LoRA adapters only
    base_fingerprint = module_fingerprint(field_module)
    model = _plain_copy(field_module)
    device, dtype = _device_of(model), _dtype_of(model)
    generator = torch.Generator().manual_seed(config.seed)
    if config.lora_rank > 0:
        model, params = _add_lora(
            model, config.lora_rank, config.lora_alpha, generator, config.lora_targets
        )
    else:  # the weights the module trains (NCSN++'s fixed Fourier features stay fixed), or all
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:  # a module frozen for inference by its caller: all but the fixed ones
            fixed = {
                id(getattr(m, name)) for m in model.modules()
                for name in getattr(m, "fixed_parameters", ())
            }  # fmt: skip
            params = [p.requires_grad_(True) for p in model.parameters() if id(p) not in fixed]
    if not params:
        raise ConfigError(f"{type(field_module).__name__} has no parameters to fine-tune")
    sharded = config.sharding == "fsdp" and dist.is_distributed()
    if sharded and any(
        isinstance(m, FlowMatchingField) and m.batched_time is not True for m in model.modules()
    ):  # sharded forward passes are collective: every process must make the same calls
        raise ConfigError(
            'sharding="fsdp" needs a flow_matching model called once per batch: wrap it as '
            "FlowMatchingField(model, batched_time=True) (it must take a (B,) time), or use ddp"
        )
    if sharded:  # FSDP2, in place: the parameters become shards (DTensors)
        sharding.shard(model)
        params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    run = _Run(
        model,
        params,
        torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay),
        EMA(params, config.ema_decay) if config.ema_decay > 0 else None,
        generator,
        {
            "config": asdict(config),
            "schedule": schedule.to_dict(),
            "pairs": _pairs_identity(pairs),
            "base_fingerprint": base_fingerprint,
            "guidance": guidance,
        },
        sharded,
    )
    # what the loss sees: the network under the teacher's guidance, or bare (distilled)
    student = _student(model, teacher_guide, config.guidance, unguided)
    ckpt = _read_checkpoint(
        ckpt_path, lambda c: _check_resumable(
            c, ckpt_path, config, schedule, pairs, base_fingerprint, guidance
        )
    )  # fmt: skip
    if ckpt is not None:
        run.restore(ckpt, ckpt_path, device)
    state = run.state
    # the forward pass of training: through DDP (gradients averaged over the processes, LoRA
    # adapters included: they are the trainable parameters DDP registers) on several processes
    train_student = student
    if dist.is_distributed() and not sharded:  # sharded: FSDP averages the gradients itself
        dist.barrier()  # a rank that failed above is reported here, not inside DDP's set-up
        ddp_class = torch.nn.parallel.DistributedDataParallel
        # buffers are identical on every rank: nothing to send per step (the keyword was renamed)
        sync = "forward_sync_buffers"
        if sync not in inspect.signature(ddp_class.__init__).parameters:
            sync = "broadcast_buffers"
        # static_graph: every step makes the same calls, so DDP learns once which trainable
        # parameters the loss uses (a model with unused ones trains as on one process, where
        # DDP's default stopped at the second step) and recomputation is allowed
        ddp = ddp_class(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            static_graph=True,
            **{sync: False},
        )
        train_student = _student(ddp, teacher_guide, config.guidance, unguided)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16) if config.amp else nullcontext()

    def record(lr: float) -> None:
        """Append the training loss since the last record and the held-out error to history."""
        heldout = None
        if heldout_idx.size:
            with run.ema.applied() if run.ema is not None else nullcontext():
                heldout = _heldout_error(
                    student, pairs, schedule, heldout_idx, config.eval_batch_size, cond,
                    split=not sharded,
                )  # fmt: skip
                if sharded:  # every rank measured it: rank 0's value, so all select alike
                    heldout = dist.broadcast_object(heldout)
                if state.best is None or heldout < state.best["loss"]:
                    snapshot = [p.detach().clone() for p in params]
                    state.best = {"iteration": state.iteration, "loss": heldout, "params": snapshot}
        train_loss = state.loss_sum / state.loss_count if state.loss_count else None
        if train_loss is not None and not math.isfinite(train_loss):
            raise ConfigError(
                f"the training loss became {train_loss} by iteration {state.iteration}; lower lr "
                "or check the pairs"
            )
        state.history.append(
            {
                "iteration": state.iteration,
                "train_loss": train_loss,
                "heldout_loss": heldout,
                "lr": lr,
            }
        )
        state.loss_sum, state.loss_count = 0.0, 0

    if state.iteration == 0:
        record(_learning_rate(0, config))  # the pretrained model's held-out error: the baseline
    bar = progress_bar(
        total=config.iterations,
        initial=state.iteration,
        desc=f"straighten ({config.objective}{', LoRA' if config.lora_rank else ''})",
        enabled=progress and dist.is_rank_zero(),
    )
    shown = None  # smoothed loss for the progress bar
    start_time = time.perf_counter()
    # dropout layers draw masks keyed by (seed, iteration, layer, global row): N processes train
    # with the masks of one process (straighten.dropout); any other randomness of the model draws
    # from torch's global generators: forked, and seeded each step from (seed, rank, iteration),
    # so a run is reproducible, resumes to the same weights, and processes draw different values
    rng = ExitStack()
    rng.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
    keyed = rng.enter_context(RowKeyedDropout(model, config.seed))
    blocks = 2 if isinstance(train_student, Guided) else 1  # Guided calls the model on cat([x, x])
    try:
        while state.iteration < config.iterations:
            _seed_step(_step_seed(config.seed, dist.rank(), state.iteration), device)
            lr = _learning_rate(state.iteration, config)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            # the global batch, the same on every process; this process trains on rows[part]
            rows = random_rows(train_idx, config.batch_size, generator)
            x, t, target = objective.batch(pairs, cols, times, rows, generator, device, part)
            c = _to_device(take_cond(rows[part].tolist()), device)
            with keyed.step(state.iteration, part.start, len(x), config.batch_size, blocks):
                with autocast():
                    # times at least float32; a model that raises is one error naming the call
                    pred = call_field(
                        train_student, x.to(dtype), t.to(time_dtype(x)), "the model", False, c
                    )
                if pred.shape != target.shape:  # mse_loss would broadcast silently
                    raise ModelOutputError(
                        f"the field returned shape {tuple(pred.shape)} for input {tuple(x.shape)}"
                    )
                loss = F.mse_loss(pred.float(), target)  # float32 whatever the model's dtype
                run.optimizer.zero_grad(set_to_none=True)
                try:
                    loss.backward()
                except RuntimeError as err:  # DDP's / FSDP's gradient reduction with the others
                    if (lost := dist.lost_peer(err, "the gradient reduction")) is not None:
                        raise lost from None
                    raise
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            run.optimizer.step()
            if run.ema is not None:
                run.ema.update(state.iteration)
            state.iteration += 1
            # note: float(loss) is a device sync; cheap next to a step of any real model
            loss_value = float(loss.detach())
            if world > 1:  # the global batch's loss: the mean of the equal parts' losses
                loss_value = float(dist.all_reduce_sum_float64(torch.tensor(loss_value))) / world
            state.loss_sum, state.loss_count = state.loss_sum + loss_value, state.loss_count + 1
            if callback is not None:
                step_loss = loss.detach() if world == 1 else loss.new_tensor(loss_value)
                callback(
                    {"iteration": state.iteration, "loss": step_loss, "lr": lr, "model": model}
                )
            last = state.iteration == config.iterations
            if last or (config.eval_every and state.iteration % config.eval_every == 0):
                record(lr)
            shown = loss_value if shown is None else 0.9 * shown + 0.1 * loss_value
            bar.set_postfix(loss=f"{shown:.4g}", refresh=False)
            bar.update(1)
            if ckpt_path is not None and (
                last or (config.checkpoint_every and state.iteration % config.checkpoint_every == 0)
            ):
                state.wall_s += time.perf_counter() - start_time
                start_time = time.perf_counter()
                ckpt = run.checkpoint()  # collective when sharded
                if dist.is_rank_zero():
                    with dist.fail_together():
                        run.save(ckpt_path, ckpt)
                dist.barrier()  # a failed write stops every process here
    finally:
        bar.close()
        rng.close()  # torch's global generators as they were before training
    if ckpt_path is None:  # else the last checkpoint holds the wall time (a rerun returns it)
        state.wall_s += time.perf_counter() - start_time

    # the weights to return: the best recorded, else the EMA, else the raw ones
    if config.select == "best":
        with torch.no_grad():
            for p, value in zip(params, state.best["params"], strict=True):
                p.copy_(value)
    elif run.ema is not None:
        run.ema.copy_to()
    if sharded:  # gather the shards into a plain module of the input's architecture
        plain = _plain_copy(field_module)
        sharding.gather_into(model, plain)
        model = plain
    lora = None
    if config.lora_rank > 0:
        lora = lora_adapter(model, config.lora_rank, config.lora_alpha)  # before merging
        model = model.merge_and_unload()  # plain layers, adapters folded into the weights
    trainable = {name: p.requires_grad for name, p in field_module.named_parameters()}
    for name, p in model.named_parameters():  # as the input was (frozen parts stay frozen)
        p.requires_grad_(trainable.get(name, True))
    model.eval()
    return StraightenResult(
        module=model,
        history=state.history,
        iterations=state.iteration,
        best_iteration=state.best["iteration"] if state.best is not None else None,
        wall_s=state.wall_s,
        config=config,
        schedule=schedule,
        heldout_indices=[int(i) for i in heldout_idx],
        trainable_parameters=sum(p.numel() for p in params),
        lora=lora,
        guided=(
            {"scale": teacher_guide.scale, "uncond": teacher_guide.uncond}
            if teacher_guide is not None and config.guidance == "keep"
            else None
        ),
        teacher_guidance=(
            None
            if teacher_guide is None
            else {"scale": teacher_guide.scale, "mode": config.guidance}
        ),
        base_fingerprint=base_fingerprint,
        pairs_meta=dict(pairs.manifest.get("meta") or {}),
        unguided=unguided,
    )


def save_straightened(result: StraightenResult, path: str | os.PathLike) -> Path:
    """Save the fine-tuned network (and LoRA adapters) plus a JSON provenance file, atomically.

    Writes, for ``path`` = ``<dir>/<stem>.safetensors``:

    - ``path``: the *raw network's* ``state_dict()`` (LoRA merged), without the field adapter's
      ``network.`` prefix (:func:`~bossflow.straighten.adapters.raw_network`), so it loads with
      ``load_state_dict(..., strict=True)`` into the bare network (e.g. a diffusers
      ``UNet2DModel``), and through ``--finetuned``;
    - ``<dir>/<stem>-diffusers/`` for a diffusers ``ModelMixin``: its own ``save_pretrained``
      layout (``ModelClass.from_pretrained(folder)``);
    - ``<dir>/<stem>-lora/`` after a LoRA run: the adapters alone
      (:meth:`~bossflow.straighten.adapters.LoraAdapter.save`: peft's ``adapter_config.json`` +
      ``adapter_model.safetensors``, and diffusers' ``pytorch_lora_weights.safetensors`` for
      networks that load LoRA);
    - ``path`` with suffix ``.json``, last, so it never describes weights that are not there:
      ``{"format", "objective", "schedule", "config", "iterations", "best_iteration", "history",
      "wall_s", "heldout_indices", "trainable_parameters", "network_prefix", "network_class",
      "diffusers_folder", "lora"}`` (``lora``: folder, rank, alpha and target modules, or null).

    Returns:
        The path of the ``.safetensors`` file.
    """
    from safetensors.torch import save as st_save

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    if not dist.is_rank_zero():  # every process holds the same result; rank 0 writes it
        return path
    network, prefix = raw_network(result.module)
    state = network_state(network)
    diffusers_folder = lora_folder = None
    if is_diffusers_model(network):
        diffusers_folder = save_diffusers_model(network, path.with_name(f"{path.stem}-diffusers"))
    if result.lora is not None:
        lora_folder = result.lora.save(path.with_name(f"{path.stem}-lora"))
    cls = type(network)
    provenance = {
        "format": "bossflow.straightened/1",
        "objective": result.config.objective,
        "schedule": result.schedule.to_dict(),
        "config": asdict(result.config),
        "iterations": result.iterations,
        "best_iteration": result.best_iteration,
        "history": result.history,
        "wall_s": result.wall_s,
        "heldout_indices": result.heldout_indices,
        "trainable_parameters": result.trainable_parameters,
        "guidance": result.teacher_guidance,
        "base_fingerprint": result.base_fingerprint,  # the teacher: evaluate checks its base
        "pairs": result.pairs_meta,  # what made the pairs (model, seed, precision)
        "unguided": result.unguided,  # sampled without the conditioning's uncond.* inputs
        "network_prefix": prefix,
        "network_class": f"{cls.__module__}.{cls.__qualname__}",
        "diffusers_folder": diffusers_folder.name if diffusers_folder else None,
        "lora": None
        if result.lora is None
        else {
            "folder": lora_folder.name,
            "rank": result.lora.rank,
            "alpha": result.lora.alpha,
            "target_modules": result.lora.target_modules,
        },
    }
    blob = st_save(state, metadata={"format": provenance["format"]})
    atomic_write_bytes(path, blob)
    atomic_write_text(path.with_suffix(".json"), json.dumps(provenance, indent=1) + "\n")
    return path
