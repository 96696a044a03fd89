"""Evaluation: open method labels, the solver as a parameter, and what `bossflow evaluate` compares."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bossflow.cli import main
from bossflow.errors import BossflowError, ConfigError
from bossflow.evaluation import EvalEntry, evaluate_methods
from bossflow.field import SpiralField
from bossflow.metrics import mse_to_reference
from bossflow.noise import STAGE_OFFSETS, NoiseSource, OffsetNoise
from bossflow.pretrained import load_digits_field
from bossflow.schedule import Schedule, uniform
from bossflow.solvers import reference_solve, sample


def test_entries_take_any_label_and_count_nfe_from_the_solver():
    field = SpiralField()
    z = torch.randn(6, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    ref = field.exact(z, 1.0)
    entries = [
        EvalEntry("my-sampler", field, uniform(3), solver="heun"),
        EvalEntry("uniform", field, uniform(3)),
    ]
    assert [e.nfe for e in entries] == [6, 3]
    records, samples = evaluate_methods(entries, z, ref, None, None)
    assert [(r.method, r.nfe) for r in records] == [("my-sampler", 6), ("uniform", 3)]
    heun = sample(field, z, uniform(3), solver="heun")
    assert torch.equal(samples[("my-sampler", 6)], heun)
    assert records[0].mse_to_reference == pytest.approx(mse_to_reference(heun, ref)[0])
    # Heun is second order: far closer than Euler at the same number of steps
    assert records[0].mse_to_reference < 0.1 * records[1].mse_to_reference


def test_entries_refuse_unknown_solvers_and_duplicate_rows():
    with pytest.raises(ConfigError, match="unknown solver"):
        EvalEntry("x", SpiralField(), uniform(2), solver="rk45")
    z = torch.zeros(2, 2, 2, 2)
    twice = [EvalEntry("a", SpiralField(), uniform(2))] * 2
    with pytest.raises(BossflowError, match="both be reported as a at 2 NFE"):
        evaluate_methods(twice, z, z, None, None)


@pytest.fixture
def finetuned_file(tmp_path):
    """A 'straightened' digits model: the shipped weights, visibly perturbed."""
    state = {k: v.clone() for k, v in load_digits_field().state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for key in state:
        if state[key].is_floating_point():
            state[key] += 0.02 * torch.randn(state[key].shape, generator=gen)
    path = tmp_path / "tuned.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.mark.slow
def test_evaluate_finetuned_measures_against_the_base_models_reference(
    tmp_path, finetuned_file, capsys
):
    path, state = finetuned_file
    out = tmp_path / "eval"
    args = ["evaluate", "--finetuned", str(path), "--nfe", "2", "--samples", "6"]
    args += ["--reference-steps", "20", "--method", "boss", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    (record,) = json.loads((out / "results.json").read_text())["records"]

    base = load_digits_field()
    tuned = load_digits_field()
    tuned.load_state_dict(state)
    noise = OffsetNoise(NoiseSource((1, 8, 8), seed=0), STAGE_OFFSETS["eval"]).take(6)
    x = sample(tuned, noise, uniform(2))
    against_base = mse_to_reference(x, reference_solve(base, noise, steps=20))[0]
    against_self = mse_to_reference(x, reference_solve(tuned, noise, steps=20))[0]
    assert abs(against_base - against_self) > 1e-3 * against_base  # the two are distinguishable
    assert record["method"] == "boss" and record["nfe"] == 2
    assert record["mse_to_reference"] == pytest.approx(against_base, rel=1e-6)


def test_evaluate_warns_about_a_schedule_made_for_another_model(tmp_path, capsys):
    sched = Schedule([0.0, 0.4, 1.0], method="bellman", provenance={"model": "some-other-model"})
    sched.save(tmp_path / "s.json")
    out = tmp_path / "eval"
    args = ["evaluate", "--schedule", str(tmp_path / "s.json"), "--samples", "4"]
    args += ["--reference-steps", "10", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "some-other-model" in err
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["records"]] == ["bellman (other model)"]
    assert "some-other-model" in results["warnings"][0]
    # a schedule made for this model is used without a word
    Schedule([0.0, 0.4, 1.0], method="bellman", provenance={"model": "digits"}).save(
        tmp_path / "own.json"
    )
    args[2] = str(tmp_path / "own.json")
    assert main(args) == 0
    assert "warning" not in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["records"]] == ["bellman"]


def test_a_model_that_raises_is_one_clear_error_naming_the_call():
    from bossflow.errors import ModelCallError

    def broken(x, t):
        return torch.nn.functional.conv2d(x, torch.zeros(4, 3, 3, 3))  # wants 3 channels

    z = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ModelCallError) as err:
        sample(broken, z, uniform(2))
    text = str(err.value)
    assert "raised RuntimeError" in text and "(2, 1, 8, 8)" in text and "--shape" in text
    assert "\n" not in text and isinstance(err.value.__cause__, RuntimeError)


def test_cli_shape_not_matching_the_model_is_one_line(tmp_path, capsys, user_module):
    # a built-in model samples at the size it was trained on: another --shape is refused first
    code = main(["sample", "--shape", "3,8,8", "--nfe", "2", "--n", "2", "--device", "cpu",
                 "--out", str(tmp_path / "x.png")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--shape 3,8,8 differs from the 1,8,8 samples 'digits' was trained on" in err
    # a user's model that cannot take the shape: its own error, in one line, naming --shape
    user_module("mymodel")
    code = main(["sample", "--model", "mymodel:Net", "--shape", "6", "--nfe", "2", "--n", "2",
                 "--out", str(tmp_path / "y.pt")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "raised RuntimeError" in err and "(2, 6)" in err and "--shape" in err


def test_two_schedule_files_of_one_name_are_both_seen(tmp_path, capsys):
    """a/schedule_nfe2.json and b/schedule_nfe2.json: the second silently replaced the first."""
    for folder, inner in (("a", 0.3), ("b", 0.6)):
        (tmp_path / folder).mkdir()
        Schedule([0.0, inner, 1.0], method="bellman").save(tmp_path / folder / "schedule_nfe2.json")
    files = [str(tmp_path / f / "schedule_nfe2.json") for f in ("a", "b")]
    args = ["evaluate", "--model", "spiral", "--samples", "4", "--reference-steps", "10"]
    args += ["--schedule", files[0], "--schedule", files[1], "--out", str(tmp_path / "ev")]
    assert main(args) == 2
    assert "two schedules would both be reported as bellman at 2 NFE" in capsys.readouterr().err


def test_evaluate_warns_when_the_base_is_not_the_straightened_models_teacher(tmp_path, capsys):
    """The reference is the given base's fine solve: another base than the teacher (another
    --checkpoint of the same architecture) loads without complaint and measures the wrong thing."""
    from bossflow.pretrained import save_pretrained
    from bossflow.straighten import StraightenConfig, make_pairs, save_straightened, straighten

    base = load_digits_field()
    schedule = Schedule([0.0, 0.4, 1.0])
    pairs = make_pairs(base, NoiseSource((1, 8, 8), 0), schedule, tmp_path / "pairs", 10, 8)
    config = StraightenConfig(iterations=2, batch_size=4, holdout=2, eval_every=0)
    saved = save_straightened(straighten(base, pairs, schedule, config), tmp_path / "m.safetensors")
    other = load_digits_field()
    with torch.no_grad():
        next(other.parameters()).add_(0.1)
    save_pretrained(other, tmp_path, "other", {"note": "another base of the same architecture"})
    args = ["evaluate", "--finetuned", str(saved), "--nfe", "2", "--samples", "4"]
    args += ["--reference-steps", "10", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "same")]) == 0
    assert "straightened from another model" not in capsys.readouterr().err
    assert (
        main([*args, "--checkpoint", str(tmp_path / "other.json"), "--out", str(tmp_path / "x")])
        == 0
    )
    assert "straightened from another model than 'digits:" in capsys.readouterr().err
    warnings = json.loads((tmp_path / "x" / "results.json").read_text())["warnings"]
    assert any("not its teacher's" in w for w in warnings)


@pytest.mark.slow
def test_uncentred_data_is_scored_and_drawn_in_zero_one(tmp_path):
    """Church/Bedroom-style models sample in [0, 1]: PSNR was 6 dB high (range 2 assumed) and
    their grids washed out; evaluate now uses the model's range, as sample does."""
    fixtures = Path(__file__).parent / "fixtures" / "rectified_flow"
    config = json.loads((fixtures / "tiny_cifar_like.json").read_text())["config"]
    config["data"]["centered"] = False
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    model = ("--model", f"rectified-flow:{tmp_path / 'tiny.json'}", "--device", "cpu")
    weights = ("--checkpoint", fixtures / "tiny_cifar_like_checkpoint.pth")
    args = ("evaluate", *model, *weights, "--nfe", 2, "--samples", 2, "--reference-steps", 4)
    assert main([str(a) for a in (*args, "--quiet", "--out", tmp_path / "ev")]) == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    (record,) = results["records"]
    assert results["data_range"] == 1.0
    assert record["psnr"] == pytest.approx(10 * math.log10(1.0 / record["mse_to_reference"]))


def test_a_diverged_method_is_a_row_not_the_end_of_the_evaluation():
    from bossflow.metrics import evaluate_samples

    data = torch.randn(32, 4)
    good = torch.randn(8, 4)
    bad = good.clone()
    bad[0, 0] = float("inf")
    ok = evaluate_samples(good, good, data, None, "uniform", 2, 0.1)
    diverged = evaluate_samples(bad, good, data, None, "uniform", 2, 0.1)
    assert ok.frechet is not None and ok.frechet > 0
    assert math.isnan(diverged.frechet) and diverged.mse_to_reference == float("inf")


@pytest.mark.parametrize("where", ["cli", "demo"])
def test_one_evaluation_sample_is_refused_before_the_work(tmp_path, capsys, where):
    """The Fréchet distance needs two samples: refused up front, not after the reference solve."""
    from bossflow.pipeline import DemoConfig

    if where == "demo":
        with pytest.raises(ConfigError, match="eval_samples 1: the Fréchet distance needs"):
            DemoConfig(eval_samples=1)
        return
    assert main(["evaluate", "--nfe", "2", "--samples", "1", "--out", str(tmp_path / "e")]) == 2
    assert "--samples 1: the Fréchet distance on digits needs at least 2" in capsys.readouterr().err
