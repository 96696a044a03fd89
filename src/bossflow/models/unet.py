"""Small networks for the embedded default: a UNet velocity field and a digit classifier.

:class:`DigitUNet` is a velocity field in the bossflow convention: ``forward(x, t)`` with
``x: (B, C, H, W)`` and ``t: (B,)`` in [0, 1] (noise at ``t = 0``, data at ``t = 1``) returns
``dx/dt`` shaped like ``x``. No time rescaling happens outside the module; the sinusoidal embedding
below is the only place that looks at ``t``. With ``num_classes > 0`` it is class-conditional,
``forward(x, t, class_labels=y)`` with ``y: (B,)`` int64 in ``0 .. num_classes``, where the last
index ``num_classes`` is the null label used for classifier-free guidance.

:class:`DigitClassifier` is a small convolutional net on images in [-1, 1]. Its
:meth:`DigitClassifier.features` vector is the feature space of the Fréchet distance used for the
embedded data sets (no Inception weights are available offline).

Both keep their constructor arguments in ``module.config`` (a JSON-serialisable dict), so
``type(module)(**module.config)`` rebuilds the architecture, which :mod:`bossflow.pretrained`
relies on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["DigitUNet", "DigitClassifier", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_frequency: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of times in [0, 1].

    Frequencies are spaced geometrically from 1 to ``max_frequency`` (radians per unit time), so
    both the coarse position in [0, 1] and differences of ~1e-3 are resolved.

    Args:
        t: times, shape (B,).
        dim: embedding size (even).
        max_frequency: highest angular frequency.

    Returns:
        Tensor of shape (B, dim), ``[sin(w_k t), cos(w_k t)]`` for ``k < dim / 2``, in ``t``'s
        dtype.
    """
    if dim % 2:
        raise ValueError(f"the embedding size must be even, got {dim}")
    half = dim // 2
    exponents = torch.linspace(0.0, 1.0, half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(exponents * math.log(max_frequency))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).to(t.dtype)


def _groups(channels: int, max_groups: int) -> int:
    """Largest divisor of ``channels`` that is at most ``max_groups`` (for GroupNorm)."""
    return math.gcd(channels, max_groups)


class ResBlock(nn.Module):
    """Pre-activation residual block with a time-conditioned scale and shift (FiLM).

    ``h = conv(SiLU(GN(x))); h = GN(h) * (1 + scale(t)) + shift(t); out = skip(x) + conv(SiLU(h))``.
    The second convolution starts at zero, so each block starts as the identity (or its 1x1 skip).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        time_dim: size of the time embedding fed to every block.
        groups: maximum number of GroupNorm groups.
        dropout: dropout probability before the second convolution.
    """

    def __init__(
        self, in_channels: int, out_channels: int, time_dim: int, groups: int, dropout: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels, groups), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(time_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels, groups), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: features, shape (B, in_channels, H, W).
            emb: time embedding after the MLP, shape (B, time_dim).

        Returns:
            Tensor of shape (B, out_channels, H, W).
        """
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class DigitUNet(nn.Module):
    """A small UNet velocity field ``v(x, t)`` with one down/up level.

    The second level has size ceil(H/2) x ceil(W/2).

    Layout, with ``c = base`` and ``n = num_res_blocks``::

        conv_in (C -> c)
        n x ResBlock at full resolution (c), each output kept as a skip
        stride-2 conv (c)                      8x8 -> 4x4, 28x28 -> 14x14
        n x ResBlock at half resolution (2c), skips kept
        2 x ResBlock in the middle (2c)
        n + 1 x ResBlock at half resolution, each fed [h, skip] (last skip = the downsampled map)
        nearest upsample to the skip's size + conv
        n + 1 x ResBlock at full resolution, fed [h, skip]
        GroupNorm, SiLU, conv_out (c -> C, zero-initialised, so v = 0 at initialisation)

    Every block receives ``MLP(sinusoidal(t))``, plus ``E[y]`` for a class-conditional model
    (``num_classes > 0``): ``E`` has ``num_classes + 1`` rows, the last for the null label
    ``y = num_classes`` ("no class"), which training with label dropout teaches to be the
    unconditional field, so ``bossflow.field.Guided`` can do classifier-free guidance. Odd sizes
    work because the upsampling goes to the exact size of the skip it is joined with.

    Args:
        in_channels: image channels ``C``.
        base: channels at full resolution; twice that at half resolution.
        num_res_blocks: residual blocks per level on the way down.
        time_dim: size of the sinusoidal embedding; the MLP maps it to ``4 * base``.
        groups: maximum number of GroupNorm groups.
        dropout: dropout inside residual blocks.
        num_classes: number of classes of a class-conditional model; 0 (the default) is the
            unconditional model, unchanged (same parameters, same initialisation, same outputs).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base: int = 32,
        num_res_blocks: int = 1,
        time_dim: int = 64,
        groups: int = 8,
        dropout: float = 0.0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "base": base,
            "num_res_blocks": num_res_blocks,
            "time_dim": time_dim,
            "groups": groups,
            "dropout": dropout,
        }
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ConfigError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        if num_classes:
            # Only a conditional model records it, so an unconditional one's config (and JSON) is
            # exactly what it was before conditioning existed.
            self.config["num_classes"] = num_classes
        self.num_classes = num_classes
        c, c2, emb_dim = base, 2 * base, 4 * base
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        def block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, groups, dropout)

        self.conv_in = nn.Conv2d(in_channels, c, 3, padding=1)
        self.down0 = nn.ModuleList([block(c, c) for _ in range(num_res_blocks)])
        self.downsample = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.down1 = nn.ModuleList([block(c if i == 0 else c2, c2) for i in range(num_res_blocks)])
        self.mid = nn.ModuleList([block(c2, c2), block(c2, c2)])
        # Skips at half resolution in the order they are pushed (downsampled map, then n blocks);
        # they are popped in reverse.
        skips1 = [c] + [c2] * num_res_blocks
        self.up1 = nn.ModuleList([block(c2 + s, c2) for s in reversed(skips1)])
        self.upsample_conv = nn.Conv2d(c2, c2, 3, padding=1)
        # Full resolution skips: conv_in output, then n block outputs.
        skips0 = [c] * (num_res_blocks + 1)
        self.up0 = nn.ModuleList(
            [block((c2 if i == 0 else c) + s, c) for i, s in enumerate(skips0)]
        )
        self.norm_out = nn.GroupNorm(_groups(c, groups), c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        # Created last, so every other layer draws the same initial weights as in an
        # unconditional model of the same seed (and an unconditional model draws nothing more).
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

    @property
    def null_label(self) -> int | None:
        """The label index meaning "no class" (``num_classes``); ``None`` if unconditional."""
        return self.num_classes if self.num_classes else None

    def _label_embedding(self, class_labels: Tensor | None, batch: int) -> Tensor | None:
        """``E[class_labels]`` (B, 4 * base) after checking the labels; ``None`` if unconditional."""
        if self.label_emb is None:
            if class_labels is not None:
                raise ConfigError(
                    "this DigitUNet is unconditional (num_classes=0) and takes no class_labels: "
                    "drop the conditioning (cond= / --cond), or load the class-conditional model "
                    "(digits-cond)"
                )
            return None
        if class_labels is None:
            raise ConfigError(
                f"this DigitUNet is class-conditional ({self.num_classes} classes) and needs "
                f'labels: pass cond={{"class_labels": labels}} with labels of shape (B,), int64 '
                f"in 0..{self.num_classes} ({self.num_classes} = the null label, unconditional)"
            )
        if not isinstance(class_labels, Tensor) or class_labels.shape != (batch,):
            raise ConfigError(
                f"class_labels must be a tensor of shape ({batch},), got "
                f"{tuple(getattr(class_labels, 'shape', ())) or type(class_labels).__name__}"
            )
        if (
            class_labels.is_floating_point()
            or class_labels.is_complex()
            or class_labels.dtype == torch.bool
        ):
            raise ConfigError(f"class_labels must be integers (int64), got {class_labels.dtype}")
        # a CPU-GPU sync point on GPU; cheap next to a forward pass of this model
        if batch and (int(class_labels.min()) < 0 or int(class_labels.max()) > self.num_classes):
            raise ConfigError(
                f"class_labels must lie in 0..{self.num_classes} ({self.num_classes} = the null "
                f"label), got values from {int(class_labels.min())} to {int(class_labels.max())}"
            )
        return self.label_emb(class_labels.long())

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Velocity ``v(x, t)`` (``v(x, t, class_labels=y)`` for a class-conditional model).

        Args:
            x: states, shape (B, C, H, W).
            t: times in [0, 1], shape (B,) (noise at 0, data at 1).
            class_labels: (B,) integer labels in ``0 .. num_classes`` (``num_classes`` = the null
                label, the unconditional field); required if and only if ``num_classes > 0``.

        Returns:
            Tensor shaped like ``x`` (same dtype): the predicted ``dx/dt``.

        Raises:
            ConfigError: wrong shapes; labels missing for a conditional model, given to an
                unconditional one, not integers or out of range.
        """
        if x.ndim != 4 or t.shape != (x.shape[0],):
            raise ConfigError(
                f"DigitUNet expects x of shape (B, C, H, W) and t of shape (B,), got "
                f"{tuple(x.shape)} and {tuple(t.shape)}"
            )
        labels = self._label_embedding(class_labels, x.shape[0])
        # the embedding is computed in float32 at least, then cast to the network's dtype
        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(x.dtype))
        if labels is not None:
            emb = emb + labels.to(emb.dtype)

        h = self.conv_in(x)
        skips0 = [h]
        for blk in self.down0:
            h = blk(h, emb)
            skips0.append(h)
        h = self.downsample(h)
        skips1 = [h]
        for blk in self.down1:
            h = blk(h, emb)
            skips1.append(h)
        for blk in self.mid:
            h = blk(h, emb)
        for blk in self.up1:
            h = blk(torch.cat([h, skips1.pop()], dim=1), emb)
        h = F.interpolate(h, size=skips0[-1].shape[-2:], mode="nearest")
        h = self.upsample_conv(h)
        for blk in self.up0:
            h = blk(torch.cat([h, skips0.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class DigitClassifier(nn.Module):
    """A small convolutional digit classifier on images in [-1, 1] of any size >= 4 x 4.

    ``conv(C -> w) -> conv(w -> w) -> stride-2 conv(w -> 2w) -> conv(2w -> 2w) -> global average
    pool -> Linear(2w -> feature_dim) -> SiLU`` gives :meth:`features`; a final ``Linear(feature_dim
    -> num_classes)`` gives the logits. Each convolution is followed by GroupNorm and SiLU.

    Args:
        in_channels: image channels ``C``.
        width: channels of the first convolutions (``w``).
        feature_dim: size of the penultimate feature vector.
        num_classes: number of classes.
        groups: maximum number of GroupNorm groups.
        dropout: dropout on the features before the last layer (training only).
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 32,
        feature_dim: int = 64,
        num_classes: int = 10,
        groups: int = 8,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "width": width,
            "feature_dim": feature_dim,
            "num_classes": num_classes,
            "groups": groups,
            "dropout": dropout,
        }

        def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                nn.GroupNorm(_groups(cout, groups), cout),
                nn.SiLU(),
            )

        w = width
        self.body = nn.Sequential(
            conv(in_channels, w), conv(w, w), conv(w, 2 * w, stride=2), conv(2 * w, 2 * w)
        )
        self.project = nn.Linear(2 * w, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features, used for the Fréchet distance.

        Args:
            x: images in [-1, 1], shape (B, C, H, W).

        Returns:
            Tensor of shape (B, feature_dim).
        """
        h = self.body(x).mean(dim=(-2, -1))
        return F.silu(self.project(h))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits.

        Args:
            x: images in [-1, 1], shape (B, C, H, W).

        Returns:
            Tensor of shape (B, num_classes): unnormalised log-probabilities.
        """
        return self.head(self.dropout(self.features(x)))
