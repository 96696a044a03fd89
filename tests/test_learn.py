"""Learned samplers: times and per-step scales fitted to the final error, the network frozen."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from bossflow.errors import CheckpointError, ConfigError
from bossflow.field import NFECounter, SpiralField
from bossflow.learn import (
    LearnConfig,
    learn_best_sampler,
    learn_sampler,
    sampler_error,
    significant_gain,
    steps_for,
)
from bossflow.sampler import Sampler
from bossflow.schedule import Schedule, uniform
from bossflow.solvers import sample


@pytest.fixture(scope="module")
def spiral():
    """A curved analytic flow with its exact endpoints as the teacher."""
    field = SpiralField(rate=0.4, omega=2.5)
    z = torch.randn(96, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return field, z, field.exact(z, 1.0)


def _late_push(x, t):
    """dx/dt = -x + 4 t^3: the velocity changes fast near t = 1, so the times matter."""
    return -x + 4 * t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype) ** 3


@pytest.fixture(scope="module")
def late_push():
    z = torch.randn(96, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return _late_push, z, sample(_late_push, z, uniform(2000))


def cfg(**kw):
    base = dict(iterations=60, batch_size=32, lr=0.1, eval_every=5, patience=0, holdout=32)
    return LearnConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "case, solver, factor",
    # measured: late_push 3.7e3x (euler), 1.1e6x (ab2); spiral 2.2e3x (ab2). Euler cannot turn the
    # spiral's phase without growing its modulus: there it gains only 1.14x, as it should
    [("late_push", "euler", 0.01), ("late_push", "ab2", 0.01), ("spiral", "ab2", 0.01)],
)
def test_learning_lowers_the_heldout_final_error(case, solver, factor, request):
    field, z, teacher = request.getfixturevalue(case)
    result = learn_sampler(field, z, teacher, 3, cfg(solver=solver))
    s = result.sampler
    assert isinstance(s, Sampler) and s.solver == solver and s.nfe == 3 and s.method == "learned"
    assert result.initial_heldout_error == pytest.approx(
        sampler_error(field, z[-32:], teacher[-32:], Sampler(uniform(3).times, solver))
    )
    assert result.heldout_error == pytest.approx(sampler_error(field, z[-32:], teacher[-32:], s))
    assert result.heldout_error < factor * result.initial_heldout_error
    assert result.best_iteration > 0 and s.provenance["heldout_error"] == result.heldout_error
    counter = NFECounter(field)
    sample(counter, z[:4], s)
    assert counter.nfe == 3


def test_scales_only_keeps_the_initial_times(spiral):
    field, z, teacher = spiral
    init = uniform(3)
    result = learn_sampler(field, z, teacher, 3, cfg(learn_times=False), init=init)
    np.testing.assert_allclose(result.sampler.times, init.times, atol=1e-15)
    assert not np.allclose(result.sampler.scales, 1.0)
    plain = learn_sampler(field, z, teacher, 3, cfg(scales=False, iterations=10))
    assert plain.sampler.scales is None and plain.sampler.is_plain_euler
    assert len(plain.sampler.to_diffusers_sigmas()) == 3  # plain Euler exports


def test_each_batch_gradient_is_that_batchs_alone(spiral):
    """Times kept fixed are not the optimizer's, so nothing cleared their gradient: it summed
    over iterations (and doubled per iteration under two ranks' all-reduce)."""
    from bossflow.learn import _batch_backward

    field, z, teacher = spiral
    theta = torch.log(torch.full((3,), 1 / 3, dtype=torch.float64)).requires_grad_()
    phi = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    rows = np.arange(8)
    args = (
        field,
        z,
        teacher,
        rows,
        theta,
        phi,
        "euler",
        lambda x, y: (x - y).pow(2).flatten(1).mean(1),
    )
    _batch_backward(*args, lambda rows: None)
    once = theta.grad.clone(), phi.grad.clone()
    _batch_backward(*args, lambda rows: None)
    torch.testing.assert_close((theta.grad, phi.grad), once)


def test_a_resumed_run_gives_the_uninterrupted_result(spiral, tmp_path):
    field, z, teacher = spiral
    config = cfg(iterations=30)
    full = learn_sampler(field, z, teacher, 2, config, out_dir=tmp_path / "a")

    class Flaky(type(field)):  # the same field (same constants), interrupted on call 40
        calls = 0

        def forward(self, x, t):
            Flaky.calls += 1
            if Flaky.calls == 40:
                raise KeyboardInterrupt
            return field(x, t)

    with pytest.raises(KeyboardInterrupt):
        learn_sampler(Flaky(rate=0.4, omega=2.5), z, teacher, 2, config, out_dir=tmp_path / "b")
    resumed = learn_sampler(field, z, teacher, 2, config, out_dir=tmp_path / "b")
    assert resumed.sampler.times.tobytes() == full.sampler.times.tobytes()
    assert resumed.sampler.scales.tobytes() == full.sampler.scales.tobytes()
    assert resumed.history == full.history
    with pytest.raises(
        CheckpointError, match=r"another sampler-learning run \(other settings: lr\)"
    ):
        learn_sampler(field, z, teacher, 2, cfg(iterations=30, lr=0.2), out_dir=tmp_path / "b")
    # the teacher solved in other batches (another number of processes) rounds in the last bits:
    # still this run; another teacher is not
    rounded = teacher * (
        1 + 1e-7 * torch.randn(teacher.shape, generator=torch.Generator().manual_seed(0))
    )
    again = learn_sampler(field, z, rounded, 2, config, out_dir=tmp_path / "b")
    assert again.history == full.history  # read from the checkpoint: nothing left to run
    with pytest.raises(CheckpointError, match=r"other teacher endpoints\)"):
        learn_sampler(field, z, 1.01 * teacher, 2, config, out_dir=tmp_path / "b")
    # a checkpoint of the earlier layout (the teacher's exact sum) still resumes
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    del ckpt["identity"]["teacher_norm"]
    ckpt["identity"]["teacher_sum"] = float(teacher.double().sum())
    torch.save(ckpt, tmp_path / "b" / "checkpoint.pt")
    assert (
        learn_sampler(field, z, teacher, 2, config, out_dir=tmp_path / "b").history == full.history
    )
    other = nn.Linear(1, 1)  # another model with the same teacher: not resumed from this one

    def shifted(x, t):
        return field(x, t) + 0 * other.weight.sum()

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.other = other

        def forward(self, x, t):
            return shifted(x, t)

    with pytest.raises(CheckpointError, match=r"another sampler-learning run \(other model\)"):
        learn_sampler(Other(), z, teacher, 2, config, out_dir=tmp_path / "b")
    # a teacher of another step count has nearly the same norm: its description tells them apart
    heun = {"teacher": "heun 200"}
    learn_sampler(field, z, teacher, 2, cfg(iterations=5), out_dir=tmp_path / "c", provenance=heun)
    with pytest.raises(CheckpointError, match=r"\(other teacher solver\)"):
        learn_sampler(field, z, teacher, 2, cfg(iterations=5), out_dir=tmp_path / "c",
                      provenance={"teacher": "heun 100"})  # fmt: skip


def test_early_stopping_and_the_best_parameters(spiral):
    field, z, teacher = spiral
    result = learn_sampler(field, z, teacher, 2, cfg(iterations=400, lr=0.5, patience=2))
    assert result.iterations < 400  # stopped early
    best = min(h["heldout_loss"] for h in result.history)
    assert result.heldout_error == best
    assert result.best_iteration == next(
        h["iteration"] for h in result.history if h["heldout_loss"] == best
    )


def test_best_solver_family_is_chosen_on_heldout_noises(spiral):
    field, z, teacher = spiral
    best, all_results = learn_best_sampler(
        field, z, teacher, 3, ("euler", "heun", "ab2"), cfg(iterations=20)
    )
    assert set(all_results) == {"euler", "ab2"}  # heun cannot spend exactly 3 evaluations
    assert best.heldout_error == min(r.heldout_error for r in all_results.values())
    with pytest.raises(ConfigError, match="none of the solvers"):
        learn_best_sampler(field, z, teacher, 3, ("heun",), cfg(iterations=2))
    # a misspelt family is an error (it was skipped, and ab2 became the preferred family)
    with pytest.raises(ConfigError, match="unknown solver 'eulr'"):
        learn_best_sampler(field, z, teacher, 2, ("eulr", "ab2"), cfg(iterations=2))
    # at NFE 1 Euler and AB2 are one method: the tie keeps the earlier family (it chose ab2)
    tie, both = learn_best_sampler(field, z, teacher, 1, ("euler", "ab2"), cfg(iterations=5))
    assert both["euler"].heldout_error == both["ab2"].heldout_error
    assert tie.sampler.solver == "euler"


def test_a_family_whose_error_is_nan_ranks_last_wherever_it_is_listed(spiral, monkeypatch):
    """min() kept a NaN listed first (nothing is less than NaN): "every learned sampler
    diverged" although ab2 had a finite error."""
    import bossflow.learn as learn

    field, z, teacher = spiral
    real = learn.learn_sampler

    def nan_for_euler(*args, **kwargs):
        result = real(*args, **kwargs)
        solver = args[4].solver
        return replace(result, heldout_error=math.nan) if solver == "euler" else result

    monkeypatch.setattr(learn, "learn_sampler", nan_for_euler)
    best, every = learn_best_sampler(field, z, teacher, 2, ("euler", "ab2"), cfg(iterations=5))
    assert math.isnan(every["euler"].heldout_error) and best.sampler.solver == "ab2"


def test_significant_gain_is_a_paired_test():
    start = torch.ones(100)
    assert significant_gain(start, start - 0.1 + 0.01 * torch.randn(100), 2.0)
    lucky = start.clone()
    lucky[0] = -30.0  # one noise gains a lot, 99 lose a little: the mean gains, not significantly
    worse = start + 0.05
    worse[0] = -30.0
    assert float((start - worse).mean()) > 0
    assert not significant_gain(start, worse, 2.0)
    assert significant_gain(start, worse, 0.0)
    assert not significant_gain(start, start + 0.1, 0.0)


def test_a_gain_that_is_noise_keeps_the_start(spiral):
    """Teacher endpoints drowned in per-noise scatter: what learning finds does not generalise."""
    field, z, exact = spiral
    scatter = 3.0 * torch.randn(
        exact.shape, dtype=exact.dtype, generator=torch.Generator().manual_seed(2)
    )
    teacher = exact + scatter
    loose = learn_sampler(field, z, teacher, 3, cfg(solver="euler", margin=0.0))
    assert loose.best_iteration > 0 and not loose.kept_start  # the held-out pick "improved"
    strict = learn_sampler(field, z, teacher, 3, cfg(solver="euler"))
    assert strict.kept_start and strict.best_iteration == 0
    bellman = Schedule(np.array([0.0, 0.34, 0.66, 1.0]))  # times softmax-cumsum would round
    strict = learn_sampler(field, z, teacher, 3, cfg(solver="euler"), init=bellman)
    assert strict.kept_start and strict.best_iteration == 0
    assert np.array_equal(strict.sampler.times, bellman.times)  # the start, bit for bit
    np.testing.assert_allclose(strict.sampler.scales, 1.0)
    assert strict.sampler.provenance["kept_start"] is True
    # on the clean teacher the same settings learn for real
    assert not learn_sampler(field, z, exact, 3, cfg(solver="ab2")).kept_start


def test_a_custom_metric_is_what_gets_minimised(spiral):
    field, z, teacher = spiral

    def first_coordinate(x, target):
        return (x - target).flatten(1)[:, 0].pow(2)

    result = learn_sampler(field, z, teacher, 2, cfg(iterations=30), metric=first_coordinate)
    got = sampler_error(field, z[-32:], teacher[-32:], result.sampler, metric=first_coordinate)
    assert result.heldout_error == pytest.approx(got)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)

    def forward(self, x, t):
        return self.lin(torch.cat([x, t[:, None].to(x.dtype)], 1))


def test_the_network_stays_frozen():
    torch.manual_seed(0)
    net = _Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    z = torch.randn(40, 4)
    with torch.no_grad():
        teacher = sample(net, z, uniform(50))
    learn_sampler(net, z, teacher, 2, cfg(iterations=5, holdout=8))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad and p.grad is None for p in net.parameters())


def test_bad_inputs_are_clear(spiral):
    field, z, teacher = spiral
    with pytest.raises(ConfigError, match="same shape"):
        learn_sampler(field, z, teacher[:10], 2, cfg())
    with pytest.raises(ConfigError, match="needs 2"):
        learn_sampler(field, z, teacher, 2, cfg(), init=uniform(3))
    with pytest.raises(ConfigError, match="NFE 3 is not possible"):
        steps_for("heun", 3)
    with pytest.raises(ConfigError, match="leaves no training noise"):
        learn_sampler(field, z, teacher, 2, cfg(holdout=96))
    with pytest.raises(ConfigError, match="unknown solver"):
        learn_sampler(field, z, teacher, 2, cfg(solver="rk4"))


def test_teacher_endpoints_are_cached_and_checked(spiral, tmp_path):
    from bossflow.learn import teacher_endpoints

    field, z, _ = spiral
    first = teacher_endpoints(field, z, steps=20, cache=tmp_path / "t.pt")
    torch.testing.assert_close(first, sample(field, z, uniform(20), solver="heun"))

    class Counting(type(field)):  # the same field (same constants), counting its calls
        calls = 0

        def forward(self, x, t):
            Counting.calls += 1
            return super().forward(x, t)

    again = teacher_endpoints(Counting(0.4, 2.5), z, steps=20, cache=tmp_path / "t.pt")
    assert Counting.calls == 0 and torch.equal(again, first)  # read back, not recomputed
    with pytest.raises(CheckpointError, match=r"another step count \(20 there, 30 now\)"):
        teacher_endpoints(field, z, steps=30, cache=tmp_path / "t.pt")
    # analytic fields have no weights: their constants tell them apart (one was reused for all)
    with pytest.raises(CheckpointError, match=r"another model \(weights or how it is called\);"):
        teacher_endpoints(type(field)(0.4, 1.0), z, steps=20, cache=tmp_path / "t.pt")
    later = z.clone()
    later[5] += 1.0  # noises that differ after the first one
    with pytest.raises(CheckpointError, match="another noise; delete it"):
        teacher_endpoints(field, later, steps=20, cache=tmp_path / "t.pt")
    # more noises, the cached ones first: only the new ones are solved
    more = torch.cat([z, torch.randn(3, *z.shape[1:], dtype=z.dtype)])
    Counting.calls = 0
    grown = teacher_endpoints(Counting(0.4, 2.5), more, steps=20, cache=tmp_path / "t.pt")
    assert Counting.calls == 2 * 20  # one batch of the 3 new noises, 20 Heun steps
    assert torch.equal(grown[: len(z)], first)
    torch.testing.assert_close(grown, sample(field, more, uniform(20), solver="heun"))
    assert torch.equal(teacher_endpoints(field, more, steps=20, cache=tmp_path / "t.pt"), grown)
    with pytest.raises(CheckpointError, match=r"another noise, noise count \(\d+ there, 4 now\)"):
        teacher_endpoints(field, z[:4], steps=20, cache=tmp_path / "t.pt")  # fewer: not checked


@pytest.mark.slow
def test_cli_learns_samplers_beside_the_bellman_schedules(tmp_path, capsys):
    import json

    from bossflow.cli import main
    from bossflow.sampler import load_schedule

    out = tmp_path / "s"
    args = ["schedule", "--method", "learned", "--nfe", "2,3", "--kmax", "12", "--samples", "24",
            "--teacher-steps", "10", "--learn-iterations", "6", "--solvers", "euler,heun,ab2",
            "--out", str(out), "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    for k in (2, 3):
        sampler = load_schedule(out / f"learned_nfe{k}.json")
        assert isinstance(sampler, Sampler) and sampler.nfe == k
        assert sampler.provenance["model"] == "digits"
        assert (out / f"schedule_nfe{k}.json").exists()
    assert not (out / "schedule_nfe1.json").exists()  # heun's 1-step start is not a budget asked
    assert "heun" in printed and "*" in printed
    # rerunning resumes everything (cost matrix, teacher, learning) to the same files
    before = json.loads((out / "learned_nfe3.json").read_text())
    assert main(args) == 0
    assert json.loads((out / "learned_nfe3.json").read_text()) == before
    assert main([*args[:-5], "--solvers", "heun", "--nfe", "3", "--out", str(out)]) == 2
    assert "can spend exactly 3" in capsys.readouterr().err
