"""Tests of bossflow.straighten, and the tiny velocity fields they share.

The helpers live here (not in a conftest) so both test modules import them explicitly.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import Tensor, nn


class TinyField(nn.Module):
    """A small MLP velocity field ``v(x, t)`` on flat samples of ``dim`` values."""

    def __init__(self, dim: int = 2, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )  # fmt: skip

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x.flatten(1), t[:, None].to(x.dtype)], 1)).view_as(x)


class TinyConvField(nn.Module):
    """A small conv velocity field on (C, H, W) images, for LoRA's Conv2d path."""

    def __init__(self, channels: int = 1, hidden: int = 32):
        super().__init__()
        self.time = nn.Linear(1, hidden)
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = self.conv_in(x) + self.time(t[:, None].to(x.dtype))[:, :, None, None]
        h = self.conv_mid(torch.nn.functional.silu(h))
        return self.conv_out(torch.nn.functional.silu(h))


def four_modes(n: int, generator: torch.Generator) -> Tensor:
    """(n, 2) points around (+-2, +-2): a multi-modal target, so flow trajectories curve."""
    centres = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]])
    pick = torch.randint(4, (n,), generator=generator)
    return centres[pick] + 0.3 * torch.randn(n, 2, generator=generator)


@functools.cache
def _pretrained_state() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    field = TinyField()
    opt = torch.optim.Adam(field.parameters(), lr=1e-2)
    for _ in range(200):  # rectified flow: x_t = t x + (1 - t) z, target x - z
        x, z = four_modes(128, gen), torch.randn(128, 2, generator=gen)
        t = torch.rand(128, generator=gen)
        loss = (field(t[:, None] * x + (1 - t[:, None]) * z, t) - (x - z)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in field.state_dict().items()}


def pretrained_field() -> TinyField:
    """A TinyField briefly trained as a rectified flow to four modes (cached; a fresh copy)."""
    field = TinyField()
    field.load_state_dict(copy.deepcopy(_pretrained_state()))
    return field.eval()
