"""LoRA straightening exports that peft and diffusers load; merged weights without prefixes.

Tiny random-weight diffusers models (no downloads), straightened with per-sample conditioning
(``cond=``: a class label per noise, a prompt embedding per noise). A LoRA run's adapter, saved by
``save_straightened``, must reproduce the straightened network through
``PeftModel.from_pretrained``, ``load_lora_adapter`` and a pipeline's ``load_lora_weights``; the
merged file must load strictly into the bare network.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bossflow import sample
from bossflow.errors import ConfigError
from bossflow.field import DiffusersField, RectifiedFlowField
from bossflow.noise import NoiseSource
from bossflow.schedule import uniform
from bossflow.spec import LoadedModel, load_finetuned
from bossflow.straighten import (
    PairStore,
    StraightenConfig,
    eval_interval_error,
    make_pairs,
    save_straightened,
    straighten,
)
from bossflow.straighten.adapters import lora_target_names, raw_network

from . import TinyConvField

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions: one thread is ~50x faster than two that wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


B = 4  # rows per batch (pairs, training, held-out); the runs use 3 B noises, the last B held out


def tiny_unet() -> torch.nn.Module:
    """A class-conditional UNet2DModel (labels 0..2 as ``class_labels``), 45k weights."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
        num_class_embeds=3,
    ).eval()  # fmt: skip


def tiny_sd3() -> torch.nn.Module:
    """A one-block SD3Transformer2DModel on 4x8x8 latents, 12k weights."""
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
    ).eval()  # fmt: skip


def tiny_cross_attention_unet() -> torch.nn.Module:
    """A UNet2DConditionModel (SD's UNet) on 4x8x8 latents, cross-attending to 16-d text, 29k."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        norm_num_groups=4, attention_head_dim=4,
    ).eval()  # fmt: skip


def lora_run(field, shape, root, out_dir=None, cond=None, **overrides):
    """A short BOSS LoRA straightening of ``field`` on 3 B pairs (the last B held out).

    ``cond``: per-sample conditioning, (3 B, ...) tensors, row m with noise m, for both the pairs
    and the training.
    """
    schedule = uniform(2)
    pairs = make_pairs(
        field, NoiseSource(shape, seed=0), schedule, root / "pairs", fine_grid=4, samples=3 * B,
        batch_size=B, cond=cond,
    )  # fmt: skip
    settings = dict(
        iterations=6, batch_size=B, lr=1e-2, warmup=1, ema_decay=0.9, eval_every=3, holdout=B,
        eval_batch_size=B, lora_rank=2,
    )  # fmt: skip
    config = StraightenConfig(**{**settings, **overrides})
    return straighten(field, pairs, schedule, config, out_dir, progress=False, cond=cond)


def check_per_sample_cond(field, shape, root, result, cond):
    """Each noise's pairs and held-out errors use its own conditioning row.

    The stored end states are the fine 4-step Euler solve of every noise with its own row (the
    whole batch at once here, B rows per batch in ``make_pairs``; with the rows shifted by one they
    differ by 0.4 to 0.8); the held-out errors the run recorded are those measured here with each
    noise's row; another assignment of the rows is refused.
    """
    pairs = PairStore.open(root / "pairs")
    noise = NoiseSource(shape, seed=0).take(3 * B)
    want = sample(field, noise, uniform(4), cond=cond)
    got = pairs.states[:][:, -1].to(want.dtype)
    scale = float(want.abs().max())
    assert (got - want).abs().max() <= 1e-5 * scale  # batch-size GEMM rounding only
    held = result.heldout_indices
    before = eval_interval_error(field, pairs, uniform(2), held, cond=cond)
    after = eval_interval_error(result.module, pairs, uniform(2), held, cond=cond)
    # the run's held-out records (base weights, then the returned ones, unmerged LoRA) are these
    assert result.history[0]["heldout_loss"] == pytest.approx(before, rel=1e-6)
    assert result.history[-1]["heldout_loss"] == pytest.approx(after, rel=1e-5)
    shuffled = {k: v.roll(1, 0) for k, v in cond.items()}
    with pytest.raises(ConfigError, match="other conditioning"):
        eval_interval_error(field, pairs, uniform(2), held, cond=shuffled)


def check_merged_is_base_plus_adapter(result, base):
    """The merged weights are the base weights plus (alpha / r) B A of the adapter returned."""
    merged = dict(raw_network(result.module)[0].named_modules())
    original = dict(base.named_modules())
    scale = result.lora.alpha / result.lora.rank
    for name in result.lora.target_modules:
        a = result.lora.state[f"{name}.lora_A.weight"]
        b = result.lora.state[f"{name}.lora_B.weight"]
        # Linear: B A; Conv2d (A a k x k conv to r channels, B a 1 x 1 conv): the same, reshaped
        weight = original[name].weight
        want = weight + scale * (b.flatten(1) @ a.flatten(1)).view_as(weight)
        torch.testing.assert_close(merged[name].weight, want, rtol=0, atol=1e-6)


def check_loaded_adapter(module, result):
    """The LoRA tensors peft / diffusers put into ``module`` are the run's, bit for bit."""
    # e.g. base_model.model.<layer>.lora_A.default.weight (peft), <layer>.lora_A.default_0.weight
    got = {
        re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", n): p
        for n, p in module.named_parameters()
        if ".lora_" in n
    }
    assert len(got) == len(result.lora.state)
    for key, value in result.lora.state.items():
        (match,) = [v for n, v in got.items() if n.endswith("." + key) or n == key]
        assert torch.equal(match, value), key


def test_conditional_unet_lora_loads_through_peft_and_merged_strictly(tmp_path):
    cond = {"class_labels": torch.arange(3 * B) % 3}  # noise m: label m mod 3
    base = tiny_unet()
    field = DiffusersField(base)
    result = lora_run(field, (1, 8, 8), tmp_path, cond=cond)
    check_per_sample_cond(field, (1, 8, 8), tmp_path, result, cond)

    # default targets on a diffusers UNet: the attention projections only
    assert result.lora.target_modules[:4] == [
        f"down_blocks.1.attentions.0.{s}" for s in ("to_q", "to_k", "to_v", "to_out.0")
    ]
    assert len(result.lora.target_modules) == 16  # 4 attention blocks x (q, k, v, out)
    assert result.trainable_parameters == sum(v.numel() for v in result.lora.state.values())
    assert result.lora.component is None  # UNet2DModel has no diffusers LoRA loader
    check_merged_is_base_plus_adapter(result, base)

    path = save_straightened(result, tmp_path / "out" / "model.safetensors")
    lora_dir, diffusers_dir = tmp_path / "out" / "model-lora", tmp_path / "out" / "model-diffusers"
    assert sorted(p.name for p in lora_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    provenance = json.loads(path.with_suffix(".json").read_text())
    assert provenance["network_prefix"] == "network."
    assert provenance["network_class"] == "diffusers.models.unets.unet_2d.UNet2DModel"
    assert provenance["lora"]["folder"] == "model-lora" and provenance["lora"]["rank"] == 2
    assert provenance["diffusers_folder"] == "model-diffusers"

    x = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    timestep = torch.tensor([999.0, 700.0, 300.0, 10.0])
    labels = torch.tensor([0, 1, 2, 2])
    with torch.no_grad():
        want = result.module.network(x, timestep, class_labels=labels).sample
        before = tiny_unet()(x, timestep, class_labels=labels).sample
        assert (want - before).abs().max() > 1e-3  # it trained
        # merged: the bare network's own keys, strict
        bare = tiny_unet()
        bare.load_state_dict(load_file(path), strict=True)
        assert torch.equal(bare(x, timestep, class_labels=labels).sample, want)
        reloaded = diffusers.UNet2DModel.from_pretrained(diffusers_dir)
        assert torch.equal(reloaded(x, timestep, class_labels=labels).sample, want)
        # the adapter through peft, on a fresh base network
        adapted = peft.PeftModel.from_pretrained(tiny_unet(), lora_dir)
        check_loaded_adapter(adapted, result)
        got = adapted(x, timestep, class_labels=labels).sample
    # unmerged vs merged LoRA: float32 rounding only (measured 4.8e-7 at outputs of size 1.3)
    assert (got - want).abs().max() <= 1e-6 * max(1.0, float(want.abs().max()))


def test_sd3_lora_loads_through_peft_diffusers_and_a_pipeline(tmp_path):
    gen = torch.Generator().manual_seed(3)
    # a prompt embedding per noise (3 B noises), as the text encoders would give
    cond = {"encoder_hidden_states": torch.randn(3 * B, 3, 16, generator=gen)}
    cond["pooled_projections"] = torch.randn(3 * B, 8, generator=gen)
    base = tiny_sd3()
    field = DiffusersField(base, sample_keyword="hidden_states")
    result = lora_run(field, (4, 8, 8), tmp_path, cond=cond)
    check_per_sample_cond(field, (4, 8, 8), tmp_path, result, cond)

    names = {n.removeprefix("transformer_blocks.0.") for n in result.lora.target_modules}
    attention = {f"attn.{s}" for s in ("to_q", "to_k", "to_v", "to_out.0")}
    attention |= {f"attn.add_{s}_proj" for s in "qkv"}
    assert names == attention | {"ff.net.0.proj", "ff.net.2", "proj_out"}
    assert result.lora.component == "transformer"
    check_merged_is_base_plus_adapter(result, base)

    path = save_straightened(result, tmp_path / "out" / "model")
    assert path.name == "model.safetensors"
    lora_dir = tmp_path / "out" / "model-lora"
    weights = lora_dir / "pytorch_lora_weights.safetensors"
    with safe_open(weights, "pt") as f:  # the layout of a pipeline's save_lora_weights
        keys = list(f.keys())  # noqa: SIM118 (safe_open is not a mapping)
        assert len(keys) == len(result.lora.state) and all(
            k.startswith("transformer.") for k in keys
        )
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.r"] == 2 and metadata["transformer.lora_alpha"] == 2.0

    x = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    call = {k: v[:B] for k, v in cond.items()}  # the first B prompts
    call["timestep"] = torch.tensor([999.0, 700.0, 300.0, 10.0])
    with torch.no_grad():
        want = result.module.network(hidden_states=x, **call).sample
        assert (want - tiny_sd3()(hidden_states=x, **call).sample).abs().max() > 1e-3
        bare = tiny_sd3()
        bare.load_state_dict(load_file(path), strict=True)
        assert torch.equal(bare(hidden_states=x, **call).sample, want)

        by_peft = peft.PeftModel.from_pretrained(tiny_sd3(), lora_dir)
        by_model = tiny_sd3()
        by_model.load_lora_adapter(lora_dir, use_safetensors=True)  # prefix "transformer"
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=tiny_sd3(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            text_encoder_3=None, tokenizer_3=None,
        )  # fmt: skip
        pipe.load_lora_weights(lora_dir)
        for loaded in (by_peft, by_model, pipe.transformer):
            check_loaded_adapter(loaded, result)
            got = loaded(hidden_states=x, **call).sample
            # measured: 4.8e-7 at outputs of size 2.0 (unmerged vs merged float32 rounding)
            assert (got - want).abs().max() <= 1e-6 * max(1.0, float(want.abs().max()))


def test_cross_attention_unet_lora_loads_with_the_unet_prefix_and_through_a_pipeline(tmp_path):
    gen = torch.Generator().manual_seed(3)
    cond = {"encoder_hidden_states": torch.randn(3 * B, 3, 16, generator=gen)}  # per noise
    base = tiny_cross_attention_unet()
    field = DiffusersField(base)  # sample positional, timestep 1000 sigma
    result = lora_run(field, (4, 8, 8), tmp_path, cond=cond)
    check_per_sample_cond(field, (4, 8, 8), tmp_path, result, cond)
    assert result.lora.component == "unet"
    # 4 transformer blocks: proj_in, self- and cross-attention q, k, v, out, ff (2), proj_out
    assert len(result.lora.target_modules) == 4 * 12
    check_merged_is_base_plus_adapter(result, base)

    path = save_straightened(result, tmp_path / "out" / "model.safetensors")
    lora_dir = tmp_path / "out" / "model-lora"
    with safe_open(lora_dir / "pytorch_lora_weights.safetensors", "pt") as f:
        keys = list(f.keys())  # noqa: SIM118 (safe_open is not a mapping)
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert len(keys) == len(result.lora.state) and all(k.startswith("unet.") for k in keys)
    assert metadata["unet.r"] == 2

    x = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    timestep = torch.tensor([999.0, 700.0, 300.0, 10.0])
    text = cond["encoder_hidden_states"][:B]
    with torch.no_grad():
        want = result.module.network(x, timestep, encoder_hidden_states=text).sample
        before = tiny_cross_attention_unet()(x, timestep, encoder_hidden_states=text).sample
        assert (want - before).abs().max() > 1e-3  # it trained
        bare = tiny_cross_attention_unet()
        bare.load_state_dict(load_file(path), strict=True)
        assert torch.equal(bare(x, timestep, encoder_hidden_states=text).sample, want)

        by_peft = peft.PeftModel.from_pretrained(tiny_cross_attention_unet(), lora_dir)
        by_model = tiny_cross_attention_unet()
        by_model.load_lora_adapter(lora_dir, prefix="unet", use_safetensors=True)
        pipe = diffusers.StableDiffusionPipeline(
            vae=None, text_encoder=None, tokenizer=None, unet=tiny_cross_attention_unet(),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        pipe.load_lora_weights(lora_dir)  # the unet. keys; no text encoder here
        for loaded in (by_peft, by_model, pipe.unet):
            check_loaded_adapter(loaded, result)
            got = loaded(x, timestep, encoder_hidden_states=text).sample
            assert (got - want).abs().max() <= 1e-6 * max(1.0, float(want.abs().max()))


def test_lora_targets_choose_layers_and_bad_ones_are_refused(tmp_path):
    field = TinyConvField(hidden=8)
    assert lora_target_names(field) == ["time", "conv_in", "conv_mid", "conv_out"]  # all, as before
    result = lora_run(field, (1, 8, 8), tmp_path, lora_targets=["conv_mid", "time"])
    assert result.lora.target_modules == ["time", "conv_mid"]
    assert result.config.lora_targets == ("conv_mid", "time")
    assert result.trainable_parameters == 2 * (1 + 8) + 2 * (8 * 9 + 8)
    # the adapter is keyed by the raw network's names: no "network." of the field adapter
    wrapped = RectifiedFlowField(TinyConvField(hidden=8))
    assert lora_target_names(wrapped, ["conv_mid"]) == ["network.conv_mid"]
    with pytest.raises(ConfigError, match=r"\['to_q'\] match no nn.Linear .* such as: time"):
        lora_target_names(field, ["to_q", "conv_in"])
    with pytest.raises(ConfigError, match="a list of layer names"):
        StraightenConfig(lora_rank=2, lora_targets="conv_in").check()
    with pytest.raises(ConfigError, match="lora_targets is empty"):
        StraightenConfig(lora_rank=2, lora_targets=[]).check()


def test_resumed_lora_run_returns_the_same_adapter(tmp_path):
    field = TinyConvField(hidden=8)
    config = dict(checkpoint_every=2, lora_targets=("conv_in", "conv_out"))
    whole = lora_run(field, (1, 8, 8), tmp_path, **config)
    out = tmp_path / "split"
    lora_run(field, (1, 8, 8), tmp_path, out, iterations=4, **config)
    resumed = lora_run(field, (1, 8, 8), tmp_path, out, **config)  # from iteration 4 on
    assert resumed.iterations == 6
    assert resumed.lora.state.keys() == whole.lora.state.keys()
    assert all(torch.equal(resumed.lora.state[k], v) for k, v in whole.lora.state.items())


def test_finetuned_files_load_with_and_without_the_adapter_prefix(tmp_path):
    network = TinyConvField(hidden=8)
    field = RectifiedFlowField(network)
    assert raw_network(field) == (network, "network.")

    class Wrapper(torch.nn.Module):  # a user's model whose only child is called `network`
        def __init__(self):
            super().__init__()
            self.network = TinyConvField(hidden=8)

    user = Wrapper()  # saved as it is, so it loads strictly into the user's own class
    assert raw_network(user) == (user, "")
    assert raw_network(RectifiedFlowField(user)) == (user, "network.")
    new = {k: v + 1 for k, v in network.state_dict().items()}  # what save_straightened writes
    save_file(new, tmp_path / "new.safetensors")
    model = load_finetuned(LoadedModel(RectifiedFlowField(TinyConvField(hidden=8)), (1, 8, 8), "m"),
                           tmp_path / "new.safetensors")  # fmt: skip
    assert all(torch.equal(model.field.network.state_dict()[k], v) for k, v in new.items())
    old = {f"network.{k}": v for k, v in new.items()}  # files of earlier bossflow versions
    save_file(old, tmp_path / "old.safetensors")
    model = load_finetuned(LoadedModel(RectifiedFlowField(TinyConvField(hidden=8)), (1, 8, 8), "m"),
                           tmp_path / "old.safetensors")  # fmt: skip
    assert all(torch.equal(model.field.network.state_dict()[k], v) for k, v in new.items())


def test_cli_lora_targets_reach_the_config():
    from bossflow.cli import _straighten_config, build_parser

    argv = ["straighten", "--schedule", "s.json", "--lora-rank", "2"]
    args = build_parser().parse_args([*argv, "--lora-targets", "to_q, to_out.0,"])
    assert _straighten_config(args).lora_targets == ("to_q", "to_out.0")
    assert _straighten_config(build_parser().parse_args(argv)).lora_targets is None


def test_a_users_own_network_attribute_loads_back(tmp_path):
    """A torchcfm-style model whose layers live under its own `self.network`: every saved key
    starts with `network.`, which load_finetuned took for the old adapter-prefixed layout."""
    from bossflow.field import TorchCFMField
    from bossflow.straighten import save_straightened

    class UserNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.network = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
                                               torch.nn.Linear(8, 2))  # fmt: skip

        def forward(self, t, x):
            return self.network(torch.cat([x, t.reshape(-1, 1).expand(len(x), 1)], 1))

    field = TorchCFMField(UserNet())
    schedule = uniform(2)
    pairs = make_pairs(field, NoiseSource((2,), seed=0), schedule, tmp_path / "p", 4, 8)
    result = straighten(field, pairs, schedule, StraightenConfig(iterations=2, batch_size=4),
                        progress=False)  # fmt: skip
    path = save_straightened(result, tmp_path / "m.safetensors")
    UserNet().load_state_dict(load_file(path))  # strict, into the user's own class
    loaded = load_finetuned(LoadedModel(TorchCFMField(UserNet()), (2,), "u"), path)
    for a, b in zip(loaded.field.parameters(), result.module.parameters(), strict=True):
        assert torch.equal(a, b)
