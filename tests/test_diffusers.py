"""diffusers: DiffusersField conventions, scheduler_for in stock SD3 / FLUX pipelines, the docs page.

Tiny random-weight transformers built here (no downloads); the pipelines run without VAE, text
encoders or tokenizers, on prompt embeddings given per sample, with ``output_type="latent"``.
"""

import re
from pathlib import Path

import pytest
import torch

import bossflow
from bossflow.errors import ConfigError
from bossflow.field import DiffusersField, Guided
from bossflow.sampler import Sampler
from bossflow.schedule import Schedule

diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (extra 'diffusers')")
from bossflow.diffusers import scheduler_for  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "ecosystem" / "diffusers.md"
B, TEXT_LEN = 2, 5

# A Bellman-like schedule (non-uniform, small first steps) and a learned-like sampler (times,
# per-step scales, AB2), both 4 steps; Heun for a solver with two evaluations per step.
BELLMAN = Schedule([0.0, 0.08, 0.3, 0.65, 1.0], method="bellman")
LEARNED = Sampler([0.0, 0.11, 0.37, 0.72, 1.0], "ab2", [1.03, 0.96, 1.08, 0.93], method="learned")
HEUN = Sampler([0.0, 0.25, 0.6, 1.0], "heun", [1.02, 0.97, 1.05])
MIDPOINT = Sampler([0.0, 0.3, 1.0], "midpoint")


def _sd3_transformer():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=8,
    ).eval()


def _flux_transformer():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,  # packed: 1 latent channel x 2 x 2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ).eval()


@pytest.fixture(scope="module")
def sd3():
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=_sd3_transformer(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's stock config
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "latents": torch.randn(B, 4, 8, 8, generator=g),
        "prompt_embeds": torch.randn(B, TEXT_LEN, 16, generator=g),
        "pooled_prompt_embeds": torch.randn(B, 8, generator=g),
        "negative_prompt_embeds": torch.randn(B, TEXT_LEN, 16, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(B, 8, generator=g),
    }
    field = Guided(DiffusersField(pipe.transformer), 4.5)
    cond = {
        "encoder_hidden_states": inputs["prompt_embeds"],
        "pooled_projections": inputs["pooled_prompt_embeds"],
        "uncond.encoder_hidden_states": inputs["negative_prompt_embeds"],
        "uncond.pooled_projections": inputs["negative_pooled_prompt_embeds"],
    }
    call = dict(inputs, height=64, width=64, guidance_scale=4.5, output_type="latent")
    return pipe, call, field, cond


@pytest.fixture(scope="module")
def flux():
    pipe = diffusers.FluxPipeline(
        transformer=_flux_transformer(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(  # FLUX.1's stock config
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    # 32 x 32 pixels = 4 x 4 latents (VAE factor 8), packed 2 x 2: 4 tokens of 4 values
    inputs = {
        "latents": torch.randn(B, 4, 4, generator=g),
        "prompt_embeds": torch.randn(B, TEXT_LEN, 16, generator=g),
        "pooled_prompt_embeds": torch.randn(B, 8, generator=g),
    }
    ids = {
        "img_ids": diffusers.FluxPipeline._prepare_latent_image_ids(B, 2, 2, "cpu", torch.float32),
        "txt_ids": torch.zeros(TEXT_LEN, 3),
    }
    field = DiffusersField(pipe.transformer, model_kwargs=ids)
    cond = {
        "encoder_hidden_states": inputs["prompt_embeds"],
        "pooled_projections": inputs["pooled_prompt_embeds"],
        "guidance": torch.full((B,), 3.5),  # distilled guidance: plain per-sample conditioning
    }
    call = dict(inputs, height=32, width=32, guidance_scale=3.5, output_type="latent")
    return pipe, call, field, cond


def _run(pipe, call, schedule, **kwargs):
    base = pipe.scheduler
    try:
        if schedule is not None:
            pipe.scheduler = scheduler_for(schedule, base)
            kwargs.setdefault("num_inference_steps", schedule.steps)
        return pipe(**call, **kwargs).images
    finally:
        pipe.scheduler = base


# -- DiffusersField conventions ---------------------------------------------------------------
def _seen_timestep(field, x, t, **cond):
    seen = {}

    def hook(module, args, kwargs):
        seen["timestep"] = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        seen["positional"] = len(args) > 0

    handle = field.network.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            field(x, t, **cond)
    finally:
        handle.remove()
    return seen["timestep"], seen["positional"]


def test_diffusers_field_detects_sd3_flux_and_unet_timesteps(sd3, flux):
    t = torch.tensor([0.25, 0.9])
    _, call, field, cond = sd3
    inner = field.field
    plain = {k: v for k, v in cond.items() if not k.startswith("uncond.")}
    timestep, positional = _seen_timestep(inner, call["latents"], t, **plain)
    torch.testing.assert_close(timestep, torch.tensor([750.0, 100.0]))  # 1000 sigma
    assert not positional and inner.sample_keyword == "hidden_states"

    _, call, field, cond = flux
    timestep, positional = _seen_timestep(field, call["latents"], t, **cond)
    torch.testing.assert_close(timestep, torch.tensor([0.75, 0.1]))  # sigma: x1000 inside FLUX
    assert not positional and field.sample_keyword == "hidden_states"
    # the explicit override still works (what users had to guess before)
    explicit = DiffusersField(field.network, field.model_kwargs, num_train_timesteps=1)
    timestep, _ = _seen_timestep(explicit, call["latents"], t, **cond)
    assert torch.equal(timestep, 1 * (1.0 - t))
    with pytest.warns(UserWarning, match="multiplies its timestep by 1000"):
        DiffusersField(field.network, num_train_timesteps=1000)

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()
    field = DiffusersField(unet)
    timestep, positional = _seen_timestep(field, torch.randn(2, 1, 8, 8), t)
    torch.testing.assert_close(timestep, torch.tensor([750.0, 100.0]))
    assert positional and field.sample_keyword is None
    with pytest.raises(ConfigError, match="positive number"):
        DiffusersField(unet, num_train_timesteps=0)


# -- stock pipelines take bossflow's steps -----------------------------------------------------
@pytest.mark.parametrize(
    "schedule",
    [BELLMAN, LEARNED, HEUN, MIDPOINT],
    ids=["bellman", "learned-ab2", "heun", "midpoint"],
)
def test_sd3_pipeline_with_scheduler_for_matches_bossflow_sample(sd3, schedule):
    pipe, call, field, cond = sd3
    ours = bossflow.sample(field, call["latents"], schedule, cond=cond)
    theirs = _run(pipe, call, schedule)
    assert (theirs - ours).abs().max().item() <= 1e-5
    assert pipe.scheduler.config.shift == 3.0  # the pipeline's own scheduler is untouched


@pytest.mark.parametrize(
    "schedule", [BELLMAN, LEARNED, HEUN], ids=["bellman", "learned-ab2", "heun"]
)
def test_flux_pipeline_with_scheduler_for_matches_bossflow_sample(flux, schedule):
    pipe, call, field, cond = flux
    ours = bossflow.sample(field, call["latents"], schedule, cond=cond)
    theirs = _run(pipe, call, schedule)  # packed latents in, packed latents out
    assert (theirs - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_sigmas_into_a_stock_pipeline_are_reshifted_and_refused(which, request):
    pipe, call, field, cond = request.getfixturevalue(which)
    ours = bossflow.sample(field, call["latents"], BELLMAN, cond=cond)
    # what the stock scheduler does with bossflow's sigmas: other steps, visibly other latents
    reshifted = _run(pipe, call, None, sigmas=BELLMAN.to_diffusers_sigmas())
    assert (reshifted - ours).abs().max().item() > 1e-2
    for exported in (BELLMAN, Sampler.from_schedule(BELLMAN)):
        with pytest.raises(ConfigError, match="scheduler_for"):
            exported.to_diffusers_sigmas(scheduler=pipe.scheduler)


def test_to_diffusers_sigmas_checks_the_scheduler():
    plain = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    assert BELLMAN.to_diffusers_sigmas(scheduler=plain) == BELLMAN.to_diffusers_sigmas()
    plain.set_timesteps(sigmas=BELLMAN.to_diffusers_sigmas(scheduler=plain))
    torch.testing.assert_close(plain.sigmas.double(), torch.tensor(1.0 - BELLMAN.times))
    plain.set_shift(2.0)  # changed after construction: still seen
    with pytest.raises(ConfigError, match="shift=2"):
        BELLMAN.to_diffusers_sigmas(scheduler=plain)
    karras = diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)
    with pytest.raises(ConfigError, match="use_karras_sigmas"):
        BELLMAN.to_diffusers_sigmas(scheduler=karras)
    with pytest.raises(ConfigError, match="already takes bossflow's steps"):
        BELLMAN.to_diffusers_sigmas(scheduler=scheduler_for(BELLMAN, karras))
    with pytest.raises(ConfigError, match="scheduler_for"):
        LEARNED.to_diffusers_sigmas()  # not plain Euler: the message names the way that works


def test_scheduler_for_keeps_the_base_config_and_says_what_is_wrong(flux):
    base = flux[0].scheduler
    ours = scheduler_for(LEARNED, base)
    assert {k: v for k, v in ours.config.items() if not k.startswith("_")} == {
        k: v for k, v in base.config.items() if not k.startswith("_")
    }
    assert ours.bossflow_sampler == LEARNED and ours.order == 1
    assert scheduler_for(HEUN, base).order == 2
    ours.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.7)  # FLUX's: only the count is used
    torch.testing.assert_close(
        ours.timesteps, 1000 * (1.0 - torch.tensor(LEARNED.times[:-1])).float()
    )
    with pytest.raises(ConfigError, match="num_inference_steps=4"):
        ours.set_timesteps(28)
    with pytest.raises(ConfigError, match="flow-matching scheduler"):
        scheduler_for(LEARNED, diffusers.DDIMScheduler())
    with pytest.raises(ConfigError, match="Schedule, a Sampler"):
        scheduler_for("bellman", base)
    with pytest.raises(ConfigError, match="scheduler_for"):
        type(ours).from_config(base.config).set_timesteps(4)
    ours.set_timesteps(4)
    x = torch.zeros(1, 4)
    ours.step(-torch.ones(1, 4), ours.timesteps[0], x)
    with pytest.raises(ConfigError, match="bossflow's call 1 is at"):
        ours.step(-torch.ones(1, 4), ours.timesteps[3], x)


# -- the docs page runs as written ------------------------------------------------------------
DOC_SNIPPETS = (
    re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S) if DOC.exists() else []
)


def test_docs_page_has_python_snippets():
    assert DOC_SNIPPETS


@pytest.mark.parametrize("index", range(len(DOC_SNIPPETS)))
def test_docs_snippet_runs(index):
    code = DOC_SNIPPETS[index]
    assert "..." not in code.replace("# ...", "")  # nothing left for the reader to fill in
    exec(compile(code, f"{DOC.name} snippet {index}", "exec"), {"__name__": "__doc_snippet__"})


def test_qwen_image_takes_sigma_as_its_pipelines_feed_it():
    """Qwen-Image multiplies its timestep by 1000 inside (its pipelines pass timestep / 1000): it
    was fed 1000 sigma, a field 1000x off in time, with no error."""
    torch.manual_seed(0)
    qwen = diffusers.QwenImageTransformer2DModel(
        patch_size=1, in_channels=8, out_channels=8, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=8, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip
    field = DiffusersField(qwen, {"img_shapes": [[(1, 2, 2)]] * 2})
    cond = {"encoder_hidden_states": torch.randn(2, 3, 8)}
    cond["encoder_hidden_states_mask"] = torch.ones(2, 3, dtype=torch.long)
    t = torch.tensor([0.25, 0.9])
    timestep, positional = _seen_timestep(field, torch.randn(2, 4, 8), t, **cond)
    torch.testing.assert_close(timestep, torch.tensor([0.75, 0.1]))
    assert not positional


def test_sigmas_are_refused_for_a_scheduler_that_would_not_take_euler_steps():
    stochastic = diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    with pytest.raises(ConfigError, match="stochastic_sampling=True"):
        BELLMAN.to_diffusers_sigmas(scheduler=stochastic)
    with pytest.raises(ConfigError, match="EulerDiscreteScheduler is not a flow-matching"):
        BELLMAN.to_diffusers_sigmas(scheduler=diffusers.EulerDiscreteScheduler())
