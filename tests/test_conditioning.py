"""Per-sample conditioning, guidance and the flow_matching / torchcfm calling conventions."""

import numpy as np
import pytest
import torch
from torch import nn

from bossflow import NFECounter, sample
from bossflow.bellman import bellman_schedules, cost_matrix
from bossflow.errors import CheckpointError, ConfigError
from bossflow.field import FlowMatchingField, Guided, TorchCFMField, Unguided, bind_cond
from bossflow.learn import LearnConfig, learn_sampler, teacher_endpoints
from bossflow.noise import NoiseSource
from bossflow.schedule import uniform
from bossflow.straighten import StraightenConfig, eval_interval_error, make_pairs, straighten

M, D, GRID = 12, 4, 20


class CondField(nn.Module):
    """A small nonlinear class-conditional field ``v(x, t, class_labels=y)`` on (B, D) samples."""

    def __init__(self, classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(D, D)
        self.emb = nn.Embedding(classes + 1, D)  # the last row: the null label
        self.time = nn.Linear(1, D)

    def forward(self, x, t, class_labels):
        h = self.lin(x) + self.emb(class_labels) + self.time(t[:, None].to(x.dtype))
        return torch.tanh(h) + 0.5 * x


def labels(count: int) -> torch.Tensor:
    return torch.arange(count) % 4


@pytest.fixture(scope="module")
def field():
    return CondField().eval()


def test_cost_matrix_with_per_sample_labels_does_not_depend_on_the_batch(field):
    cond = {"class_labels": labels(M)}
    noise = NoiseSource((D,), seed=0).take(M)
    by_batch = [
        cost_matrix(field, noise, grid=GRID, batch_size=b, cond=cond).values for b in (2, 5, M)
    ]
    for other in by_batch[1:]:  # float32 GEMMs round differently per batch size: 1e-6 of the scale
        np.testing.assert_allclose(other, by_batch[0], rtol=0, atol=1e-6 * by_batch[0].max())
    in_float64 = [
        cost_matrix(CondField().double(), noise.double(), grid=GRID, batch_size=b, cond=cond).values
        for b in (2, M)
    ]
    np.testing.assert_allclose(
        in_float64[0], in_float64[1], rtol=0, atol=1e-12 * in_float64[0].max()
    )
    # brute force: each noise alone, its label bound into the field
    alone = [
        cost_matrix(bind_cond(field, {"class_labels": labels(M)[m : m + 1]}), noise[m : m + 1],
                    grid=GRID).values
        for m in range(M)
    ]  # fmt: skip
    np.testing.assert_allclose(
        by_batch[0], np.mean(alone, 0), rtol=0, atol=1e-6 * by_batch[0].max()
    )
    # the labels matter: one shared label gives another matrix
    shared = cost_matrix(field, noise, grid=GRID, cond={"class_labels": torch.tensor([1])}).values
    assert np.abs(shared - by_batch[0]).max() > 1e-4


def test_a_callable_gives_the_same_as_a_dict(field):
    noise = NoiseSource((D,), seed=0)
    as_dict = cost_matrix(field, noise, GRID, 4, samples=M, cond={"class_labels": labels(M)})
    as_call = cost_matrix(
        field, noise, GRID, 4, samples=M, cond=lambda rows: {"class_labels": labels(M)[list(rows)]}
    )
    np.testing.assert_array_equal(as_dict.values, as_call.values)


def test_conditioning_errors_are_one_line(field, tmp_path):
    noise = NoiseSource((D,), seed=0).take(M)
    with pytest.raises(ConfigError, match="3 rows for 12 noises"):
        cost_matrix(field, noise, grid=GRID, cond={"class_labels": labels(3)})
    with pytest.raises(ConfigError, match="dict of"):
        cost_matrix(field, noise, grid=GRID, cond=labels(M))
    cache = tmp_path / "c.npz"
    cost_matrix(field, noise, grid=GRID, cond={"class_labels": labels(M)}, cache=cache)
    with pytest.raises(CheckpointError, match="conditioning \\(first rows\\)"):
        cost_matrix(field, noise, grid=GRID, cond={"class_labels": labels(M) + 1}, cache=cache)


def test_guided_is_one_call_of_2b_rows_and_the_cfg_formula(field):
    x, t = torch.randn(5, D), torch.rand(5)
    y = labels(5)
    null = {"class_labels": torch.tensor([4])}
    counter = NFECounter(field)
    guided = Guided(counter, 3.0, null)
    v = guided(x, t, class_labels=y)
    assert (counter.nfe, counter.samples) == (1, 10)
    v_c, v_u = field(x, t, y), field(x, t, torch.full((5,), 4))
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(Guided(field, 1.0, null)(x, t, class_labels=y), v_c)
    # per-sample unconditional inputs travel with the conditioning, under "uncond.<name>"
    per = Guided(field, 3.0)(x, t, class_labels=y, **{"uncond.class_labels": torch.full((5,), 4)})
    torch.testing.assert_close(per, v)
    with pytest.raises(ConfigError, match="no unconditional value for 'class_labels'"):
        Guided(field, 3.0)(x, t, class_labels=y)


def test_pairs_and_straightening_carry_the_labels(field, tmp_path):
    schedule = bellman_schedules(
        cost_matrix(field, NoiseSource((D,), 0), GRID, samples=32, cond={"class_labels": labels(32)}),
        [3],
    )[3]  # fmt: skip
    noise = NoiseSource((D,), seed=1)
    cond = {"class_labels": labels(48)}
    a = make_pairs(field, noise, schedule, tmp_path / "a", GRID, 48, batch_size=5, cond=cond)
    b = make_pairs(field, noise, schedule, tmp_path / "b", GRID, 48, batch_size=48, cond=cond)
    torch.testing.assert_close(a.states[:], b.states[:], rtol=1e-5, atol=1e-6)  # GEMM rounding
    config = StraightenConfig(iterations=40, batch_size=16, lr=5e-3, warmup=2, eval_every=20)
    with pytest.raises(ConfigError, match="made with conditioning"):
        straighten(field, a, schedule, config, progress=False)
    result = straighten(field, a, schedule, config, progress=False, cond=cond)
    held = result.heldout_indices
    before = eval_interval_error(field, a, schedule, held, cond=cond)
    after = eval_interval_error(result.module, a, schedule, held, cond=cond)
    assert after < before
    # the held-out error really used each noise's own label
    wrong = {"class_labels": (labels(48) + 1) % 4}
    with pytest.raises(ConfigError, match="other conditioning"):
        eval_interval_error(field, a, schedule, held, cond=wrong)


@pytest.mark.parametrize("mode", ["keep", "distill"])
def test_straightening_a_guided_field(field, tmp_path, mode):
    null = {"class_labels": torch.tensor([4])}
    teacher = Guided(field, 2.5, null)
    schedule = uniform(2)
    cond = {"class_labels": labels(32)}
    pairs = make_pairs(teacher, NoiseSource((D,), 2), schedule, tmp_path, GRID, 32, cond=cond)
    config = StraightenConfig(iterations=60, batch_size=16, lr=5e-3, warmup=2, guidance=mode)
    result = straighten(teacher, pairs, schedule, config, progress=False, cond=cond)
    assert type(result.module) is CondField  # the network itself, saved without a wrapper
    every = range(len(pairs))
    student = result.sampling_field
    if mode == "keep":
        assert isinstance(student, Guided) and student.scale == 2.5
        before = eval_interval_error(teacher, pairs, schedule, every, cond=cond)
    else:
        assert isinstance(student, Unguided) and student.field is result.module
        before = eval_interval_error(field, pairs, schedule, every, cond=cond)  # bare, unguided
    after = eval_interval_error(student, pairs, schedule, every, cond=cond)
    assert after < 0.7 * before, (before, after)
    # a sample with the straightened field costs one call of B rows when distilled
    counter = NFECounter(result.module)
    x = sample(Guided(counter, 2.5, null) if mode == "keep" else counter, torch.randn(3, D),
               schedule, cond={"class_labels": labels(3)})  # fmt: skip
    assert x.shape == (3, D)
    assert counter.samples == (12 if mode == "keep" else 6)


def test_a_distilled_student_with_per_sample_null_inputs_straightens_again(field, tmp_path):
    """Unguided(student) on conditioning that carries per-sample `uncond.*` rows: the held-out
    pass called the bare network with them (a crash)."""
    cond = {"class_labels": labels(16), "uncond.class_labels": torch.full((16,), 4)}
    schedule = uniform(2)
    student = Unguided(field)
    pairs = make_pairs(student, NoiseSource((D,), 4), schedule, tmp_path, GRID, 16, cond=cond)
    config = StraightenConfig(iterations=3, batch_size=4, holdout=4, eval_every=1)
    result = straighten(student, pairs, schedule, config, progress=False, cond=cond)
    assert type(result.module) is CondField and len(result.history) == 4
    # sampled as it was trained: without the uncond.* inputs (the bare network got them)
    x = sample(result.sampling_field, torch.randn(16, D), schedule, cond=cond)
    assert x.shape == (16, D) and result.unguided


def test_growing_a_conditional_store_or_cache_keeps_it(field, tmp_path):
    """Conditioning fingerprints hash the first rows: 100 samples then 300 of the same labels
    were refused as other conditioning; other labels still are."""
    by_index = lambda rows: {"class_labels": torch.as_tensor(list(rows)) % 4}  # noqa: E731
    shifted = lambda rows: {"class_labels": (torch.as_tensor(list(rows)) + 1) % 4}  # noqa: E731
    noise, schedule = NoiseSource((D,), 5), uniform(2)
    make_pairs(field, noise, schedule, tmp_path / "p", 8, 100, 50, cond=by_index)
    grown = make_pairs(field, noise, schedule, tmp_path / "p", 8, 300, 100, cond=by_index)
    assert len(grown) == 300
    pairs = straighten(field, grown, schedule, StraightenConfig(iterations=1, batch_size=4),
                       progress=False, cond=by_index)  # fmt: skip
    assert pairs.iterations == 1  # the grown store's conditioning reads back as its own
    with pytest.raises(CheckpointError, match="cond_fingerprint"):
        make_pairs(field, noise, schedule, tmp_path / "p", 8, 400, 100, cond=shifted)
    cache = tmp_path / "cost.npz"
    cost_matrix(field, noise, grid=8, samples=20, cache=cache, cond=by_index)
    assert cost_matrix(field, noise, grid=8, samples=300, cache=cache, cond=by_index).count == 300
    with pytest.raises(CheckpointError, match="conditioning"):
        cost_matrix(field, noise, grid=8, samples=400, cache=cache, cond=shifted)


def test_learning_a_sampler_with_labels(field):
    noise = NoiseSource((D,), seed=3).take(40)
    cond = {"class_labels": labels(40)}
    teacher = teacher_endpoints(field, noise, 50, cond=cond)
    one_by_one = torch.cat([
        sample(field, noise[m : m + 1], uniform(50), "heun", cond={"class_labels": labels(40)[m:m+1]})
        for m in range(40)
    ])  # fmt: skip
    torch.testing.assert_close(teacher, one_by_one, rtol=1e-5, atol=1e-6)
    result = learn_sampler(
        field, noise, teacher, 3, LearnConfig(iterations=30, batch_size=16, margin=0), cond=cond
    )
    assert result.heldout_error <= result.initial_heldout_error


# -- flow_matching and torchcfm calling conventions ------------------------------------------


class FMBatched(nn.Module):
    """A flow_matching-style model, ``model(x=, t=, **extras)``, that accepts a (B,) time."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D + 1, D)
        self.calls = 0

    def forward(self, x, t, label=None):
        self.calls += 1
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        out = self.lin(torch.cat([x, t[:, None].to(x.dtype)], 1))
        return out if label is None else out + label[:, None].to(x.dtype)


class FMScalar(FMBatched):
    """The same network, but it only takes a 0-dim time (as flow_matching's ODESolver passes)."""

    def forward(self, x, t, label=None):
        if t.ndim != 0:
            raise RuntimeError("this model takes a scalar t")
        return super().forward(x, t, label)


def test_flow_matching_models_with_batched_time_are_called_once_per_step():
    model = FMBatched()
    field = FlowMatchingField(model)
    x, t = torch.randn(6, D), torch.tensor([0.1, 0.5, 0.1, 0.9, 0.3, 0.7])
    label = torch.arange(6)
    first = field(x, t, label=label)
    assert field.batched_time is True  # detected on the first mixed batch
    model.calls = 0
    torch.testing.assert_close(field(x, t, label=label), first)
    assert model.calls == 1
    scalar = FlowMatchingField(FMScalar())
    scalar.network.load_state_dict(model.state_dict())
    torch.testing.assert_close(scalar(x, t, label=label), first)
    assert scalar.batched_time is False
    scalar.network.calls = 0
    scalar(x, t, label=label)
    assert scalar.network.calls == 5  # one per distinct time


def test_fsdp_refuses_a_flow_matching_model_whose_calls_could_differ(tmp_path, monkeypatch):
    """Sharded forward passes are collective: a model called once per distinct time (or not yet
    detected) could make another number of calls on each rank, so FSDP asks for batched time."""
    from bossflow import distributed as dist

    schedule = uniform(2)
    field = FlowMatchingField(FMBatched())
    pairs = make_pairs(field, NoiseSource((D,), 0), schedule, tmp_path, GRID, 8)
    for name, value in (("is_distributed", True), ("world_size", 1), ("rank", 0)):
        monkeypatch.setattr(dist, name, lambda v=value: v)  # the check precedes any collective
    config = StraightenConfig(iterations=1, batch_size=4, holdout=0, sharding="fsdp")
    for batched in (None, False):
        undetected = FlowMatchingField(FMBatched(), batched_time=batched)
        with pytest.raises(ConfigError, match="batched_time=True"):
            straighten(undetected, pairs, schedule, config, progress=False)


def test_flow_matching_straightening_makes_one_model_call_per_step(tmp_path):
    model = FMBatched()
    field = FlowMatchingField(model, batched_time=True)
    schedule = uniform(4)
    pairs = make_pairs(field, NoiseSource((D,), 0), schedule, tmp_path, GRID, 32)
    calls = []
    config = StraightenConfig(iterations=10, batch_size=8, warmup=1, eval_every=0, holdout=0)
    straighten(field, pairs, schedule, config, progress=False,
               callback=lambda info: calls.append(info["model"].network.calls))  # fmt: skip
    assert np.diff(calls).tolist() == [1] * 9


class torch_wrapper(nn.Module):  # noqa: N801 - the name torchcfm gives it
    """torchcfm.utils.torch_wrapper, as torchcfm defines it (torchcfm.utils needs torchdyn)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, t, x, *args, **kwargs):
        return self.model(torch.cat([x, t.repeat(x.shape[0])[:, None]], 1))


def test_torchcfm_torch_wrapper_is_unwrapped():
    mlp = nn.Sequential(nn.Linear(D + 1, 16), nn.SELU(), nn.Linear(16, D))
    wrapper = torch_wrapper(mlp)
    field = TorchCFMField(wrapper)
    x = torch.randn(5, D)
    t = torch.full((5,), 0.3)
    torch.testing.assert_close(field(x, t), wrapper(torch.tensor(0.3), x))  # equal times
    mixed = torch.rand(5)
    by_row = torch.cat([wrapper(mixed[i], x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(field(x, mixed), by_row)  # each row its own time


@pytest.fixture
def one_thread():
    """Tiny convolutions: two threads that contend with other work were 25x slower (56 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_torchcfm_class_conditional_unet_schedule_straighten_sample(tmp_path, one_thread):
    # CI installs torchcfm with --no-deps (+ pot): its declared dependencies pull torchvision
    unet = pytest.importorskip("torchcfm.models.unet.unet")
    torch.manual_seed(0)
    net = unet.UNetModelWrapper(
        dim=(1, 28, 28), num_channels=32, num_res_blocks=1, channel_mult=(1, 1), class_cond=True,
        num_classes=10, num_heads=1, num_head_channels=-1, attention_resolutions="14",
        use_scale_shift_norm=True,  # else GroupNorm(32) on 32 channels cancels the t, y embedding
    )  # fmt: skip
    for p in net.parameters():  # torchcfm zero-initialises each block's last layer: v = 0
        if not p.any():
            nn.init.normal_(p, std=0.05)
    field = TorchCFMField(net).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.full((2,), 0.5)
    with torch.no_grad():  # the labels reach the network as y
        one, two = field(x, t, y=torch.tensor([1, 1])), field(x, t, y=torch.tensor([2, 2]))
    assert (one - two).abs().max() > 1e-3
    cond = lambda rows: {"y": torch.as_tensor(list(rows)) % 10}  # noqa: E731
    noise = NoiseSource((1, 28, 28), seed=0)
    cost = cost_matrix(field, noise, grid=8, batch_size=4, samples=4, cond=cond)
    schedule = bellman_schedules(cost, [2])[2]
    pairs = make_pairs(field, noise, schedule, tmp_path, 8, 8, batch_size=4, cond=cond)
    config = StraightenConfig(iterations=3, batch_size=4, warmup=1, eval_every=0, holdout=0)
    result = straighten(field, pairs, schedule, config, progress=False, cond=cond)
    x = sample(result.module, noise.take(3), schedule, cond={"y": torch.tensor([0, 1, 2])})
    assert x.shape == (3, 1, 28, 28) and bool(torch.isfinite(x).all())
    before = sample(field, noise.take(3), schedule, cond={"y": torch.tensor([0, 1, 2])})
    assert (x - before).abs().max() > 1e-3  # the straightened weights differ


def test_caches_and_stores_tell_other_conditioning_and_guidance_apart(field, tmp_path):
    noise = NoiseSource((D,), seed=0).take(M)
    cache = tmp_path / "c.npz"
    cost_matrix(field, noise, grid=GRID, cond={"class_labels": labels(M)}, cache=cache)
    # sample 0 agrees (label 0), the other rows do not: still another run
    with pytest.raises(CheckpointError, match="conditioning"):
        cost_matrix(field, noise, grid=GRID, cond={"class_labels": torch.tensor([0])}, cache=cache)
    null = {"class_labels": torch.tensor([4])}
    cond = {"class_labels": labels(16)}
    pairs = make_pairs(Guided(field, 3.0, null), NoiseSource((D,), 1), uniform(2), tmp_path / "p",
                       GRID, 16, cond=cond)  # fmt: skip
    config = StraightenConfig(iterations=2, batch_size=4, warmup=1)
    with pytest.raises(ConfigError, match="were made with guidance"):
        straighten(Guided(field, 2.0, null), pairs, uniform(2), config, progress=False, cond=cond)
    with pytest.raises(ConfigError, match="were made with guidance"):
        straighten(field, pairs, uniform(2), config, progress=False, cond=cond)


def test_distilling_with_per_sample_unconditional_inputs(field, tmp_path):
    """The per-sample null inputs feed the guided teacher; the distilled student never sees them."""
    cond = {"class_labels": labels(16), "uncond.class_labels": torch.full((16,), 4)}
    teacher = Guided(field, 2.0)
    pairs = make_pairs(teacher, NoiseSource((D,), 1), uniform(2), tmp_path, GRID, 16, cond=cond)
    config = StraightenConfig(iterations=4, batch_size=4, warmup=1, guidance="distill")
    result = straighten(teacher, pairs, uniform(2), config, progress=False, cond=cond)
    x = sample(result.sampling_field, torch.randn(3, D), uniform(2), cond={
        k: v[:3] for k, v in cond.items()})  # fmt: skip
    assert x.shape == (3, D)
    assert result.teacher_guidance == {"scale": 2.0, "mode": "distill"}
