"""NCSN++ / DDPM++ and the Rectified Flow checkpoint loader.

Parity is checked against the fixtures in ``tests/fixtures/rectified_flow`` (a copy of the
project's shared fixtures, made by running the original code): state-dict layouts of the five released configs, and outputs of a tiny checkpoint.
The 256x256 options (FIR resampling, Fourier embedding, progressive paths, scale_by_sigma,
uncentered data) are checked against hand-computed values on small inputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bossflow.errors import CheckpointError, ConfigError
from bossflow.models import RF_CONFIGS, NCSNpp, NCSNppConfig, load_rectified_flow
from bossflow.models import rectified_flow_config as rf_config
from bossflow.models.ncsnpp import (
    GaussianFourierProjection,
    conv_downsample_2d,
    downsample_2d,
    positional_embedding,
    upsample_2d,
    upsample_conv_2d,
)

# A copy of the shared reference fixtures, kept in the repository so a clone anywhere runs them.
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rectified_flow"
TINY_CKPT = FIXTURES / "tiny_cifar_like_checkpoint.pth"
MANIFESTS = {
    "cifar10": "manifest_cifar10.json",
    "celeba_hq": "manifest_celeba_hq_256.json",
    "church": "manifest_church_256.json",
    "bedroom": "manifest_bedroom_256.json",
    "afhq_cat": "manifest_afhq_cat_256.json",
}
# Our class name -> the original's, for comparing module lists.
ORIGINAL_TYPE = {
    "ResnetBlockBigGAN": "ResnetBlockBigGANpp",
    "ResnetBlockDDPM": "ResnetBlockDDPMpp",
    "AttentionBlock": "AttnBlockpp",
}


def tiny_config() -> dict:
    return json.loads((FIXTURES / "tiny_cifar_like.json").read_text())["config"]


def tiny_io() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(FIXTURES / "tiny_cifar_like_io.safetensors")


def small_256_config(**changes) -> NCSNppConfig:
    """The 256x256 NCSN++ architecture shrunk to run in milliseconds."""
    base = rf_config("church").replace(
        nf=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=16
    )
    return base.replace(**changes)


def randomize_(net: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights so that no layer is (near) zero, as in the fixture."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.05
            p.copy_(noise + 1.0 if "GroupNorm" in name and name.endswith("weight") else noise)
    return net.eval()


# --------------------------------------------------------------------------------------------------
# Layouts of the released configs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_builtin_config_matches_manifest(name):
    manifest = json.loads((FIXTURES / MANIFESTS[name]).read_text())
    assert dict(RF_CONFIGS[name]["model"]) == manifest["config"]["model"]
    assert dict(RF_CONFIGS[name]["data"]) == manifest["config"]["data"]

    with torch.device("meta"):
        net = NCSNpp(rf_config(name))
    state = net.state_dict()
    assert [f"module.{k}" for k in state] == [e["key"] for e in manifest["state_dict"]]
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    buffers = {n for n, _ in net.named_buffers()}
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    for entry in manifest["state_dict"]:
        key = entry["key"].removeprefix("module.")
        assert list(state[key].shape) == entry["shape"], key
        assert str(state[key].dtype).removeprefix("torch.") == entry["dtype"], key
        kind = "buffer" if key in buffers else "frozen_parameter" if key in frozen else "parameter"
        assert kind == entry["kind"], key
        ema_index = trainable.index(key) if kind == "parameter" else None
        assert ema_index == entry["ema_index"], key

    params = list(net.parameters())
    assert sum(p.numel() for p in params) == manifest["param_count_total"]
    assert sum(p.numel() for p in params if p.requires_grad) == manifest["param_count_trainable"]
    assert len(trainable) == manifest["num_ema_shadow_params"]
    types = [ORIGINAL_TYPE.get(type(m).__name__, type(m).__name__) for m in net.all_modules]
    assert types == [m["type"] for m in manifest["all_modules"]]
    norms = {n: m for n, m in net.named_modules() if isinstance(m, nn.GroupNorm)}
    assert len(norms) == len(manifest["group_norms"])
    for key, expected in manifest["group_norms"].items():
        norm = norms[key.removeprefix("module.")]
        assert (norm.num_groups, norm.num_channels, norm.eps) == (
            expected["num_groups"],
            expected["num_channels"],
            expected["eps"],
        )


def test_builtin_configs_data_conventions():
    assert rf_config("cifar10").sample_shape == (3, 32, 32)
    assert rf_config("church").sample_shape == (3, 256, 256)
    assert rf_config("church").data_range == (0.0, 1.0)
    assert rf_config("bedroom").centered is False
    assert rf_config("afhq_cat").data_range == (-1.0, 1.0)


# --------------------------------------------------------------------------------------------------
# The tiny checkpoint: strict load and output parity
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_tiny_checkpoint_reproduces_reference_outputs(weights):
    io = tiny_io()
    field = load_rectified_flow(TINY_CKPT, tiny_config(), weights=weights)
    assert field.sample_shape == (3, 16, 16)
    assert field.centered is True and field.weights == weights
    assert not field.network.training
    with torch.no_grad():
        out = field.network(io["x"], io["time_cond"])
    torch.testing.assert_close(out, io[f"out_{weights}"], rtol=1e-4, atol=1e-5)

    # bossflow time s is fed as upstream time eps + (1 - eps) s; the velocity is the network's
    # own, as the original Euler sampler steps with it
    eps = 1e-3
    s = (io["t"] - eps) / (1 - eps)
    with torch.no_grad():
        v = field(io["x"], s)
    torch.testing.assert_close(v, io[f"out_{weights}"], rtol=1e-4, atol=1e-4)


def test_loads_dicts_bare_state_dicts_and_resaved_files(tmp_path):
    io = tiny_io()
    ckpt = torch.load(TINY_CKPT, weights_only=False)  # the test's own fixture: trusted
    field = load_rectified_flow(ckpt, tiny_config(), weights="model")
    bare = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    field_bare = load_rectified_flow(bare, tiny_config(), weights="model")
    # Saved again here, the numpy lr scalar is spelled numpy._core... under numpy 2.
    torch.save(ckpt, tmp_path / "resaved.pth")
    field_resaved = load_rectified_flow(tmp_path / "resaved.pth", tiny_config(), weights="model")
    with torch.no_grad():
        for f in (field, field_bare, field_resaved):
            out = f.network(io["x"], io["time_cond"])
            torch.testing.assert_close(out, io["out_model"], rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointError, match="weights='model'"):
        load_rectified_flow(bare, tiny_config(), weights="ema")


# --------------------------------------------------------------------------------------------------
# Strictness and safety
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt() -> dict:
    return torch.load(TINY_CKPT, weights_only=False)


def _edited(ckpt: dict, **model_edits) -> dict:
    model = dict(ckpt["model"])
    for key, value in model_edits.items():
        if value is None:
            del model[key]
        else:
            model[key] = value
    return {**ckpt, "model": model}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"module.all_modules.3.Conv_0.weight": None}, "missing keys: module.all_modules.3.Conv_0"),
        (
            {"module.all_modules.99.weight": torch.zeros(3)},
            "unexpected keys: module.all_modules.99",
        ),
        (
            {"module.all_modules.3.Conv_0.bias": torch.zeros(7)},
            r"wrong shapes: module.all_modules.3.Conv_0.bias \(7,\)",
        ),
    ],
)
def test_mismatched_checkpoint_names_the_key(tiny_ckpt, tmp_path, edit, message):
    edited = _edited(tiny_ckpt, **edit)
    for weights in ("model", "ema"):
        with pytest.raises(CheckpointError, match=message):
            load_rectified_flow(edited, tiny_config(), weights=weights)
    path = tmp_path / "edited.pth"
    torch.save(edited, path)
    with pytest.raises(CheckpointError, match=message):
        load_rectified_flow(path, tiny_config())


def test_mismatched_ema_is_reported(tiny_ckpt):
    shadow = list(tiny_ckpt["ema"]["shadow_params"])
    short = {**tiny_ckpt, "ema": {**tiny_ckpt["ema"], "shadow_params": shadow[:-1]}}
    with pytest.raises(CheckpointError, match="153 tensors but the network has 154"):
        load_rectified_flow(short, tiny_config())
    bad = {**tiny_ckpt, "ema": {**tiny_ckpt["ema"], "shadow_params": [shadow[1], *shadow[1:]]}}
    with pytest.raises(CheckpointError, match=r"shadow_params\[0\] -> module.all_modules.0.weight"):
        load_rectified_flow(bad, tiny_config())
    # The model weights alone are still loadable.
    load_rectified_flow(short, tiny_config(), weights="model")


def test_wrong_config_for_checkpoint(tiny_ckpt):
    with pytest.raises(CheckpointError, match="missing keys"):
        load_rectified_flow(tiny_ckpt, "church", weights="model")


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n" * 20)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_rectified_flow(text, "cifar10")
    with pytest.raises(CheckpointError, match="not found"):
        load_rectified_flow(tmp_path / "absent.pth", "cifar10")
    if TINY_CKPT.is_file():
        truncated = tmp_path / "truncated.pth"
        data = TINY_CKPT.read_bytes()
        truncated.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_rectified_flow(truncated, "cifar10")
    torch.save({"step": 3, "other": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a Rectified Flow checkpoint"):
        load_rectified_flow(tmp_path / "other.pth", "cifar10", weights="model")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_rectified_flow(tmp_path / "list.pth", "cifar10")


EXECUTED: list[str] = []


def _record_execution(tag: str) -> None:
    EXECUTED.append(tag)


class _Payload:
    """Unpickling this calls ``_record_execution``: stands in for arbitrary code."""

    def __reduce__(self):
        return (_record_execution, ("unpickled",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "payload.pth"
    torch.save({"model": {}, "ema": {"shadow_params": []}, "extra": _Payload()}, path)
    with pytest.raises(CheckpointError, match="was refused.*blocked global: .*_record_execution"):
        load_rectified_flow(path, "cifar10")
    assert EXECUTED == []


def test_invalid_weights_option():
    with pytest.raises(ConfigError, match="'ema', 'model'"):
        load_rectified_flow({}, "cifar10", weights="best")


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def test_config_errors_list_valid_names_and_keys(tmp_path):
    with pytest.raises(ConfigError, match="cifar10, celeba_hq, church, bedroom, afhq_cat"):
        rf_config("imagenet")
    raw = json.loads(json.dumps(RF_CONFIGS["cifar10"]))
    del raw["model"]["nf"]
    raw["model"]["nff"] = 128
    with pytest.raises(
        ConfigError, match=r"missing required keys \['nf'\]; unknown keys \['nff'\]"
    ):
        rf_config(raw)
    with pytest.raises(ConfigError, match="sections 'model' and 'data'"):
        rf_config({"model": RF_CONFIGS["cifar10"]["model"]})
    raw = json.loads(json.dumps(RF_CONFIGS["cifar10"]))
    raw["model"]["progressive"] = "sideways"
    with pytest.raises(ConfigError, match="none, output_skip, residual"):
        rf_config(raw)
    raw["model"]["progressive"] = "none"
    raw["model"]["name"] = "ddpm"
    with pytest.raises(ConfigError, match="ncsnpp"):
        rf_config(raw)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        rf_config(bad_json)


def test_config_from_json_file(tmp_path):
    path = tmp_path / "lsun_church.json"
    raw = json.loads(json.dumps(RF_CONFIGS["church"]))
    raw["training"] = {"sde": "rectified_flow"}
    path.write_text(json.dumps(raw))
    cfg = rf_config(path)
    assert cfg.replace(name="church") == rf_config("church")
    assert rf_config(str(path)).name == "lsun_church"


# --------------------------------------------------------------------------------------------------
# The 256x256 options, against hand-computed values
# --------------------------------------------------------------------------------------------------


def test_fir_resampling_of_a_constant_image():
    x = torch.ones(1, 2, 8, 8)
    up = upsample_2d(x, (1, 3, 3, 1))
    assert up.shape == (1, 2, 16, 16)
    # Outside the image counts as zero: per axis the outermost samples get 3/4 of the value.
    edge = torch.ones(16)
    edge[0] = edge[-1] = 0.75
    torch.testing.assert_close(up, torch.outer(edge, edge).expand_as(up))
    down = downsample_2d(x, (1, 3, 3, 1))
    assert down.shape == (1, 2, 4, 4)
    edge = torch.tensor([7 / 8, 1.0, 1.0, 7 / 8])  # the first and last taps fall outside
    torch.testing.assert_close(down, torch.outer(edge, edge).expand_as(down))


def test_fir_downsample_known_values():
    rows = torch.arange(8.0)[:, None].expand(8, 8)  # x[i, j] = i
    down = downsample_2d(rows[None, None], (1, 3, 3, 1))[0, 0]
    # Output row r weighs input rows 2r-1 .. 2r+2 by (1, 3, 3, 1) / 8, zero outside.
    row_values = torch.tensor([(0 + 0 + 3 * 1 + 2) / 8, 2.5, 4.5, (5 + 18 + 21 + 0) / 8])
    col_gain = torch.tensor([7 / 8, 1.0, 1.0, 7 / 8])
    torch.testing.assert_close(down, torch.outer(row_values, col_gain))


def test_fused_fir_convolutions_with_identity_weight():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    delta = torch.zeros(3, 3, 3, 3)
    for c in range(3):
        delta[c, c, 1, 1] = 1.0
    torch.testing.assert_close(upsample_conv_2d(x, delta), upsample_2d(x))
    torch.testing.assert_close(conv_downsample_2d(x, delta), downsample_2d(x))


def test_gaussian_fourier_embedding_values():
    proj = GaussianFourierProjection(embedding_size=3)
    with torch.no_grad():
        proj.W.copy_(torch.tensor([0.5, -1.0, 2.0]))
    assert not proj.W.requires_grad
    out = proj(torch.tensor([0.25, 1.0]))
    r = math.sqrt(0.5)
    # [sin(2 pi s W), cos(2 pi s W)]: angles pi/4, -pi/2, pi at s = 1/4 and pi, -2pi, 4pi at s = 1.
    expected = torch.tensor([[r, -1.0, 0.0, r, 0.0, -1.0], [0.0, 0.0, 0.0, -1.0, 1.0, 1.0]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_network_embeds_log_time_for_fourier():
    net = randomize_(NCSNpp(small_256_config()))
    seen = []
    net.all_modules[0].register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    time_cond = torch.tensor([1.0, 500.0])
    net(torch.randn(2, 3, 16, 16), time_cond)
    torch.testing.assert_close(seen[0], torch.log(time_cond))


def test_positional_embedding_values():
    t = torch.tensor([0.0, 1.0, 2.5])
    out = positional_embedding(t, 8)
    freqs = [10000 ** (-i / 3) for i in range(4)]  # exp(-i log(10000) / (half - 1)), half = 4
    expected = torch.tensor(
        [[math.sin(s * f) for f in freqs] + [math.cos(s * f) for f in freqs] for s in t.tolist()]
    )
    torch.testing.assert_close(out, expected)
    assert positional_embedding(t, 9)[:, -1].eq(0).all()  # odd width: zero padded


def test_scale_by_sigma_divides_by_time_cond():
    cfg = small_256_config()
    scaled = randomize_(NCSNpp(cfg))
    plain = NCSNpp(cfg.replace(scale_by_sigma=False)).eval()
    plain.load_state_dict(scaled.state_dict())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    time_cond = torch.tensor([3.0, 998.0])
    with torch.no_grad():
        torch.testing.assert_close(
            scaled(x, time_cond) * time_cond[:, None, None, None], plain(x, time_cond)
        )


def test_uncentered_input_is_mapped_to_minus_one_one():
    cfg = small_256_config(centered=False)  # the input pyramid sees the mapped input too
    uncentered = randomize_(NCSNpp(cfg))
    centered = NCSNpp(cfg.replace(centered=True)).eval()
    centered.load_state_dict(uncentered.state_dict())
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    time_cond = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(uncentered(x, time_cond), centered(2 * x - 1, time_cond))


@pytest.mark.parametrize(
    "changes",
    [
        {},  # output_skip + input_skip + sum, FIR, Fourier: the 256x256 release
        {"progressive": "residual", "progressive_input": "residual"},
        {"progressive_combine": "cat"},
        {"fir": False, "embedding_type": "positional", "scale_by_sigma": False},
        {"resblock_type": "ddpm"},
        {"resblock_type": "ddpm", "fir": False, "progressive": "none", "conditional": False},
    ],
    ids=["release", "residual", "cat", "naive", "ddpm-fir", "ddpm-naive-unconditional"],
)
def test_progressive_variants_run(changes):
    net = randomize_(NCSNpp(small_256_config(**changes)))
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    out = net(x, torch.tensor([1.0, 250.0, 999.0]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    out.sum().backward()  # every trainable parameter takes part
    unused = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    if changes.get("conditional", True):
        assert unused == []
    else:
        assert all(".Dense_0." in n for n in unused)  # kept for state-dict parity, as originally


# --------------------------------------------------------------------------------------------------
# The full CIFAR-10 network
# --------------------------------------------------------------------------------------------------


def test_full_cifar10_network_forward():
    net = NCSNpp(rf_config("cifar10")).eval()
    assert sum(p.numel() for p in net.parameters()) == 61_804_419
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = net(x, torch.tensor([0.999, 998.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()
