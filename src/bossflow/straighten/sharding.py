"""FSDP2 sharding of a full fine-tuning run (``StraightenConfig(sharding="fsdp")``).

With DDP (the default) every process holds the whole model, its gradients, the optimizer's two
Adam moments and the EMA: about five copies of the weights per device. When that does not fit,
``sharding="fsdp"`` splits all of them over the processes with PyTorch's own FSDP2
(``torch.distributed.fsdp.fully_shard``): each process keeps 1/N of every parameter, gradient,
moment and average, and gathers a layer's full weights only while it runs. The run is the same
optimisation as DDP and as one process with the same global batch (gradients are averaged over the
equal parts of the batch), so the result matches them to float tolerance.

What this module adds around ``fully_shard``: which submodules become their own units, and the
conversion between sharded state (``DTensor``) and the plain full tensors a checkpoint holds, so a
checkpoint written by a sharded run resumes on any number of processes, sharded or not, and the
returned module is a plain module of the input's architecture.

LoRA trains a few adapter weights: there is nothing worth sharding, so LoRA runs use DDP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "shard",
    "full_tensor",
    "full_on_rank_zero",
    "like",
    "full_model_state",
    "gather_into",
    "full_optimizer_state",
]


def _units(model: nn.Module, min_share: float = 0.05) -> list[nn.Module]:
    """Submodules sharded as their own units: the largest blocks, then the root.

    A unit's full weights exist only while it runs, so the peak memory is about the largest unit.
    Descends from the root and takes every submodule holding at least ``min_share`` of the
    parameters whose children are all below that share (a block of layers, not a single bias).
    """
    total = sum(p.numel() for p in model.parameters())
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            size = sum(p.numel() for p in child.parameters())
            if size < min_share * total:
                continue
            big = [
                c
                for c in child.children()
                if sum(p.numel() for p in c.parameters()) >= min_share * total
            ]
            if big:
                visit(child)
            else:
                units.append(child)

    visit(model)
    return units


def shard(model: nn.Module) -> nn.Module:
    """``fully_shard`` the model in place (its large blocks, then the root) over the default group."""
    from torch.distributed.fsdp import fully_shard

    for unit in _units(model):
        fully_shard(unit)
    # The root too gives its gathered weights back after every forward pass (FSDP2 keeps them for
    # the backward by default). Held-out passes run on the EMA weights swapped in and out of the
    # shards; a root that kept the EMA weights gathered would train on them afterwards (measured:
    # 3.5e-3 off the DDP run after 4 iterations; with this, bit for bit equal).
    fully_shard(model, reshard_after_forward=True)
    return model


def full_tensor(t: Any) -> Any:
    """A sharded ``DTensor`` gathered into a plain tensor (collective); anything else unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_on_rank_zero(tensors: list[Any]) -> list[Any] | None:
    """Sharded tensors gathered one at a time into CPU tensors on rank 0 (collective; ``None`` on
    the other ranks): the device holds one full tensor at a time, not the whole list."""
    from .. import distributed as dist

    out = []
    for t in tensors:
        full = full_tensor(t)
        if dist.is_rank_zero():
            out.append(full.detach().to("cpu", copy=True))
        del full
    return out if dist.is_rank_zero() else None


def gather_into(sharded: nn.Module, plain: nn.Module) -> None:
    """Copy a sharded model's weights into ``plain``, a module of its architecture, on every rank
    (collective), one tensor at a time; the keys must match exactly."""
    source, target = sharded.state_dict(), plain.state_dict()
    if source.keys() != target.keys():
        missing, extra = target.keys() - source.keys(), source.keys() - target.keys()
        raise RuntimeError(f"sharded and plain keys differ: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for key, value in source.items():
            full = full_tensor(value)
            target[key].copy_(full)
            del full


def like(value: Tensor, reference: Tensor) -> Tensor:
    """A full tensor laid out like ``reference``: sharded the same way if it is a ``DTensor``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(device=reference.device, dtype=reference.dtype)
    if isinstance(reference, DTensor):
        return distribute_tensor(value, reference.device_mesh, reference.placements)
    return value


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The full state dict of a sharded model on rank 0's CPU (collective; empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str]
) -> dict[str, Any]:
    """The optimizer state of a sharded run in ``optimizer.state_dict()``'s own layout.

    PyTorch's full optimizer state is keyed by parameter name; a plain state dict by position in
    the optimizer's parameter list (``names``). The plain layout is what a checkpoint holds, so a
    sharded checkpoint resumes without sharding too. Collective; empty on ranks other than 0.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    osd = get_optimizer_state_dict(model, optimizer, options=options)
    if not osd:
        return {}
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[k]: v for k, v in osd["state"].items()},
        "param_groups": [
            {**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]
        ],
    }


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], names: list[str]
) -> None:
    """Load a plain-layout optimizer state (a checkpoint's) into a sharded run's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    osd = {
        "state": {names[int(i)]: v for i, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


def load_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full state dict (every rank holds it) into a sharded model, strictly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))
