import math

import numpy as np
import pytest
import torch

from bossflow.errors import BossflowError, ConfigError, ModelOutputError
from bossflow.field import AffineGaussianField, SpiralField
from bossflow.metrics import (
    METHODS,
    EvalRecord,
    evaluate_samples,
    feature_stats,
    frechet_distance,
    frechet_from_stats,
    method_rank,
    mse_to_reference,
    psnr,
    straightness,
)
from bossflow.schedule import uniform


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- MSE / PSNR ---------------------------------------------------------------------------------
def test_mse_of_constant_offset():
    x = torch.randn(10, 1, 8, 8, generator=gen())
    mean, stderr = mse_to_reference(x + 0.5, x)
    assert mean == pytest.approx(0.25, rel=1e-6)
    assert stderr == pytest.approx(0.0, abs=1e-6)


def test_mse_stderr_formula():
    ref = torch.zeros(4, 2, dtype=torch.float64)
    # per-sample MSEs: 1, 4, 9, 16 (each row constant)
    samples = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]], dtype=torch.float64)
    mean, stderr = mse_to_reference(samples, ref)
    e = np.array([1.0, 4.0, 9.0, 16.0])
    assert mean == pytest.approx(e.mean())
    assert stderr == pytest.approx(e.std(ddof=1) / 2.0)
    assert math.isnan(mse_to_reference(samples[:1], ref[:1])[1])


def test_mse_shape_mismatch_is_clear():
    with pytest.raises(ConfigError, match="same shape"):
        mse_to_reference(torch.zeros(2, 3), torch.zeros(3, 3))


def test_psnr_known_mse_and_zero():
    x = torch.zeros(5, 1, 4, 4)
    # MSE 0.01 with range 2: 10 log10(4 / 0.01) = 26.0206 dB
    assert psnr(x + 0.1, x) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-5)
    assert psnr(x + 0.1, x, data_range=1.0) == pytest.approx(20.0, rel=1e-5)
    assert psnr(x, x) == math.inf
    assert psnr(x + float("inf"), x) == -math.inf  # diverged samples: was a math domain error


def test_psnr_uses_mean_mse():
    ref = torch.zeros(2, 1)
    samples = torch.tensor([[0.0], [0.2]])  # per-sample MSEs 0 and 0.04, mean 0.02
    assert psnr(samples, ref) == pytest.approx(10 * math.log10(4 / 0.02), rel=1e-5)


# -- Fréchet ------------------------------------------------------------------------------------
def test_frechet_closed_form_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_from_stats(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_closed_form_commuting_full_covariances():
    # Rotating two diagonal covariances by the same orthogonal matrix leaves the distance unchanged.
    # The zero eigenvalue limits accuracy to ~sqrt(machine eps): sqrt is not Lipschitz at 0.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    s1, s2 = np.array([1.0, 2.0, 3.0, 0.0]), np.array([4.0, 0.5, 3.0, 1.0])
    expected = np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_from_stats(
        np.zeros(4), q @ np.diag(s1) @ q.T, torch.zeros(4), torch.tensor(q @ np.diag(s2) @ q.T)
    )
    assert got == pytest.approx(expected, rel=1e-7)


def test_frechet_from_stats_rejects_inconsistent_shapes():
    with pytest.raises(ConfigError, match="inconsistent"):
        frechet_from_stats(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_stats_matches_numpy_cov():
    f = np.random.default_rng(1).normal(size=(50, 6)) + 1e4  # large mean: no cancellation
    mu, sigma = feature_stats(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-9)
    with pytest.raises(ConfigError, match="N >= 2"):
        feature_stats(f[:1])


def test_frechet_distance_self_zero_and_grows_with_shift():
    x = torch.randn(200, 1, 4, 4, generator=gen(1), dtype=torch.float64)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    d = [frechet_distance(x + s, x) for s in (0.1, 0.5, 1.0)]
    # A pure shift adds exactly ||shift||^2 = 16 s^2 (16 pixels).
    np.testing.assert_allclose(d, [16 * 0.01, 16 * 0.25, 16 * 1.0], rtol=1e-8)
    assert d[0] < d[1] < d[2]


def test_frechet_distance_with_feature_module_and_callable():
    x = torch.randn(100, 1, 4, 4, generator=gen(2))
    y = torch.randn(120, 1, 4, 4, generator=gen(3)) * 1.5
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5))
    via_module = frechet_distance(x, y, net, batch_size=7)
    with torch.no_grad():
        expected = frechet_from_stats(*feature_stats(net(x)), *feature_stats(net(y)))
    assert via_module == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(x, y, lambda im: net(im)) == pytest.approx(via_module, rel=1e-6)


def test_frechet_distance_bad_features_are_clear():
    x = torch.randn(10, 1, 4, 4, generator=gen())
    with pytest.raises(ModelOutputError, match="shaped \\(B, d\\)"):
        frechet_distance(x, x, lambda im: im.sum())
    with pytest.raises(ModelOutputError, match="NaN"):
        frechet_distance(x, x, lambda im: im.flatten(1) * math.nan)
    with pytest.raises(ConfigError, match="backend"):
        frechet_distance(x, x, backend="scipy")


@pytest.mark.slow  # importing torchmetrics takes 5-10 s
def test_torchmetrics_backend_agrees_with_float64():
    pytest.importorskip("torchmetrics")
    x = torch.randn(150, 1, 8, 8, generator=gen(4))
    y = torch.randn(170, 1, 8, 8, generator=gen(5)) * 1.2 + 0.1
    x[:, :, 0] = 0.0  # constant pixels: rank-deficient covariances, as with real digits
    y[:, :, 0] = 0.0
    ours = frechet_distance(x, y)
    theirs = frechet_distance(x, y, backend="torchmetrics", batch_size=64)
    assert theirs == pytest.approx(ours, rel=1e-6)


# -- straightness -------------------------------------------------------------------------------
def test_straightness_zero_for_straight_flow_positive_for_curved():
    z = torch.randn(16, 4, generator=gen(), dtype=torch.float64)
    straight = AffineGaussianField(scale=0.4, shift=torch.tensor([1.0, -2.0, 0.5, 3.0]))
    assert straightness(straight, z, 10) == pytest.approx(0.0, abs=1e-12)
    assert straightness(SpiralField(), z, uniform(10)) > 0.1


def test_straightness_matches_direct_formula():
    z = torch.randn(8, 2, generator=gen(1), dtype=torch.float64)
    field = SpiralField()
    grid = uniform(5)
    xs, vs = [z], []
    for k in range(5):
        t = torch.full((8,), grid.times[k], dtype=torch.float64)
        vs.append(field(xs[-1], t))
        xs.append(xs[-1] + 0.2 * vs[-1])
    disp = xs[-1] - xs[0]
    direct = sum(0.2 * (disp - v).square().mean(dim=1) for v in vs).mean()
    assert straightness(field, z, grid) == pytest.approx(float(direct), rel=1e-10)


# -- records ------------------------------------------------------------------------------------
def test_eval_record_validates_method_and_round_trips():
    for bad in ("", "  ", "a|b", "two\nlines", "a/b", 3, None):
        with pytest.raises(ConfigError, match="method label") as err:
            EvalRecord(bad, 4, 0.1, 0.01, 20.0, None, 1.0)
        assert isinstance(err.value, BossflowError)
    # labels are open: a new sampler needs no registration
    assert EvalRecord("learned", 4, 0.1, 0.01, 20.0, None, 1.0).method == "learned"
    with pytest.raises(ConfigError, match="nfe"):
        EvalRecord("uniform", 0, 0.1, 0.01, 20.0, None, 1.0)
    rec = EvalRecord("boss-lora", 4, 0.1, 0.01, math.inf, 3.5, 1.0, iterations=200)
    d = rec.to_dict()
    assert list(d) == [
        "method",
        "nfe",
        "mse_to_reference",
        "mse_stderr",
        "psnr",
        "frechet",
        "wall_s",
        "iterations",
    ]
    assert EvalRecord.from_dict(d) == rec
    assert EvalRecord.from_dict({**d, "psnr": "inf"}).psnr == math.inf
    with pytest.raises(ConfigError, match="lacks"):
        EvalRecord.from_dict({"method": "uniform"})


def test_evaluate_samples_ties_metrics_together():
    ref = torch.rand(20, 1, 8, 8, generator=gen(6)) * 2 - 1
    samples = ref + 0.1
    data = torch.rand(30, 1, 8, 8, generator=gen(7)) * 2 - 1
    rec = evaluate_samples(samples, ref, data, None, "bellman", 4, wall_s=0.5)
    assert rec.method == "bellman" and rec.nfe == 4 and rec.iterations is None
    assert rec.mse_to_reference == pytest.approx(0.01, rel=1e-5)
    assert rec.psnr == pytest.approx(psnr(samples, ref))
    assert rec.frechet == pytest.approx(frechet_distance(samples, data))
    assert evaluate_samples(samples, ref, None, None, "boss", 4, 0.5, 100).frechet is None
    assert evaluate_samples(samples, ref, None, None, "magic", 4, 0.5).method == "magic"
    with pytest.raises(ConfigError, match="method label"):
        evaluate_samples(samples, ref, None, None, "a|b", 4, 0.5)


def test_method_rank_orders_known_then_new_labels_then_reference():
    labels = ["reference", "zeta", "boss", "my-sampler", "uniform", "reflow"]
    ordered = sorted(labels, key=method_rank)
    assert ordered == ["uniform", "boss", "reflow", "my-sampler", "zeta", "reference"]
    assert [m for m in sorted(METHODS, key=method_rank)] == list(METHODS)


def test_auto_backend_prefers_torchmetrics_and_falls_back(monkeypatch):
    import builtins

    from bossflow.metrics import frechet_backend

    pytest.importorskip("torchmetrics")
    assert frechet_backend() == "torchmetrics"
    real_import = builtins.__import__

    def no_torchmetrics(name, *args, **kwargs):
        if name.startswith("torchmetrics"):
            raise ImportError("torchmetrics hidden for this test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchmetrics)
    assert frechet_backend("auto") == "float64"
    assert frechet_backend("float64") == "float64"
