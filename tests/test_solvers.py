import numpy as np
import pytest
import torch

import bossflow
from bossflow import Schedule, edm, uniform
from bossflow.errors import ConfigError, ModelOutputError
from bossflow.field import AffineGaussianField, NFECounter, SpiralField
from bossflow.solvers import nfe_for, reference_solve, sample


@pytest.fixture
def z():
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("schedule", [uniform(1), uniform(3), edm(5), Schedule([0, 0.01, 0.9, 1])])
def test_euler_exact_on_straight_field(z, schedule):
    field = AffineGaussianField(scale=0.4, shift=torch.tensor([1.0, -2.0, 0.5, 3.0]))
    out = sample(field, z, schedule)
    torch.testing.assert_close(out, field.exact(z, 1.0), rtol=1e-12, atol=1e-12)


def errors(solver, z, field, ks):
    exact = field.exact(z, 1.0)
    return [float((sample(field, z, uniform(k), solver=solver) - exact).abs().max()) for k in ks]


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2), ("midpoint", 2)])
def test_convergence_order_on_curved_field(z, solver, order):
    field = SpiralField(rate=0.5, omega=3.0)
    ks = [50, 100, 200, 400]
    errs = errors(solver, z, field, ks)
    slopes = -np.diff(np.log(errs)) / np.log(2)
    assert np.allclose(slopes, order, atol=0.1), slopes


def test_callback_sees_every_step_and_return_type_is_fixed(z):
    seen = []
    field = NFECounter(SpiralField())
    out = sample(field, z, edm(4), callback=seen.append)
    assert isinstance(out, torch.Tensor) and out.shape == z.shape
    assert [s["i"] for s in seen] == [0, 1, 2, 3]
    assert seen[0]["t"] == 0.0 and seen[-1]["t_next"] == 1.0
    torch.testing.assert_close(seen[-1]["x_next"], out)
    assert field.nfe == 4 and field.samples == 32
    field.reset()
    sample(field, z, uniform(3), solver="heun")
    assert field.nfe == nfe_for("heun", 3) == 6


def test_dtype_device_and_no_grad():
    w = torch.nn.Linear(4, 4)
    field = lambda x, t: w(x)  # noqa: E731
    z = torch.randn(3, 4)
    out = sample(field, z, uniform(2))
    assert out.dtype == torch.float32 and not out.requires_grad
    out = sample(field, z, uniform(2), grad=True)
    assert out.requires_grad
    z64 = z.double()
    w.double()
    assert sample(field, z64, uniform(2)).dtype == torch.float64
    # bf16 states and a field answering in float32 (e.g. it concatenates a float32 time): the
    # solve stays in the states' dtype, every solver and the reference solve alike
    w.float()
    zb = z.bfloat16()
    upcast = lambda x, t: w(x.float())  # noqa: E731
    for solver in ("euler", "heun", "midpoint", "ab2", "ab3"):
        assert sample(upcast, zb, uniform(4), solver=solver).dtype == torch.bfloat16, solver
    assert reference_solve(upcast, zb, steps=4).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match=r"for a NoiseSource pass noise.take\(B\)"):
        sample(field, bossflow.NoiseSource((4,), seed=0), uniform(2))


def test_reference_solves(z):
    field = SpiralField(rate=0.3, omega=2.0)
    exact = field.exact(z, 1.0)
    assert (reference_solve(field, z, steps=2000) - exact).abs().max() < 5e-3
    assert (reference_solve(field, z, method="heun", steps=200) - exact).abs().max() < 3e-4
    dopri = reference_solve(field, z, method="dopri5", rtol=1e-9, atol=1e-9)
    assert (dopri - exact).abs().max() < 1e-6


def test_bad_inputs(z):
    with pytest.raises(ConfigError, match="euler"):
        sample(SpiralField(), z, uniform(2), solver="rk4")
    with pytest.raises(bossflow.errors.ScheduleError, match="strictly increasing"):
        sample(SpiralField(), z, [0.0, 0.6, 0.4, 1.0])
    with pytest.raises(ModelOutputError, match="NaN"):
        sample(lambda x, t: torch.full_like(x, float("inf")), z, uniform(2))
    with pytest.raises(ModelOutputError, match="returned tuple"):
        sample(lambda x, t: (x,), z, uniform(2))
    with pytest.raises(ConfigError, match="give one scale per step: 2 steps, 1 scales"):
        sample(SpiralField(), z, uniform(2), scales=[1.0])
    with pytest.raises(ConfigError, match="scales must be finite numbers, got nan"):
        sample(SpiralField(), z, uniform(2), scales=[1.0, float("nan")])  # was NaN samples


def test_diffusers_scheduler_follows_our_euler_steps(z):
    diffusers = pytest.importorskip(
        "diffusers", reason="diffusers not installed (extra 'diffusers')"
    )
    from bossflow.field import DiffusersField

    field = SpiralField(rate=0.4, omega=2.5)
    schedule = edm(6)
    ours = sample(field, z, schedule)

    class NoisePredictor(torch.nn.Module):
        # a diffusers-convention model: timestep = 1000 * sigma, predicts noise - data = -v
        def forward(self, x, timestep):
            t = 1.0 - timestep / 1000.0
            return -field(x, t)

    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(sigmas=schedule.to_diffusers_sigmas())
    x = z.clone()
    model = NoisePredictor()
    for timestep in sched.timesteps:
        x = sched.step(model(x, timestep.expand(x.shape[0]).double()), timestep, x).prev_sample
    torch.testing.assert_close(x, ours, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sched.sigmas.numpy(), 1.0 - schedule.times, atol=1e-7)
    # and our adapter, fed the same model, gives our field back
    torch.testing.assert_close(sample(DiffusersField(model), z, schedule), ours)


# -- variable-step Adams-Bashforth -------------------------------------------------------------
class _TimeOnly(torch.nn.Module):
    """v(x, t) = p(t), a polynomial in t alone: the trajectory is its integral (closed form)."""

    def __init__(self, coefficients):
        super().__init__()
        self.c = coefficients  # p(t) = sum_i c_i t^i

    def forward(self, x, t):
        tt = t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return sum(c * tt**i for i, c in enumerate(self.c)) * torch.ones_like(x)

    def integral(self, a, b):
        return sum(c * (b ** (i + 1) - a ** (i + 1)) / (i + 1) for i, c in enumerate(self.c))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_adams_bashforth_weights_integrate_polynomials_of_their_degree_exactly(order):
    from bossflow.solvers import adams_bashforth_weights

    rng = np.random.default_rng(order)
    for _ in range(20):
        nodes = list(np.sort(rng.uniform(0, 0.6, size=order)))
        t_next = nodes[-1] + rng.uniform(0.01, 0.4)
        coefficients = rng.normal(size=order)  # degree order - 1
        poly = _TimeOnly(list(coefficients))
        weights = adams_bashforth_weights(nodes, t_next)
        values = [sum(c * n**i for i, c in enumerate(coefficients)) for n in nodes]
        approx = sum(w * f for w, f in zip(weights, values))
        assert approx == pytest.approx(poly.integral(nodes[-1], t_next), rel=1e-11, abs=1e-12)


def test_ab2_on_variable_steps_matches_a_hand_computed_solve():
    field = lambda x, t: -x + t.view(-1, 1)  # noqa: E731
    x0 = torch.tensor([[1.0], [-0.5]], dtype=torch.float64)
    f = lambda x, t: -x + t  # noqa: E731
    x1 = x0 + 0.2 * f(x0, 0.0)
    f0, f1 = f(x0, 0.0), f(x1, 0.2)
    x2 = x1 + 0.3 * ((1 + 0.3 / 0.4) * f1 - (0.3 / 0.4) * f0)
    f2 = f(x2, 0.5)
    x3 = x2 + 0.5 * ((1 + 0.5 / 0.6) * f2 - (0.5 / 0.6) * f1)
    got = sample(field, x0, [0.0, 0.2, 0.5, 1.0], solver="ab2")
    torch.testing.assert_close(got, x3, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("order", [2, 3])
def test_adams_bashforth_is_exact_after_its_start_on_polynomial_trajectories(order):
    times = [0.0, 0.1, 0.25, 0.45, 0.7, 1.0]
    field = _TimeOnly([0.3, -1.2, 0.8][:order])  # trajectory: a polynomial of degree `order`
    x0 = torch.zeros(3, 2, dtype=torch.float64)
    got = sample(field, x0, times, solver=f"ab{order}")
    # the first step is Euler and (for ab3) the second ab2; each is exact on lower degrees only,
    # so compute those start-up increments and add the exact integral from there on
    f = [float(field(x0[:1], torch.tensor([t], dtype=torch.float64))[0, 0]) for t in times]
    start = 0.1 * f[0]
    exact_from = 1
    if order == 3:
        start += 0.15 * ((1 + 0.15 / 0.2) * f[1] - (0.15 / 0.2) * f[0])
        exact_from = 2
    expected = start + field.integral(times[exact_from], 1.0)
    torch.testing.assert_close(got, torch.full_like(got, expected), rtol=1e-12, atol=1e-12)
    # Euler is not exact here: the test can tell the difference
    euler_x = sample(field, x0, times, solver="euler")
    assert float((euler_x - got).abs().max()) > 1e-3


@pytest.mark.parametrize("solver, per_step", [("ab2", 1), ("ab3", 1), ("euler", 1), ("heun", 2)])
def test_multistep_solvers_count_one_evaluation_per_step(solver, per_step):
    field = NFECounter(SpiralField())
    sample(field, torch.ones(2, 4), uniform(5), solver=solver)
    assert field.nfe == nfe_for(solver, 5) == 5 * per_step


def test_sample_is_differentiable_in_learned_times_and_scales():
    field = SpiralField(rate=-0.3, omega=2.0)
    x0 = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    inner = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    scales = torch.tensor([1.0, 0.9, 1.1], dtype=torch.float64, requires_grad=True)

    def loss(inner, scales):
        times = torch.cat([inner.new_zeros(1), inner, inner.new_ones(1)])
        return sample(field, x0, times, solver="ab2", scales=scales, grad=True).pow(2).sum()

    torch.autograd.gradcheck(loss, (inner, scales))


def test_sampling_runs_a_module_in_eval_mode_and_gives_its_modes_back():
    """A freshly built module is in training mode: dropout made every sample (and cost matrix)
    random and BatchNorm updated its running statistics while sampling."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin, self.norm = nn.Linear(3, 16), nn.BatchNorm1d(16)
            self.drop, self.out = nn.Dropout(0.5), nn.Linear(16, 2)

        def forward(self, x, t):
            return self.out(self.drop(self.norm(self.lin(torch.cat([x, t[:, None]], 1)))))

    net = Net()
    net.norm.eval()  # a submodule its owner froze stays frozen afterwards
    stats = net.norm.running_mean.clone()
    z = torch.randn(8, 2)
    first = sample(net, z, uniform(4))
    assert torch.equal(sample(net, z, uniform(4)), first)  # no dropout
    assert net.training and not net.norm.training
    net.norm.train()
    assert torch.equal(sample(net, z, uniform(4)), first)
    assert torch.equal(net.norm.running_mean, stats)  # not updated by sampling
    assert net.training and net.drop.training and net.norm.training
    net.eval()
    assert torch.equal(sample(net, z, uniform(4)), first)
    assert not net.training
