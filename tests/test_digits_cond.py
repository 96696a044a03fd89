"""The class-conditional digits model: the UNet's label path, its recipe, the shipped weights."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from bossflow.data import load_dataset
from bossflow.errors import CheckpointError, ConfigError
from bossflow.field import Guided
from bossflow.models.unet import DigitUNet
from bossflow.pretrained import (
    class_labels_cond,
    guidance_defaults,
    load_digits_classifier,
    load_digits_cond_field,
    load_digits_field,
    load_pretrained,
    load_state_dict_strict,
    null_class_cond,
    read_metadata,
    save_pretrained,
)
from bossflow.recipes.digits import (
    choose_guidance_scale,
    flow_validation_loss,
    train_and_save_conditional,
    train_base,
)
from bossflow.schedule import uniform
from bossflow.solvers import sample
from bossflow.spec import load_model

TINY = {"base": 8, "num_res_blocks": 1, "time_dim": 16, "groups": 4}


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return module


# ------------------------------------------------------------------------------------ the UNet


def test_unconditional_unet_is_unchanged_by_the_option() -> None:
    plain = DigitUNet(**TINY)
    assert "num_classes" not in plain.config and plain.null_label is None
    assert not any(k.startswith("label_emb") for k in plain.state_dict())
    assert DigitUNet(**TINY, num_classes=0).config == plain.config

    # Same seed: every shared layer starts with the same weights; only the embedding is new.
    torch.manual_seed(5)
    a = DigitUNet(**TINY)
    torch.manual_seed(5)
    b = DigitUNet(**TINY, num_classes=10)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sb) - set(sa) == {"label_emb.weight"}
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.config["num_classes"] == 10 and b.null_label == 10
    assert tuple(sb["label_emb.weight"].shape) == (11, 4 * TINY["base"])


def test_label_embedding_is_added_to_the_time_embedding() -> None:
    cond = _randomize(DigitUNet(**TINY, num_classes=10).eval())
    plain = DigitUNet(**TINY).eval()
    plain.load_state_dict({k: v for k, v in cond.state_dict().items() if k != "label_emb.weight"})
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    y = torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        cond.label_emb.weight.zero_()
        assert torch.allclose(cond(x, t, class_labels=y), plain(x, t), atol=1e-6)
        _randomize(cond.label_emb, seed=1)
        out = cond(x, t, class_labels=y)
        assert not torch.allclose(out[:3], plain(x, t)[:3], atol=1e-4)
        # each row depends on its own label only
        again = cond(x[1:2], t[1:2], class_labels=y[1:2])
        assert torch.allclose(out[1:2], again, atol=1e-6)


def test_conditional_unet_needs_valid_labels() -> None:
    cond, plain = DigitUNet(**TINY, num_classes=10), DigitUNet(**TINY)
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    with pytest.raises(ConfigError, match=r'pass cond=\{"class_labels": labels\}'):
        cond(x, t)
    with pytest.raises(ConfigError, match=r"takes no class_labels: drop the conditioning.*--cond"):
        plain(x, t, class_labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ConfigError, match=r"0\.\.10"):
        cond(x, t, class_labels=torch.tensor([1, 2, 11]))
    with pytest.raises(ConfigError, match=r"0\.\.10"):
        cond(x, t, class_labels=torch.tensor([-1, 2, 3]))
    with pytest.raises(ConfigError, match="integers"):
        cond(x, t, class_labels=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ConfigError, match=r"shape \(3,\)"):
        cond(x, t, class_labels=torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="num_classes"):
        DigitUNet(**TINY, num_classes=-1)
    assert cond(x, t, class_labels=torch.tensor([0, 9, 10])).shape == x.shape


def test_conditional_model_round_trips_and_loads_strictly(tmp_path: Path) -> None:
    model = _randomize(DigitUNet(**TINY, num_classes=10)).eval()
    save_pretrained(model, tmp_path, "c", {"note": "test"})
    loaded = load_pretrained(tmp_path / "c")
    assert loaded.config == model.config and loaded.num_classes == 10
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([4, 10])
    assert torch.equal(loaded(x, t, class_labels=y), model(x, t, class_labels=y))
    state = model.state_dict()
    with pytest.raises(CheckpointError, match="label_emb.weight"):
        load_state_dict_strict(DigitUNet(**TINY), state)  # unconditional: unexpected key
    del state["label_emb.weight"]
    with pytest.raises(CheckpointError, match="label_emb.weight"):
        load_state_dict_strict(DigitUNet(**TINY, num_classes=10), state)  # missing key


# --------------------------------------------------------------------------------- the helpers


def test_class_labels_follow_the_sample_index() -> None:
    assert class_labels_cond(12, 10)["class_labels"].tolist() == [*range(10), 0, 1]
    assert class_labels_cond(range(18, 22), 10)["class_labels"].tolist() == [8, 9, 0, 1]
    assert class_labels_cond([3, 13], 10)["class_labels"].tolist() == [3, 3]
    assert class_labels_cond(torch.tensor([7]), 3)["class_labels"].dtype == torch.int64
    assert class_labels_cond(0, 10)["class_labels"].shape == (0,)
    # read in batches (as the long jobs read a per-sample callable), the labels are the same
    labels = functools.partial(class_labels_cond, num_classes=10)
    parts = [labels(range(a, min(a + 7, 25)))["class_labels"] for a in range(0, 25, 7)]
    assert torch.equal(torch.cat(parts), labels(25)["class_labels"])
    assert null_class_cond(10)["class_labels"].tolist() == [10]
    with pytest.raises(ConfigError, match="num_classes"):
        class_labels_cond(5, 0)
    with pytest.raises(ConfigError, match=">= 0"):
        class_labels_cond([-1], 10)


def test_choose_guidance_scale_takes_the_least_guidance_near_the_best() -> None:
    rows = [
        {"scale": 1.0, "accuracy": 1.0, "confident_accuracy": 0.90},
        {"scale": 2.0, "accuracy": 1.0, "confident_accuracy": 0.99},
        {"scale": 3.0, "accuracy": 1.0, "confident_accuracy": 1.0},
        {"scale": 4.0, "accuracy": 0.99, "confident_accuracy": 0.98},
    ]
    assert choose_guidance_scale(rows) == 2.0
    assert choose_guidance_scale(rows, tolerance=0.0) == 3.0
    assert choose_guidance_scale(rows, tolerance=0.1) == 1.0
    assert choose_guidance_scale(rows, metric="accuracy", tolerance=0.0) == 1.0
    with pytest.raises(ConfigError):
        choose_guidance_scale([])


def test_guidance_defaults_refuse_an_unconditional_model() -> None:
    with pytest.raises(ConfigError, match="not a class-conditional"):
        guidance_defaults("digits")
    with pytest.raises(ConfigError, match="not a class-conditional"):
        load_model("digits-cond", checkpoint=str(_digits_path()))


def _digits_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("bossflow") / "assets" / "digits.safetensors"))


# ---------------------------------------------------------------------------------- the recipe


def test_recipe_trains_a_conditional_model_deterministically() -> None:
    data = load_dataset("digits", "train")
    images, labels = data.images[:128], data.labels[:128]
    kwargs = dict(
        steps=6, batch_size=32, seed=2, model_config=TINY, warmup=2, ema_decay=0.5, progress=False
    )
    assert int(labels.max()) == 9  # num_classes is inferred from the labels
    a, log_a = train_base(images, labels=labels, **kwargs)
    b, log_b = train_base(images, labels=labels, **kwargs)
    c, _ = train_base(images, labels=labels, **{**kwargs, "seed": 3})
    assert a.num_classes == 10 and log_a.settings["label_dropout"] == 0.1
    assert log_a.settings["model_config"]["num_classes"] == 10
    assert log_a.loss == log_b.loss
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["label_emb.weight"], sc["label_emb.weight"])
    # the unconditional recipe records no conditioning settings
    _, plain_log = train_base(images, **kwargs)
    assert "label_dropout" not in plain_log.settings
    assert "num_classes" not in plain_log.settings["model_config"]


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_label_dropout_trains_the_null_row_only_when_labels_are_dropped(dropout: float) -> None:
    data = load_dataset("digits", "train")
    seed, steps = 4, 4
    kwargs = dict(steps=steps, batch_size=32, seed=seed, warmup=1, progress=False)
    model, _ = train_base(
        data.images[:64],
        labels=data.labels[:64],
        model_config={**TINY, "num_classes": 10},
        label_dropout=dropout,
        ema_decay=0.0,  # EMA = the last weights, so unused rows read back exactly
        **kwargs,
    )
    torch.manual_seed(seed)  # train_base builds the model right after seeding the global RNG
    init = DigitUNet(**TINY, num_classes=10).label_emb.weight
    trained = model.label_emb.weight
    class_rows_moved = not torch.allclose(trained[:10], init[:10], atol=1e-7, rtol=0)
    null_row_moved = not torch.allclose(trained[10], init[10], atol=1e-7, rtol=0)
    # dropout 0: only real labels are seen; dropout 1: only the null label
    assert (class_rows_moved, null_row_moved) == ((True, False) if dropout == 0 else (False, True))


def test_train_base_refuses_inconsistent_conditioning() -> None:
    data = load_dataset("digits", "train")
    images, labels = data.images[:16], data.labels[:16]
    with pytest.raises(ConfigError, match="needs labels="):
        train_base(images, steps=1, model_config={"num_classes": 10}, progress=False)
    with pytest.raises(ConfigError, match="val_labels"):
        train_base(images, steps=1, labels=labels, val_data=images, progress=False)
    with pytest.raises(ConfigError, match="label_dropout"):
        train_base(images, steps=1, labels=labels, label_dropout=1.5, progress=False)
    with pytest.raises(ConfigError, match=r"0\.\.4"):
        train_base(images, steps=1, labels=labels, model_config={"num_classes": 5}, progress=False)


def test_conditional_recipe_saves_a_loadable_model_with_its_guidance(tmp_path: Path) -> None:
    out = train_and_save_conditional(
        tmp_path,
        flow={"steps": 3, "batch_size": 32, "model_config": TINY, "val_every": 0},
        scales=(1.0, 2.0),
        guidance_samples=20,
        guidance_steps=2,
        check_samples=20,
        check_steps=2,
        progress=False,
    )
    prov = read_metadata(tmp_path / "digits-cond")["provenance"]
    assert prov["conditioning"] == {
        "cond_key": "class_labels",
        "num_classes": 10,
        "null_label": 10,
        "label_dropout": 0.1,
    }
    assert [r["scale"] for r in prov["guidance"]["scales"]] == [1.0, 2.0]
    assert prov["guidance"]["scale"] in (1.0, 2.0)
    assert {"heldout_loss", "heldout_loss_null_label", "wall_time_s"} <= set(prov)
    assert prov["sample_check"]["samples"]["count"] == 20
    loaded = load_model("digits-cond", checkpoint=out["paths"][0])
    assert loaded.info == guidance_defaults(tmp_path / "digits-cond")
    assert loaded.info["guidance_scale"] == prov["guidance"]["scale"]
    json.dumps(loaded.info)


# ----------------------------------------------------------------------------- shipped weights


def test_shipped_conditional_model_loads_and_records_its_guidance() -> None:
    field = load_digits_cond_field()
    assert isinstance(field, DigitUNet) and not field.training and field.num_classes == 10
    meta = read_metadata("digits-cond")
    assert meta["config"]["num_classes"] == 10
    prov = meta["provenance"]
    assert prov["settings"]["label_dropout"] > 0
    table = {r["scale"]: r["accuracy"] for r in prov["guidance"]["scales"]}
    assert prov["guidance"]["scale"] in table and table[prov["guidance"]["scale"]] >= 0.8
    assert {"wall_time_s", "heldout_loss", "heldout_loss_null_label", "sample_check"} <= set(prov)

    loaded = load_model("digits-cond")
    assert loaded.sample_shape == (1, 8, 8) and loaded.dataset == "digits"
    assert loaded.info == {
        "cond_key": "class_labels",
        "num_classes": 10,
        "null_label": 10,
        "guidance_scale": prov["guidance"]["scale"],
    }
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with pytest.raises(ConfigError, match="class_labels"):
        loaded.field(x, t)
    # the shipped unconditional model is still unconditional
    assert load_digits_field().num_classes == 0


def test_shipped_guided_samples_are_classified_as_their_labels() -> None:
    field = load_digits_cond_field()
    info = guidance_defaults()
    n = 40
    cond = class_labels_cond(n, info["num_classes"])
    guided = Guided(field, info["guidance_scale"], uncond=null_class_cond(info["num_classes"]))
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(11))
    images = sample(guided, noise, uniform(20), cond=cond)
    predicted = load_digits_classifier()(images).argmax(1)
    accuracy = (predicted == cond["class_labels"]).float().mean().item()
    assert accuracy >= 0.8  # chance is 0.1

    # scale 1 is the conditional field; scale 0 the null-label (unconditional) field
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    y = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        v_c = field(x, t, class_labels=y)
        v_u = field(x, t, class_labels=torch.full((4,), 10))
        # (a batch of 2B rows rounds differently from one of B: compare to float32 precision)
        for scale, expected in ((1.0, v_c), (0.0, v_u)):
            guided = Guided(field, scale, null_class_cond(10))(x, t, class_labels=y)
            assert torch.allclose(guided, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v_c, v_u, atol=1e-3)


def test_shipped_conditional_heldout_loss_is_lower_with_labels() -> None:
    field = load_digits_cond_field()
    heldout = load_dataset("digits", "heldout")
    with_labels = flow_validation_loss(field, heldout.images, labels=heldout.labels, repeats=2)
    null = torch.full_like(heldout.labels, 10)
    without = flow_validation_loss(field, heldout.images, labels=null, repeats=2)
    assert with_labels < without


def test_cli_train_base_conditional_calls_the_conditional_recipe(tmp_path, monkeypatch, capsys):
    import bossflow.recipes.digits as recipe
    from bossflow.cli import main

    calls = []

    def fake(directory, **kwargs):
        calls.append((Path(directory), kwargs))
        return {"flow": {"guidance": {"scale": 2.0}}, "paths": [str(directory / "d.safetensors")]}

    monkeypatch.setattr(recipe, "train_and_save_conditional", fake)
    out = tmp_path / "base"
    args = ["train-base", "--conditional", "--steps", "7", "--seed", "3", "--quiet"]
    assert main([*args, "--check-samples", "9", "--out", str(out)]) == 0
    [(directory, kwargs)] = calls
    assert directory == out and kwargs["flow"] == {"steps": 7} and kwargs["seed"] == 3
    assert kwargs["dataset"] == "digits" and kwargs["check_samples"] == 9
    assert "guidance scale 2.0" in capsys.readouterr().out


def test_a_cond_file_with_other_keywords_is_named_for_digits_cond(tmp_path) -> None:
    """A user's --cond file saying 'labels': the error said --uncond (not given) lacked it."""
    from safetensors.torch import save_file

    from bossflow.conditioning import prepare_conditioning

    model = load_model("digits-cond")
    save_file({"labels": torch.arange(4)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ConfigError, match=r"--cond holds 'labels'; .* on 'class_labels' alone"):
        prepare_conditioning(model.field, model.info, tmp_path / "c.safetensors")
    save_file({"class_labels": torch.arange(4)}, str(tmp_path / "c.safetensors"))
    run = prepare_conditioning(model.field, model.info, tmp_path / "c.safetensors")
    assert run.cond(range(5, 7))["class_labels"].tolist() == [1, 2]
