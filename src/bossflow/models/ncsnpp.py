"""NCSN++ / DDPM++: the velocity network of the official Rectified Flow checkpoints, in pure PyTorch.

This is the score network of Song et al., "Score-Based Generative Modeling through Stochastic
Differential Equations" (ICLR 2021), as used unchanged by Liu et al., "Flow Straight and Fast"
(ICLR 2023) in gnobitab/RectifiedFlow (``ImageGeneration/models/ncsnpp.py``, commit 5a1fd4d).
It is a U-Net of residual blocks conditioned on a time embedding, with optional self-attention,
FIR (finite impulse response) resampling and multi-scale "progressive" input/output paths.

Module names and registration order reproduce the original exactly, so its ``state_dict`` keys
(``sigmas``, ``all_modules.<i>.<layer>.<param>``) load without renaming. The network is called as the
original code calls it, ``network(x, time_cond)`` with ``time_cond = 999 * s`` and ``s`` the upstream
time in [eps, 1]; :class:`bossflow.field.RectifiedFlowField` maps bossflow's time onto that.

Differences from the original, none of which changes a released model's output:

* FIR resampling (``upfirdn2d``) is a plain convolution, on every device (the original compiles a
  CUDA extension and uses an equivalent PyTorch fallback on CPU).
* Which levels have attention is fixed when the network is built from ``image_size``; the original
  decides it per call from the feature-map width, which agrees for inputs of the configured size.
* The fused "upsample + 3x3 convolution" of ``fir=True`` DDPM-style blocks follows StyleGAN2; the
  original code for it indexes a tensor with a negative step and cannot run in PyTorch. No released
  config uses it.
* With ``embedding_type="positional"`` the ``sigmas`` lookup is done only when ``scale_by_sigma``
  uses it, and its result is cast to the output's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = [
    "NCSNppConfig",
    "NCSNpp",
    "GaussianFourierProjection",
    "positional_embedding",
    "upfirdn2d",
    "fir_kernel",
    "upsample_2d",
    "downsample_2d",
    "naive_upsample_2d",
    "naive_downsample_2d",
    "upsample_conv_2d",
    "conv_downsample_2d",
]

RESBLOCK_TYPES = ("biggan", "ddpm")
PROGRESSIVE_OUTPUT = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
COMBINE_METHODS = ("sum", "cat")
EMBEDDING_TYPES = ("positional", "fourier")
NONLINEARITIES = ("swish", "elu", "relu", "lrelu")


def _choice(field_name: str, value: object, valid: Sequence[str]) -> str:
    name = str(value).lower()
    if name not in valid:
        raise ConfigError(
            f"{field_name}={value!r} is not supported; valid values: {', '.join(valid)}"
        )
    return name


@dataclass(frozen=True)
class NCSNppConfig:
    """Everything that defines an NCSN++ network: its layers, its forward pass and its data.

    The defaults are the CIFAR-10 DDPM++ model of Rectified Flow. Field names follow the original
    config (sections ``model`` and ``data``); :func:`bossflow.models.rectified_flow_config` reads
    that layout. String options are case-insensitive and stored in lower case.

    Attributes:
        image_size: height and width of the samples, divisible by ``2 ** (len(ch_mult) - 1)``.
        num_channels: channels of the samples (3 for RGB).
        centered: True if the data lives in [-1, 1]; False if in [0, 1], in which case the network
            maps its input ``x -> 2x - 1`` itself.
        nf: base channel count; level ``i`` has ``nf * ch_mult[i]`` channels.
        ch_mult: channel multiplier per resolution level (one level per entry).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: feature-map widths that get a self-attention block.
        dropout: dropout probability inside residual blocks (active in training mode only).
        resamp_with_conv: whether DDPM-style up/down-sampling layers have a convolution.
        conditional: whether the time embedding feeds the residual blocks.
        fir: resample with the FIR filter ``fir_kernel`` instead of nearest/average pooling.
        fir_kernel: 1-D FIR taps, applied separably and normalised to unit gain.
        skip_rescale: divide residual and attention sums by sqrt(2).
        resblock_type: ``"biggan"`` (blocks that resample themselves) or ``"ddpm"``.
        progressive: output path: ``"none"``, ``"output_skip"`` or ``"residual"``.
        progressive_input: input path: ``"none"``, ``"input_skip"`` or ``"residual"``.
        progressive_combine: how ``input_skip`` merges the input pyramid: ``"sum"`` or ``"cat"``.
        embedding_type: ``"positional"`` (sinusoidal in ``time_cond``) or ``"fourier"`` (Gaussian
            Fourier features of ``log(time_cond)``).
        fourier_scale: standard deviation of the frozen Fourier frequencies at initialisation.
        scale_by_sigma: divide the output by the noise level (``time_cond`` for Fourier embeddings).
        init_scale: scale of the last layer of each block at initialisation (0 -> 1e-10).
        nonlinearity: ``"swish"`` (SiLU), ``"elu"``, ``"relu"`` or ``"lrelu"`` (slope 0.2).
        sigma_min: smallest noise level of the (unused by Rectified Flow) ``sigmas`` buffer.
        sigma_max: largest noise level of the ``sigmas`` buffer.
        num_scales: length of the ``sigmas`` buffer.
        name: a label for reports (the built-in config's name, or ``"custom"``).
    """

    image_size: int = 32
    num_channels: int = 3
    centered: bool = True
    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.15
    resamp_with_conv: bool = True
    conditional: bool = True
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "none"
    progressive_combine: str = "sum"
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    scale_by_sigma: bool = False
    init_scale: float = 0.0
    nonlinearity: str = "swish"
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000
    name: str = "custom"

    def __post_init__(self) -> None:
        def put(key: str, value: object) -> None:
            object.__setattr__(self, key, value)

        for key in ("image_size", "num_channels", "nf", "num_res_blocks", "num_scales"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
            put(key, int(value))
        for key in ("centered", "resamp_with_conv", "conditional", "fir", "skip_rescale"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if not isinstance(self.scale_by_sigma, bool):
            raise ConfigError(f"scale_by_sigma must be true or false, got {self.scale_by_sigma!r}")
        for key in ("ch_mult", "attn_resolutions", "fir_kernel"):
            value = getattr(self, key)
            try:
                put(key, tuple(int(v) for v in value))
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{key} must be a list of integers, got {value!r}") from err
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError(
                f"ch_mult must be a non-empty list of positive integers: {self.ch_mult}"
            )
        for key in ("dropout", "fourier_scale", "init_scale", "sigma_min", "sigma_max"):
            put(key, float(getattr(self, key)))
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        put("resblock_type", _choice("resblock_type", self.resblock_type, RESBLOCK_TYPES))
        put("progressive", _choice("progressive", self.progressive, PROGRESSIVE_OUTPUT))
        put(
            "progressive_input",
            _choice("progressive_input", self.progressive_input, PROGRESSIVE_INPUT),
        )
        put(
            "progressive_combine",
            _choice("progressive_combine", self.progressive_combine, COMBINE_METHODS),
        )
        put("embedding_type", _choice("embedding_type", self.embedding_type, EMBEDDING_TYPES))
        put("nonlinearity", _choice("nonlinearity", self.nonlinearity, NONLINEARITIES))
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor:
            raise ConfigError(
                f"image_size={self.image_size} must be divisible by 2**(len(ch_mult)-1) = {factor}"
            )

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one sample, ``(C, H, W)``."""
        return (self.num_channels, self.image_size, self.image_size)

    @property
    def data_range(self) -> tuple[float, float]:
        """Range of the data the model generates: (-1, 1) if ``centered`` else (0, 1)."""
        return (-1.0, 1.0) if self.centered else (0.0, 1.0)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map width at each level, from ``image_size`` down."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))

    def replace(self, **changes: object) -> NCSNppConfig:
        """A copy with some fields changed (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = sorted(set(changes) - set(values))
        if unknown:
            raise ConfigError(f"unknown NCSNppConfig fields {unknown}; valid: {sorted(values)}")
        values.update(changes)
        return NCSNppConfig(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Initialisation and small layers
# --------------------------------------------------------------------------------------------------


def _ddpm_init_(weight: Tensor, scale: float = 1.0) -> Tensor:
    """DDPM initialisation in place: uniform variance scaling with fan_avg, ``scale`` 0 -> 1e-10.

    Fans count dimensions 0 and 1 times the receptive field, which is symmetric in the two, so it
    serves both ``[out, in, kh, kw]`` convolution weights and ``[in, out]`` NIN weights.
    """
    scale = 1e-10 if scale == 0 else scale
    receptive = weight.numel() // (weight.shape[0] * weight.shape[1])
    fan_avg = (weight.shape[0] + weight.shape[1]) * receptive / 2
    bound = math.sqrt(3.0 * scale / fan_avg)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def _conv3x3(
    in_ch: int, out_ch: int, *, stride: int = 1, padding: int = 1, init_scale: float = 1.0
) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=padding)
    _ddpm_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _conv1x1(in_ch: int, out_ch: int, *, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=1)
    _ddpm_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _dense(in_features: int, out_features: int) -> nn.Linear:
    linear = nn.Linear(in_features, out_features)
    _ddpm_init_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with ``min(C // 4, 32)`` groups and eps 1e-6, as everywhere in NCSN++."""
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def _activation(name: str) -> nn.Module:
    if name == "swish":
        return nn.SiLU()
    if name == "elu":
        return nn.ELU()
    if name == "relu":
        return nn.ReLU()
    return nn.LeakyReLU(negative_slope=0.2)


class NIN(nn.Module):
    """Per-pixel linear map ("network in network"): a 1x1 convolution with weight stored ``[in, out]``.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        init_scale: initialisation scale (0 -> 1e-10).
    """

    def __init__(self, in_ch: int, out_ch: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(_ddpm_init_(torch.empty(in_ch, out_ch), init_scale))
        self.b = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        """``y[b, o, h, w] = sum_c x[b, c, h, w] W[c, o] + b[o]``; x: (B, in, H, W) -> (B, out, H, W)."""
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection (DDPM style).

    ``out = (x + NIN_3(softmax(q k^T / sqrt(C)) v)) / sqrt(2)`` with ``q, k, v = NIN_{0,1,2}(norm(x))``
    (the division only if ``skip_rescale``).

    Args:
        channels: channels C of the input.
        skip_rescale: divide the residual sum by sqrt(2).
        init_scale: initialisation scale of the output projection.
    """

    def __init__(self, channels: int, skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        b, c, height, width = x.shape
        h = self.GroupNorm_0(x)
        # (B, C, H, W) -> (B, H*W, C): one token per pixel.
        q, k, v = (
            nin(h).flatten(2).transpose(1, 2) for nin in (self.NIN_0, self.NIN_1, self.NIN_2)
        )
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = self.NIN_3(h.transpose(1, 2).reshape(b, c, height, width))
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class GaussianFourierProjection(nn.Module):
    """Gaussian Fourier features ``[sin(2 pi s W), cos(2 pi s W)]`` with frozen frequencies ``W``.

    Args:
        embedding_size: number of frequencies; the output has twice as many features.
        scale: standard deviation of ``W`` at initialisation.
    """

    #: parameters that never train (a parameter, not a buffer, as in the released checkpoints);
    #: straightening keeps them fixed even when the whole module comes in frozen
    fixed_parameters = ("W",)

    def __init__(self, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, s: Tensor) -> Tensor:
        """s: (B,) -> (B, 2 * embedding_size), sine half first."""
        proj = s[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


def positional_embedding(timesteps: Tensor, dim: int, max_positions: int = 10000) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM and Transformers.

    ``emb[:, i] = sin(t f_i)`` and ``emb[:, half + i] = cos(t f_i)`` with
    ``f_i = exp(-i log(max_positions) / (half - 1))``, ``half = dim // 2``; zero-padded if ``dim``
    is odd. Computed in float32, or in the input's dtype if that is wider.

    Args:
        timesteps: shape (B,).
        dim: embedding width (at least 4).
        max_positions: the longest period's scale (10000).

    Returns:
        Tensor of shape (B, dim).
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(timesteps.shape)}")
    half = dim // 2
    dtype = torch.promote_types(timesteps.dtype, torch.float32)
    step = math.log(max_positions) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=timesteps.device) * -step)
    args = timesteps.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


# --------------------------------------------------------------------------------------------------
# Resampling: naive and FIR (StyleGAN2 upfirdn2d)
# --------------------------------------------------------------------------------------------------


def fir_kernel(taps: Sequence[float], gain: float = 1.0) -> Tensor:
    """2-D FIR kernel from 1-D taps: outer product, normalised to sum ``gain``.

    Args:
        taps: 1-D taps (e.g. ``[1, 3, 3, 1]``) or an already 2-D square kernel.
        gain: sum of the returned kernel.

    Returns:
        float32 tensor of shape (K, K).
    """
    k = torch.as_tensor(np.asarray(taps, dtype=np.float32))
    if k.ndim == 1:
        k = torch.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {tuple(k.shape)}")
    return k / k.sum() * gain


def upfirdn2d(
    x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> Tensor:
    """Upsample by zero insertion, pad, convolve with ``kernel`` (a true convolution), downsample.

    Each channel is filtered separately and identically. Per spatial axis of length L the output has
    ``(L * up + pad[0] + pad[1] - K) // down + 1`` entries; pads are zeros (negative pads crop).
    This is StyleGAN2's ``upfirdn2d`` with the same padding on both axes.

    Args:
        x: (B, C, H, W).
        kernel: (K, K) filter.
        up: upsampling factor (a sample then ``up - 1`` zeros).
        down: downsampling factor (keep every ``down``-th output of the convolution).
        pad: zeros added before and after each axis, after upsampling.

    Returns:
        Tensor of shape (B, C, H', W').
    """
    b, c, height, width = x.shape
    out = x.reshape(b * c, 1, height, width)
    if up > 1:
        stuffed = out.new_zeros(b * c, 1, height * up, width * up)
        stuffed[:, :, ::up, ::up] = out
        out = stuffed
    out = F.pad(out, (pad[0], pad[1], pad[0], pad[1]))
    weight = torch.flip(kernel, (0, 1)).to(dtype=out.dtype, device=out.device)[None, None]
    out = F.conv2d(out, weight, stride=down)
    return out.reshape(b, c, out.shape[-2], out.shape[-1])


def upsample_2d(x: Tensor, taps: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> Tensor:
    """FIR upsampling: (B, C, H, W) -> (B, C, H * factor, W * factor).

    A constant image stays constant away from the borders; pixels outside the image count as
    zeros, so the outermost rows/columns are damped (0.75 per axis for ``[1, 3, 3, 1]``).
    """
    kernel = fir_kernel(taps, gain=factor**2)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Tensor, taps: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> Tensor:
    """FIR downsampling: (B, C, H, W) -> (B, C, H // factor, W // factor).

    Per axis, output ``i`` is the taps-weighted mean of inputs ``factor * i - p0`` to
    ``factor * i - p0 + K - 1`` with ``p0 = (K - factor + 1) // 2`` (for ``[1, 3, 3, 1]``: inputs
    ``2i - 1 .. 2i + 2`` weighted 1/8, 3/8, 3/8, 1/8). Inputs outside the image count as zeros, so
    a constant image's border is damped to 7/8 per axis.
    """
    kernel = fir_kernel(taps)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def naive_upsample_2d(x: Tensor, factor: int = 2) -> Tensor:
    """Nearest-neighbour upsampling: (B, C, H, W) -> (B, C, H * factor, W * factor)."""
    return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def naive_downsample_2d(x: Tensor, factor: int = 2) -> Tensor:
    """Average pooling over ``factor x factor`` blocks: (B, C, H, W) -> (B, C, H // f, W // f)."""
    return F.avg_pool2d(x, factor, stride=factor)


def upsample_conv_2d(
    x: Tensor, weight: Tensor, taps: Sequence[float] = (1, 3, 3, 1), factor: int = 2
) -> Tensor:
    """FIR upsampling fused with a convolution (StyleGAN2), padding once.

    Args:
        x: (B, C_in, H, W).
        weight: (C_out, C_in, k, k) with k odd.
        taps: FIR taps.
        factor: upsampling factor.

    Returns:
        Tensor of shape (B, C_out, H * factor, W * factor).
    """
    kernel = fir_kernel(taps, gain=factor**2)
    p = (kernel.shape[0] - factor) - (weight.shape[-1] - 1)
    # A strided transposed convolution is zero insertion followed by a full convolution.
    w = torch.flip(weight, (2, 3)).transpose(0, 1)
    x = F.conv_transpose2d(x, w, stride=factor)
    return upfirdn2d(x, kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(
    x: Tensor, weight: Tensor, taps: Sequence[float] = (1, 3, 3, 1), factor: int = 2
) -> Tensor:
    """A convolution fused with FIR downsampling (StyleGAN2), padding once.

    Args:
        x: (B, C_in, H, W).
        weight: (C_out, C_in, k, k) with k odd.
        taps: FIR taps.
        factor: downsampling factor.

    Returns:
        Tensor of shape (B, C_out, H // factor, W // factor).
    """
    kernel = fir_kernel(taps)
    p = (kernel.shape[0] - factor) + (weight.shape[-1] - 1)
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, weight, stride=factor)


class FIRConv2d(nn.Module):
    """A 3x3 convolution, optionally fused with FIR up- or downsampling (``weight``, ``bias``).

    Args:
        in_ch: input channels.
        out_ch: output channels.
        up: upsample by 2 before the convolution.
        down: downsample by 2 after the convolution.
        taps: FIR taps.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        up: bool = False,
        down: bool = False,
        taps: Sequence[int] = (1, 3, 3, 1),
    ):
        super().__init__()
        if up and down:
            raise ValueError("FIRConv2d resamples one way: up or down, not both")
        self.weight = nn.Parameter(_ddpm_init_(torch.empty(out_ch, in_ch, 3, 3)))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.up, self.down, self.taps = up, down, tuple(taps)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in, H, W) -> (B, out, H', W') with H' = 2H (up), H/2 (down) or H."""
        if self.up:
            x = upsample_conv_2d(x, self.weight, self.taps)
        elif self.down:
            x = conv_downsample_2d(x, self.weight, self.taps)
        else:
            x = F.conv2d(x, self.weight, padding=1)
        return x + self.bias[None, :, None, None]


class Upsample(nn.Module):
    """Upsampling by 2: nearest or FIR, optionally with a 3x3 convolution.

    Args:
        in_ch: input channels.
        out_ch: output channels (default ``in_ch``; only with a convolution).
        with_conv: add a convolution (``Conv_0``, or fused ``Conv2d_0`` with FIR).
        fir: FIR filter instead of nearest-neighbour.
        taps: FIR taps.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None = None,
        *,
        with_conv: bool = False,
        fir: bool = False,
        taps: Sequence[int] = (1, 3, 3, 1),
    ):
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv and fir:
            self.Conv2d_0 = FIRConv2d(in_ch, out_ch, up=True, taps=taps)
        elif with_conv:
            self.Conv_0 = _conv3x3(in_ch, out_ch)
        self.with_conv, self.fir, self.taps = with_conv, fir, tuple(taps)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in, H, W) -> (B, out, 2H, 2W)."""
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else upsample_2d(x, self.taps)
        h = naive_upsample_2d(x)
        return self.Conv_0(h) if self.with_conv else h


class Downsample(nn.Module):
    """Downsampling by 2: average pooling or FIR, optionally with a 3x3 convolution.

    Without FIR the convolution has stride 2 on the input padded by one row and column at the
    bottom and right (the original's asymmetric padding).

    Args:
        in_ch: input channels.
        out_ch: output channels (default ``in_ch``; only with a convolution).
        with_conv: add a convolution (``Conv_0``, or fused ``Conv2d_0`` with FIR).
        fir: FIR filter instead of average pooling.
        taps: FIR taps.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None = None,
        *,
        with_conv: bool = False,
        fir: bool = False,
        taps: Sequence[int] = (1, 3, 3, 1),
    ):
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv and fir:
            self.Conv2d_0 = FIRConv2d(in_ch, out_ch, down=True, taps=taps)
        elif with_conv:
            self.Conv_0 = _conv3x3(in_ch, out_ch, stride=2, padding=0)
        self.with_conv, self.fir, self.taps = with_conv, fir, tuple(taps)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in, H, W) -> (B, out, H/2, W/2)."""
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else downsample_2d(x, self.taps)
        if self.with_conv:
            return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
        return naive_downsample_2d(x)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


class ResnetBlockBigGAN(nn.Module):
    """BigGAN-style residual block that can resample itself (``ResnetBlockBigGANpp``).

    ``h = Conv_1(dropout(act(norm(Conv_0(resample(act(norm(x)))) + Dense_0(act(temb))))))`` and
    ``out = (Conv_2(resample(x)) + h) / sqrt(2)``; ``Conv_2`` (1x1) exists when the channels change
    or the block resamples, the division only with ``skip_rescale``.

    Args:
        in_ch: input channels.
        out_ch: output channels (default ``in_ch``).
        temb_dim: width of the time embedding (``Dense_0`` exists even if it is never passed).
        act: nonlinearity module.
        up: upsample by 2.
        down: downsample by 2.
        dropout: dropout probability.
        fir: FIR resampling instead of nearest / average pooling.
        taps: FIR taps.
        skip_rescale: divide the residual sum by sqrt(2).
        init_scale: initialisation scale of ``Conv_1``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None = None,
        *,
        temb_dim: int,
        act: nn.Module,
        up: bool = False,
        down: bool = False,
        dropout: float = 0.1,
        fir: bool = False,
        taps: Sequence[int] = (1, 3, 3, 1),
        skip_rescale: bool = True,
        init_scale: float = 0.0,
    ):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = _conv3x3(in_ch, out_ch)
        self.Dense_0 = _dense(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv3x3(out_ch, out_ch, init_scale=init_scale)
        self.has_shortcut = in_ch != out_ch or up or down
        if self.has_shortcut:
            self.Conv_2 = _conv1x1(in_ch, out_ch)
        self.act = act
        self.up, self.down, self.fir, self.taps = up, down, fir, tuple(taps)
        self.skip_rescale = skip_rescale

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return upsample_2d(x, self.taps) if self.fir else naive_upsample_2d(x)
        if self.down:
            return downsample_2d(x, self.taps) if self.fir else naive_downsample_2d(x)
        return x

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        """x: (B, in, H, W), temb: (B, temb_dim) or None -> (B, out, H', W')."""
        h = self._resample(self.act(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.has_shortcut:
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class ResnetBlockDDPM(nn.Module):
    """DDPM-style residual block (``ResnetBlockDDPMpp``); resampling is done by separate layers.

    ``out = (NIN_0(x) + h) / sqrt(2)`` with ``h`` as in :class:`ResnetBlockBigGAN` without
    resampling; ``NIN_0`` exists only when the channels change.

    Args:
        in_ch: input channels.
        out_ch: output channels (default ``in_ch``).
        temb_dim: width of the time embedding.
        act: nonlinearity module.
        dropout: dropout probability.
        skip_rescale: divide the residual sum by sqrt(2).
        init_scale: initialisation scale of ``Conv_1``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None = None,
        *,
        temb_dim: int,
        act: nn.Module,
        dropout: float = 0.1,
        skip_rescale: bool = False,
        init_scale: float = 0.0,
    ):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = _conv3x3(in_ch, out_ch)
        self.Dense_0 = _dense(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv3x3(out_ch, out_ch, init_scale=init_scale)
        self.has_shortcut = in_ch != out_ch
        if self.has_shortcut:
            self.NIN_0 = NIN(in_ch, out_ch)
        self.act = act
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        """x: (B, in, H, W), temb: (B, temb_dim) or None -> (B, out, H, W)."""
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.has_shortcut:
            x = self.NIN_0(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class Combine(nn.Module):
    """Merge the input pyramid into the features: ``Conv_0(pyramid) + h`` or concatenation.

    Args:
        pyramid_ch: channels of the pyramid image.
        channels: channels of the features.
        method: ``"sum"`` or ``"cat"`` (pyramid features first).
    """

    def __init__(self, pyramid_ch: int, channels: int, method: str = "sum"):
        super().__init__()
        self.Conv_0 = _conv1x1(pyramid_ch, channels)
        self.method = method

    def forward(self, pyramid: Tensor, h: Tensor) -> Tensor:
        """pyramid: (B, P, H, W), h: (B, C, H, W) -> (B, C, H, W) or (B, 2C, H, W)."""
        p = self.Conv_0(pyramid)
        return torch.cat([p, h], dim=1) if self.method == "cat" else p + h


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ U-Net, state-dict compatible with the Rectified Flow checkpoints.

    Layout (``all_modules`` in this order): [Fourier projection], [2 Linear layers for the time
    embedding], input conv, then per level on the way down ``num_res_blocks`` residual blocks (each
    followed by attention at ``attn_resolutions``) and, except at the last level, a downsampling
    block plus the input-pyramid layer; a middle (block, attention, block); per level on the way up
    ``num_res_blocks + 1`` blocks on the concatenated skip features, attention, the output-pyramid
    layers and an upsampling block; finally norm + conv unless ``progressive == "output_skip"``.

    Args:
        config: the network's settings; see :class:`NCSNppConfig`.
    """

    def __init__(self, config: NCSNppConfig):
        super().__init__()
        self.config = cfg = config
        self.act = act = _activation(cfg.nonlinearity)
        sigmas = np.exp(np.linspace(np.log(cfg.sigma_max), np.log(cfg.sigma_min), cfg.num_scales))
        self.register_buffer("sigmas", torch.tensor(sigmas, dtype=torch.float64))

        nf, channels, taps = cfg.nf, cfg.num_channels, cfg.fir_kernel
        num_levels = len(cfg.ch_mult)
        self.attn_levels = tuple(res in cfg.attn_resolutions for res in cfg.resolutions)
        if cfg.progressive == "output_skip":
            self.pyramid_upsample = Upsample(channels, fir=cfg.fir, taps=taps)
        if cfg.progressive_input == "input_skip":
            self.pyramid_downsample = Downsample(channels, fir=cfg.fir, taps=taps)

        def resblock(in_ch: int, out_ch: int | None = None, **resample: bool) -> nn.Module:
            common = dict(
                temb_dim=4 * nf,
                act=act,
                dropout=cfg.dropout,
                skip_rescale=cfg.skip_rescale,
                init_scale=cfg.init_scale,
            )
            if cfg.resblock_type == "ddpm":
                return ResnetBlockDDPM(in_ch, out_ch, **common)
            return ResnetBlockBigGAN(in_ch, out_ch, fir=cfg.fir, taps=taps, **resample, **common)

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, skip_rescale=cfg.skip_rescale, init_scale=cfg.init_scale)

        modules: list[nn.Module] = []
        if cfg.embedding_type == "fourier":
            modules.append(GaussianFourierProjection(nf, scale=cfg.fourier_scale))
        if cfg.conditional:
            embed_dim = 2 * nf if cfg.embedding_type == "fourier" else nf
            modules += [_dense(embed_dim, 4 * nf), _dense(4 * nf, 4 * nf)]

        modules.append(_conv3x3(channels, nf))
        skip_channels = [nf]
        in_ch, pyramid_ch = nf, channels
        for level in range(num_levels):
            for _ in range(cfg.num_res_blocks):
                out_ch = nf * cfg.ch_mult[level]
                modules.append(resblock(in_ch, out_ch))
                in_ch = out_ch
                if self.attn_levels[level]:
                    modules.append(attention(in_ch))
                skip_channels.append(in_ch)
            if level == num_levels - 1:
                continue
            if cfg.resblock_type == "ddpm":
                modules.append(
                    Downsample(in_ch, with_conv=cfg.resamp_with_conv, fir=cfg.fir, taps=taps)
                )
            else:
                modules.append(resblock(in_ch, down=True))
            if cfg.progressive_input == "input_skip":
                modules.append(Combine(pyramid_ch, in_ch, cfg.progressive_combine))
                if cfg.progressive_combine == "cat":
                    in_ch *= 2
            elif cfg.progressive_input == "residual":
                modules.append(
                    Downsample(pyramid_ch, in_ch, with_conv=True, fir=cfg.fir, taps=taps)
                )
                pyramid_ch = in_ch
            skip_channels.append(in_ch)

        in_ch = skip_channels[-1]
        modules += [resblock(in_ch), attention(in_ch), resblock(in_ch)]

        for level in reversed(range(num_levels)):
            out_ch = nf * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                modules.append(resblock(in_ch + skip_channels.pop(), out_ch))
                in_ch = out_ch
            if self.attn_levels[level]:
                modules.append(attention(in_ch))
            if cfg.progressive == "output_skip":
                modules += [
                    _group_norm(in_ch),
                    _conv3x3(in_ch, channels, init_scale=cfg.init_scale),
                ]
            elif cfg.progressive == "residual" and level == num_levels - 1:
                modules += [_group_norm(in_ch), _conv3x3(in_ch, in_ch)]
                pyramid_ch = in_ch
            elif cfg.progressive == "residual":
                modules.append(Upsample(pyramid_ch, in_ch, with_conv=True, fir=cfg.fir, taps=taps))
                pyramid_ch = in_ch
            if level != 0:
                if cfg.resblock_type == "ddpm":
                    modules.append(
                        Upsample(in_ch, with_conv=cfg.resamp_with_conv, fir=cfg.fir, taps=taps)
                    )
                else:
                    modules.append(resblock(in_ch, up=True))
        assert not skip_channels

        if cfg.progressive != "output_skip":
            modules += [_group_norm(in_ch), _conv3x3(in_ch, channels, init_scale=cfg.init_scale)]
        self.all_modules = nn.ModuleList(modules)

    def _skip_sum(self, a: Tensor, b: Tensor) -> Tensor:
        return (a + b) / math.sqrt(2.0) if self.config.skip_rescale else a + b

    def _time_embedding(self, time_cond: Tensor, mods: Iterator[nn.Module]) -> Tensor | None:
        cfg = self.config
        if cfg.embedding_type == "fourier":
            temb = next(mods)(torch.log(time_cond))
        else:
            temb = positional_embedding(time_cond, cfg.nf)
        if not cfg.conditional:
            return None
        first, second = next(mods), next(mods)
        temb = first(temb.to(first.weight.dtype))
        return second(self.act(temb))

    def forward(self, x: Tensor, time_cond: Tensor) -> Tensor:
        """Velocity at state ``x`` and network time ``time_cond``, exactly as the original is called.

        Args:
            x: (B, C, H, W) ODE state; in [0, 1]-data models (``centered=False``) it is mapped to
                ``2x - 1`` here, after the time embedding.
            time_cond: (B,) or scalar, ``999 * s`` for upstream time ``s`` in [eps, 1]. Must be
                positive for Fourier embeddings (its log is embedded).

        Returns:
            Tensor of shape (B, C, H, W): the velocity, divided by ``time_cond`` (Fourier) or by
            ``sigmas[time_cond]`` (positional) if ``scale_by_sigma``.
        """
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.num_channels:
            raise ConfigError(
                f"x must have shape (B, {cfg.num_channels}, H, W), got {tuple(x.shape)}"
            )
        if time_cond.ndim == 0:
            time_cond = time_cond.expand(x.shape[0])
        mods = iter(self.all_modules)
        temb = self._time_embedding(time_cond, mods)
        if not cfg.centered:
            x = 2 * x - 1.0
        num_levels = len(cfg.ch_mult)

        # Down: keep every block's output for the skip connections.
        pyramid = x
        hs = [next(mods)(x)]
        for level in range(num_levels):
            for _ in range(cfg.num_res_blocks):
                h = next(mods)(hs[-1], temb)
                if self.attn_levels[level]:
                    h = next(mods)(h)
                hs.append(h)
            if level == num_levels - 1:
                continue
            down = next(mods)
            h = down(hs[-1]) if cfg.resblock_type == "ddpm" else down(hs[-1], temb)
            if cfg.progressive_input == "input_skip":
                pyramid = self.pyramid_downsample(pyramid)
                h = next(mods)(pyramid, h)
            elif cfg.progressive_input == "residual":
                pyramid = self._skip_sum(next(mods)(pyramid), h)
                h = pyramid
            hs.append(h)

        h = next(mods)(hs[-1], temb)
        h = next(mods)(h)
        h = next(mods)(h, temb)

        # Up: consume the skips in reverse; the output pyramid accumulates an image per level.
        out_pyramid: Tensor | None = None
        for level in reversed(range(num_levels)):
            for _ in range(cfg.num_res_blocks + 1):
                h = next(mods)(torch.cat([h, hs.pop()], dim=1), temb)
            if self.attn_levels[level]:
                h = next(mods)(h)
            if cfg.progressive == "output_skip":
                norm, conv = next(mods), next(mods)
                image = conv(self.act(norm(h)))
                if out_pyramid is None:
                    out_pyramid = image
                else:
                    out_pyramid = self.pyramid_upsample(out_pyramid) + image
            elif cfg.progressive == "residual" and out_pyramid is None:
                norm, conv = next(mods), next(mods)
                out_pyramid = conv(self.act(norm(h)))
            elif cfg.progressive == "residual":
                out_pyramid = self._skip_sum(next(mods)(out_pyramid), h)
                h = out_pyramid
            if level != 0:
                up = next(mods)
                h = up(h) if cfg.resblock_type == "ddpm" else up(h, temb)

        if cfg.progressive == "output_skip":
            assert out_pyramid is not None
            h = out_pyramid
        else:
            norm, conv = next(mods), next(mods)
            h = conv(self.act(norm(h)))
        assert next(mods, None) is None, "forward pass and module list are out of step"

        if cfg.scale_by_sigma:
            # Fourier models are conditioned on the noise level itself; positional ones index it.
            fourier = cfg.embedding_type == "fourier"
            sigma = time_cond if fourier else self.sigmas[time_cond.long()]
            h = h / sigma.to(h.dtype).reshape(-1, 1, 1, 1)
        return h
