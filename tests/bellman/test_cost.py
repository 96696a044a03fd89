import numpy as np
import pytest
import torch

import bossflow
from bossflow.bellman import CostMatrix, cost_matrix
from bossflow.checkpoint import module_fingerprint
from bossflow.errors import CheckpointError, ConfigError, ModelOutputError
from bossflow.field import AffineGaussianField, SpiralField
from bossflow.noise import NoiseSource


def naive_cost(field, noise, times):
    """Per-pair loop straight from paper eq. 5, float64."""
    x = noise.double()
    states, vels = [x], []
    for i in range(len(times) - 1):
        v = field(states[-1], torch.full((x.shape[0],), float(times[i]), dtype=x.dtype))
        vels.append(v)
        states.append(states[-1] + float(times[i + 1] - times[i]) * v)
    n1 = len(times)
    c = np.zeros((n1, n1))
    for i in range(n1 - 1):
        for j in range(i + 1, n1):
            r = states[i] + float(times[j] - times[i]) * vels[i] - states[j]
            c[i, j] = float(r.pow(2).flatten(1).sum(1).mean())
    return c


def rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture
def noise():
    return torch.randn(24, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_matches_naive_loop_and_closed_form_on_spiral(noise):
    field = SpiralField(rate=0.7, omega=4.0)
    cm = cost_matrix(field, noise, grid=30, batch_size=7)
    naive = naive_cost(field, noise, cm.grid.times)
    assert rel_err(cm.values, naive) < 1e-9
    exact = field.euler_cost_matrix(noise, torch.tensor(cm.grid.times)).numpy()
    assert rel_err(cm.values, exact) < 1e-9
    assert cm.count == 24 and cm.values.shape == (31, 31)
    # c[i, i+1] = 0 by construction, nothing below the diagonal
    assert np.abs(np.diagonal(cm.values, 1)).max() < 1e-12 * cm.values.max()
    assert (np.tril(cm.values) == 0).all()


def test_direct_metric_path_matches_fast_path_on_nonuniform_grid(noise):
    field = SpiralField()
    grid = bossflow.edm(12)
    fast = cost_matrix(field, noise, grid=grid, batch_size=5)
    direct = cost_matrix(field, noise, grid=grid, batch_size=5, metric="sq_l2_direct")
    assert rel_err(fast.values, direct.values) < 1e-9
    assert rel_err(fast.values, naive_cost(field, noise, grid.times)) < 1e-9


def test_custom_callable_metric(noise):
    def l1(pred, target):
        return (pred - target).abs().flatten(1).sum(1)

    cm = cost_matrix(SpiralField(), noise, grid=6, metric=l1)
    named = cost_matrix(SpiralField(), noise, grid=6, metric="l1")
    np.testing.assert_allclose(cm.values, named.values, rtol=1e-12)
    assert cm.metric == "l1" and cm.values[0, 6] > 0


def test_zero_for_straight_field(noise):
    field = AffineGaussianField(scale=0.3, shift=2.0)
    cm = cost_matrix(field, noise, grid=20)
    scale = float(field.exact(noise, 1.0).pow(2).flatten(1).sum(1).mean())  # squared norm of data
    # zero up to float64 rounding of the states (the Gram path works at that scale)
    assert np.abs(cm.values).max() < 1e-13 * scale
    direct = cost_matrix(field, noise, grid=20, metric="sq_l2_direct")
    assert np.abs(direct.values).max() < 1e-25 * scale


def test_same_result_in_one_batch_or_many(noise):
    field = SpiralField()
    one = cost_matrix(field, noise, grid=15, batch_size=24)
    many = cost_matrix(field, noise, grid=15, batch_size=5)
    np.testing.assert_allclose(many.values, one.values, rtol=1e-13, atol=0)
    np.testing.assert_allclose(many.sumsq, one.sumsq, rtol=1e-13)


def test_noise_source_makes_results_independent_of_batch_size():
    src = NoiseSource((4,), seed=3, dtype=torch.float64)
    field = SpiralField()
    a = cost_matrix(field, src, grid=10, batch_size=3, samples=10)
    b = cost_matrix(field, src, grid=10, batch_size=10, samples=10)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-13)
    assert torch.equal(src.take(4, start=6), src(range(10))[6:])


class Interrupt(BaseException):
    """A simulated interruption (like KeyboardInterrupt): not an error of the model."""


def test_resume_after_interruption_gives_uninterrupted_result(noise, tmp_path):
    field = SpiralField()
    calls = {"n": 0}

    def flaky(x, t):
        calls["n"] += 1
        if calls["n"] == 3 * 10 + 4:  # during the 4th batch of 10-step trajectories
            raise Interrupt
        return field(x, t)

    cache = tmp_path / "cost.npz"
    with pytest.raises(Interrupt):
        cost_matrix(flaky, noise, grid=10, batch_size=5, cache=cache)
    partial = CostMatrix.load(cache)
    assert partial.count == 15
    calls["n"] = 10**9  # no more interruptions
    resumed = cost_matrix(flaky, noise, grid=10, batch_size=5, cache=cache)
    full = cost_matrix(field, noise, grid=10, batch_size=5)
    np.testing.assert_allclose(resumed.values, full.values, rtol=1e-13)
    assert resumed.count == 24


def test_partial_results_merge(noise):
    field = SpiralField()
    a = cost_matrix(field, noise[:10], grid=8)
    b = cost_matrix(field, noise[10:], grid=8)
    whole = cost_matrix(field, noise, grid=8)
    merged = a.merge(b)
    assert merged.count == 24
    with pytest.raises(bossflow.errors.CostMatrixError, match="count those samples twice"):
        a.merge(cost_matrix(field, noise[:10], grid=8))  # the same noises again
    np.testing.assert_allclose(merged.values, whole.values, rtol=1e-13)
    np.testing.assert_allclose(merged.stderr, whole.stderr, rtol=1e-9)


def test_save_load_round_trip_and_corrupt_cache(noise, tmp_path):
    cm = cost_matrix(SpiralField(), noise, grid=5, meta={"model": "spiral"})
    cm.save(tmp_path / "c.npz")
    back = CostMatrix.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(back.values, cm.values)
    assert back.meta == {"model": "spiral"} and back.count == cm.count
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable"):
        cost_matrix(SpiralField(), noise, grid=5, cache=tmp_path / "bad.npz")
    with pytest.raises(CheckpointError, match="another grid"):
        cost_matrix(SpiralField(), noise, grid=6, cache=tmp_path / "c.npz")


def test_model_errors_are_clear(noise):
    with pytest.raises(ModelOutputError, match="NaN"):
        cost_matrix(lambda x, t: x * float("nan"), noise, grid=4)
    with pytest.raises(ModelOutputError, match="shape"):
        cost_matrix(lambda x, t: x[:, :1], noise, grid=4)
    with pytest.raises(ModelOutputError, match="returned tuple.*wrap it with an adapter"):
        cost_matrix(lambda x, t: (x, None), noise, grid=4)
    with pytest.raises(ConfigError, match="unknown metric"):
        cost_matrix(SpiralField(), noise, grid=4, metric="lpips")


def test_dtype_follows_input():
    z32 = torch.randn(4, 6)
    cm = cost_matrix(SpiralField(), z32, grid=5)
    assert cm.values.dtype == np.float64


class Scaled(torch.nn.Module):
    """v = a x with a learnable scalar ``a``: two instances differ only in their weights."""

    def __init__(self, a: float):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, x, t):
        return self.a * x


def test_cache_made_by_another_model_is_refused(noise, tmp_path):
    cache = tmp_path / "cost.npz"
    a = cost_matrix(Scaled(0.5), noise[:12], grid=6, cache=cache)
    assert a.identity["model_fingerprint"] is not None
    # run B asks for more samples in the same folder: it used to add its samples to A's sums
    with pytest.raises(
        CheckpointError,
        match=r"another model.*model \(fingerprint of its weights and how it is called\)",
    ):
        cost_matrix(Scaled(0.7), noise, grid=6, cache=cache)
    with pytest.raises(CheckpointError, match="delete .*cost.npz to recompute"):
        cost_matrix(Scaled(0.7), noise[:12], grid=6, cache=cache)  # or reuse A's finished one
    assert CostMatrix.load(cache).count == 12  # A's cache is left as it was
    resumed = cost_matrix(Scaled(0.5), noise, grid=6, cache=cache)  # the same model resumes
    np.testing.assert_allclose(resumed.values, cost_matrix(Scaled(0.5), noise, grid=6).values)


def test_the_same_weights_called_otherwise_are_another_model(noise, tmp_path):
    """A convention's constants and the precision are part of the field: a cache of the same
    weights under another time scale, or in bf16 then fp16, is not resumed."""
    from bossflow.field import DiffusersField, Precision, RectifiedFlowField

    net = torch.nn.Linear(3, 3)

    class Net(torch.nn.Module):  # v(x, s) of a rectified-flow or diffusers-style network
        def __init__(self):
            super().__init__()
            self.lin = net

        def forward(self, x, s):
            return self.lin(x) * (1 + 0 * s.view(-1, 1, 1))

    variants = [
        RectifiedFlowField(Net()), RectifiedFlowField(Net(), time_scale=1.0),
        DiffusersField(Net(), sample_keyword=None), Precision(Net(), torch.bfloat16),
        Precision(Net(), torch.float16),
    ]  # fmt: skip
    prints = [module_fingerprint(v) for v in variants]
    assert len(set(prints)) == len(prints)
    assert module_fingerprint(RectifiedFlowField(Net())) == prints[0]  # still deterministic
    cache = tmp_path / "cost.npz"
    cost_matrix(variants[3], noise[:12].float(), grid=6, cache=cache)
    with pytest.raises(CheckpointError, match="another model"):
        cost_matrix(variants[4], noise.float(), grid=6, cache=cache)


def test_cache_made_from_other_noise_or_seed_is_refused(noise, tmp_path):
    cache = tmp_path / "cost.npz"
    cost_matrix(SpiralField(), noise[:12], grid=6, cache=cache)
    with pytest.raises(CheckpointError, match=r"noise \(fingerprint of sample 0\)"):
        cost_matrix(SpiralField(), noise.flip(0), grid=6, cache=cache)  # no seed in meta
    with pytest.raises(CheckpointError, match="noise dtype"):
        cost_matrix(SpiralField(), noise.float(), grid=6, cache=cache)
    cache = tmp_path / "seeded.npz"
    cost_matrix(SpiralField(), NoiseSource((2, 3), seed=1), grid=6, samples=4, cache=cache)
    with pytest.raises(CheckpointError, match="seed: 1 there, 2 now"):
        cost_matrix(SpiralField(), NoiseSource((2, 3), seed=2), grid=6, samples=8, cache=cache)
    with pytest.raises(CheckpointError, match="another metric"):
        cost_matrix(SpiralField(), NoiseSource((2, 3), seed=1), grid=6, samples=8, cache=cache,
                    metric="l1")  # fmt: skip


def _rewrite(path, **changes):
    """Rewrite fields of a saved cost-matrix cache."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(changes)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: {"count": np.int64(-3)}, "sample count -3 is not a whole number >= 0"),
        (lambda s: {"count": np.float64(12.5)}, "sample count 12.5 is not a whole number"),
        (lambda s: {"count": np.int64(0)}, "counts 0 samples but holds non-zero sums"),
        (lambda s: {"sum": -s["sum"]}, "negative cost sums"),
        (lambda s: {"sumsq": -s["sumsq"]}, "negative cost sums"),
        (lambda s: {"sum": s["sum"] * np.nan}, "sum holds NaN or infinite values"),
        (lambda s: {"meta": np.str_("[1, 2]")}, "its meta is not a JSON object"),
        (lambda s: {"meta": np.str_("{not json")}, "its meta is not a JSON object"),
        (lambda s: {"identity": np.str_("3")}, "its identity is not a JSON object"),
        (lambda s: {"grid": s["grid"][::-1].copy()}, "its grid is not a valid schedule"),
        (lambda s: {"grid": np.float64(0.5)}, "not a list of times"),
        (lambda s: {"sum": s["sum"][:2]}, r"sum is a float64 array of shape \(2, 7\)"),
    ],
)
def test_invalid_cache_values_are_refused(noise, tmp_path, change, message):
    cache = tmp_path / "cost.npz"
    cost_matrix(SpiralField(), noise[:12], grid=6, cache=cache)
    with np.load(cache) as data:
        _rewrite(cache, **change({k: data[k] for k in data.files}))
    with pytest.raises(CheckpointError, match=message + ".*delete it to recompute"):
        CostMatrix.load(cache)
    with pytest.raises(CheckpointError, match=message):  # a resumed run: no traceback either
        cost_matrix(SpiralField(), noise, grid=6, cache=cache)


def test_cache_without_a_recorded_identity_is_refused(noise, tmp_path):
    cache = tmp_path / "cost.npz"
    cost_matrix(SpiralField(), noise[:12], grid=6, cache=cache)
    with np.load(cache) as data:
        arrays = {k: data[k] for k in data.files if k != "identity"}
    with open(cache, "wb") as fh:
        np.savez(fh, **arrays)
    assert CostMatrix.load(cache).identity == {}  # still readable, e.g. to make schedules
    with pytest.raises(CheckpointError, match="does not record which model"):
        cost_matrix(SpiralField(), noise, grid=6, cache=cache)


def test_merge_refuses_another_model(noise):
    a = cost_matrix(Scaled(0.5), noise[:12], grid=6)
    with pytest.raises(bossflow.errors.CostMatrixError, match="different models"):
        a.merge(cost_matrix(Scaled(0.7), noise[12:], grid=6))
    merged = a.merge(cost_matrix(Scaled(0.5), noise[12:], grid=6))
    assert merged.identity == {"model_fingerprint": a.identity["model_fingerprint"]}


class Labelled(torch.nn.Module):
    """v = a x + label: a conditional field, for guidance."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(-0.5, dtype=torch.float64))

    def forward(self, x, t, label):
        return self.a * x + label.to(x.dtype).view(-1, *[1] * (x.ndim - 1))


def test_merge_refuses_another_guidance(noise):
    """The weights' fingerprint does not see Guided's scale: two scales were merged silently."""
    from bossflow.field import Guided

    net, null = Labelled(), {"label": torch.tensor([0])}
    cond = {"label": torch.arange(24) % 3 + 1}
    half = {"label": cond["label"][12:]}
    a = cost_matrix(Guided(net, 1.5, null), noise[:12], grid=6, cond={"label": cond["label"][:12]})
    with pytest.raises(bossflow.errors.CostMatrixError, match="differently guided"):
        a.merge(cost_matrix(Guided(net, 4.0, null), noise[12:], grid=6, cond=half))
    merged = a.merge(cost_matrix(Guided(net, 1.5, null), noise[12:], grid=6, cond=half))
    assert merged.count == 24 and merged.identity["guidance"] == a.identity["guidance"]
    with pytest.raises(ConfigError, match="must be one row shared by every sample"):
        Guided(net, 1.5, {"label": torch.zeros(2, dtype=torch.long)})


def test_a_cache_that_cannot_be_opened_is_not_called_damaged(noise, tmp_path, monkeypatch):
    cache = tmp_path / "cost.npz"
    cost_matrix(SpiralField(), noise[:12], grid=6, cache=cache)

    def no_descriptor(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(np, "load", no_descriptor)
    with pytest.raises(bossflow.errors.BossflowError) as info:
        CostMatrix.load(cache)
    assert not isinstance(info.value, CheckpointError)
    assert "Too many open files" in str(info.value) and "delete" not in str(info.value)
