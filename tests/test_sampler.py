"""Samplers: times + per-step scales + a solver, as a value object with JSON and exporters."""

import json

import numpy as np
import pytest
import torch

import bossflow
from bossflow.errors import ConfigError, ScheduleError
from bossflow.field import NFECounter, SpiralField
from bossflow.sampler import Sampler, load_schedule
from bossflow.schedule import Schedule, uniform
from bossflow.solvers import sample


def _random_sampler(seed=0, solver="ab2", steps=5):
    rng = np.random.default_rng(seed)
    times = np.concatenate([[0.0], np.sort(rng.uniform(size=steps - 1)), [1.0]])
    scales = rng.uniform(0.5, 1.5, size=steps)
    return Sampler(times, solver, scales, method="learned", provenance={"model": "digits"})


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "ab2", "ab3"])
def test_json_round_trip_is_bit_for_bit(tmp_path, solver):
    s = _random_sampler(3, solver)
    s.save(tmp_path / "s.json")
    back = load_schedule(tmp_path / "s.json")
    assert isinstance(back, Sampler) and back == s
    assert back.times.tobytes() == s.times.tobytes() and back.scales.tobytes() == s.scales.tobytes()
    no_scales = Sampler(s.times, solver)
    no_scales.save(tmp_path / "n.json")
    assert Sampler.load(tmp_path / "n.json") == no_scales


def test_load_schedule_reads_every_schedule_file(tmp_path):
    bellman = Schedule([0.0, 0.3, 1.0], method="bellman", indices=(0, 3, 10), cost=0.5)
    bellman.save(tmp_path / "b.json")
    assert load_schedule(tmp_path / "b.json") == bellman
    (tmp_path / "list.json").write_text("[0, 0.5, 1]")
    assert load_schedule(tmp_path / "list.json") == Schedule([0.0, 0.5, 1.0])
    # a plain schedule becomes an Euler sampler when read as one
    assert Sampler.load(tmp_path / "b.json") == Sampler.from_schedule(bellman)
    assert bossflow.load_schedule is load_schedule


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"format": "bossflow.sampler/2"}, "newer bossflow"),
        ({"times": [0.0, 0.6, 0.4, 1.0]}, "strictly increasing"),
        ({"scales": [1.0, float("nan"), 1.0]}, "finite and positive"),
        ({"scales": [1.0, -0.5, 1.0]}, "finite and positive"),
        ({"scales": [1.0, 1.0]}, "needs 3 scales"),
        ({"solver": "rk4"}, "unknown solver"),
    ],
)
def test_bad_sampler_files_give_one_clear_error(tmp_path, edit, match):
    data = Sampler([0.0, 0.4, 0.6, 1.0], "ab2", [1.0, 1.0, 1.0]).to_dict() | edit
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data).replace("NaN", '"nan"'))
    with pytest.raises(ScheduleError, match=match) as err:
        load_schedule(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("times", [[0, "a", 1], [0, {}, 1], [0, 0.5]])
def test_a_list_of_times_that_is_not_one_is_a_schedule_error_naming_the_file(tmp_path, times):
    """[0, "a", 1] raised numpy's ValueError and [0, {}, 1] a TypeError: CLI tracebacks."""
    path = tmp_path / "times.json"
    path.write_text(json.dumps(times))
    for load in (load_schedule, Schedule.load):
        with pytest.raises(ScheduleError, match="times.json: "):
            load(path)


def test_newer_schedule_format_and_sampler_as_schedule_are_refused(tmp_path):
    data = uniform(3).to_dict() | {"format": "bossflow.schedule/7"}
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="newer bossflow"):
        load_schedule(tmp_path / "s.json")
    with pytest.raises(ScheduleError, match="newer bossflow"):
        Schedule.load(tmp_path / "s.json")
    _random_sampler().save(tmp_path / "x.json")
    with pytest.raises(ScheduleError, match="sampler file"):
        Schedule.load(tmp_path / "x.json")


@pytest.mark.parametrize("solver, per_step", [("euler", 1), ("ab2", 1), ("ab3", 1), ("heun", 2)])
def test_sample_runs_a_sampler_with_exactly_its_nfe(solver, per_step):
    s = _random_sampler(1, solver, steps=4)
    field = NFECounter(SpiralField())
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    x = bossflow.sample(field, z, s)
    assert field.nfe == s.nfe == 4 * per_step
    assert torch.equal(x, sample(SpiralField(), z, s.times, solver=solver, scales=s.scales))
    with pytest.raises(ConfigError, match="made for the"):
        sample(field, z, s, solver="midpoint" if solver != "midpoint" else "euler")


def test_scales_scale_each_step():
    field = SpiralField()
    z = torch.ones(2, 2, dtype=torch.float64)
    s = Sampler([0.0, 0.5, 1.0], "euler", [2.0, 1.0])
    x1 = z + 2.0 * 0.5 * field(z, torch.zeros(2))
    expected = x1 + 0.5 * field(x1, torch.full((2,), 0.5))
    torch.testing.assert_close(sample(field, z, s), expected, rtol=0, atol=1e-15)


def test_exports_only_for_plain_euler():
    plain = Sampler([0.0, 0.25, 1.0], "euler", [1.0, 1.0])
    assert plain.to_diffusers_sigmas() == Schedule([0.0, 0.25, 1.0]).to_diffusers_sigmas()
    assert plain.to_time_grid().tolist() == [0.0, 0.25, 1.0]
    # times at least float32 beside bf16 states (bf16 made 0.996 and 0.998 one time)
    close = Schedule([0.0, 0.5, 0.996, 0.998, 1.0]).to_time_grid(
        torch.zeros(1, dtype=torch.bfloat16)
    )
    assert close.dtype == torch.float32 and close.unique().numel() == 5
    grid64 = plain.to_time_grid(torch.zeros(1, dtype=torch.float64))
    assert grid64.dtype == torch.float64
    for other in (Sampler([0.0, 0.25, 1.0], "ab2"), Sampler([0.0, 0.25, 1.0], "euler", [1.2, 1])):
        with pytest.raises(ConfigError, match="bossflow.sample"):
            other.to_diffusers_sigmas()
        with pytest.raises(ConfigError, match="bossflow.sample"):
            other.to_time_grid()


def test_cli_samples_and_evaluates_a_sampler_file_with_its_own_solver(tmp_path, capsys):
    from bossflow.cli import main
    from bossflow.noise import STAGE_OFFSETS, NoiseSource, OffsetNoise
    from bossflow.pretrained import load_digits_field
    from bossflow.solvers import reference_solve

    s = Sampler([0.0, 0.3, 0.7, 1.0], "ab2", [0.9, 1.1, 1.0], method="learned")
    s.save(tmp_path / "learned_nfe3.json")
    args = ["--schedule", str(tmp_path / "learned_nfe3.json"), "--device", "cpu"]
    assert main(["sample", *args, "--n", "4", "--out", str(tmp_path / "x.png")]) == 0
    assert "(ab2)" in capsys.readouterr().out
    out = tmp_path / "eval"
    assert main(["evaluate", *args, "--samples", "4", "--reference-steps", "10",
                 "--out", str(out)]) == 0  # fmt: skip
    (record,) = json.loads((out / "results.json").read_text())["records"]
    assert record["method"] == "learned" and record["nfe"] == 3
    field = load_digits_field()
    noise = OffsetNoise(NoiseSource((1, 8, 8), seed=0), STAGE_OFFSETS["eval"]).take(4)
    expected = (sample(field, noise, s) - reference_solve(field, noise, steps=10)).pow(2).mean()
    assert record["mse_to_reference"] == pytest.approx(float(expected), rel=1e-5)
    assert main(["evaluate", *args, "--solver", "heun", "--out", str(tmp_path / "e2")]) == 2
    assert "made for the ab2 solver" in capsys.readouterr().err


def test_a_sampler_json_without_format_keeps_its_solver_and_scales(tmp_path):
    """Written by hand without "format": load_schedule read it as a plain Euler schedule."""
    import json

    path = tmp_path / "s.json"
    path.write_text(json.dumps({"solver": "ab2", "times": [0, 0.4, 1], "scales": [0.8, 0.9]}))
    s = load_schedule(path)
    assert isinstance(s, Sampler) and s.solver == "ab2" and s.scales.tolist() == [0.8, 0.9]
    with pytest.raises(ScheduleError, match="a sampler, not a plain schedule"):
        Schedule.from_dict({"solver": "ab2", "times": [0, 0.4, 1]})
    with pytest.raises(ScheduleError, match="versions start at 1"):
        Schedule.from_dict({"format": "bossflow.schedule/0", "times": [0, 1]})
