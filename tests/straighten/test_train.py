import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from bossflow.bellman import bellman_schedules, cost_matrix
from bossflow.errors import BossflowError, CheckpointError, ConfigError
from bossflow.field import AffineGaussianField
from bossflow.models.ncsnpp import GaussianFourierProjection
from bossflow.noise import NoiseSource
from bossflow.schedule import Schedule, uniform
from bossflow.straighten import (
    StraightenConfig,
    eval_interval_error,
    make_pairs,
    save_straightened,
    straighten,
)

from . import TinyConvField, TinyField, pretrained_field

GRID = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The pretrained field, its Bellman 3-step schedule, training pairs and held-out pairs."""
    field = pretrained_field()
    cost = cost_matrix(field, NoiseSource((2,), seed=0), grid=GRID, samples=64)
    schedules = bellman_schedules(cost, [2, 3])
    root = tmp_path_factory.mktemp("pairs")
    train = make_pairs(
        field, NoiseSource((2,), seed=1), schedules, root / "train", fine_grid=GRID, samples=384,
        batch_size=128,
    )  # fmt: skip
    heldout = make_pairs(
        field, NoiseSource((2,), seed=2), schedules, root / "heldout", fine_grid=GRID, samples=128,
        batch_size=128,
    )  # fmt: skip
    return field, schedules[3], train, heldout


def config(**kwargs) -> StraightenConfig:
    base = dict(iterations=20, batch_size=32, lr=3e-3, warmup=5, ema_decay=0.9, eval_every=5)
    return StraightenConfig(**{**base, **kwargs})


def test_boss_lowers_the_heldout_interval_error(setup):
    field, schedule, train, heldout = setup
    before_weights = {k: v.clone() for k, v in field.state_dict().items()}
    cfg = config(iterations=200, batch_size=64, eval_every=50, holdout=64)
    result = straighten(field, train, schedule, cfg, progress=False)
    every = range(len(heldout))
    before = eval_interval_error(field, heldout, schedule, every)
    after = eval_interval_error(result.module, heldout, schedule, every)
    assert after < 0.3 * before, (before, after)  # measured: about 8x lower
    # the caller's module is untouched; the result is a plain module of its architecture
    assert all(torch.equal(v, field.state_dict()[k]) for k, v in before_weights.items())
    assert type(result.module) is TinyField and not result.module.training
    # the held-out curve: a baseline at iteration 0 on the store's last 64 noises, then every 50
    assert [h["iteration"] for h in result.history] == [0, 50, 100, 150, 200]
    assert result.heldout_indices == list(range(320, 384))
    baseline = eval_interval_error(field, train, schedule, result.heldout_indices)
    assert result.history[0]["heldout_loss"] == pytest.approx(baseline, rel=1e-6)
    assert result.history[-1]["heldout_loss"] < 0.5 * baseline
    assert result.history[0]["train_loss"] is None and result.history[-1]["train_loss"] > 0
    assert result.iterations == 200 and result.wall_s > 0


def test_reflow_shares_the_loop_and_lowers_its_own_loss(setup):
    field, schedule, train, heldout = setup

    def reflow_loss(module):
        z, x_1 = heldout.states[:, 0], heldout.states[:, -1]
        total = 0.0
        with torch.no_grad():
            for t in torch.linspace(0.05, 0.95, 10):
                tt = t.expand(len(z))
                total += float((module(t * x_1 + (1 - t) * z, tt) - (x_1 - z)).pow(2).mean())
        return total / 10

    result = straighten(
        field, train, schedule, config(objective="reflow", iterations=150), progress=False
    )
    assert reflow_loss(result.module) < 0.7 * reflow_loss(field)
    # the same record format as BOSS: its held-out column is the BOSS interval error
    assert set(result.history[-1]) == {"iteration", "train_loss", "heldout_loss", "lr"}
    assert result.config.objective == "reflow"


@pytest.mark.slow
def test_lora_trains_only_adapters_and_merges_to_a_plain_module(tmp_path):
    torch.manual_seed(0)
    base = TinyConvField()
    schedule = uniform(2)
    pairs = make_pairs(
        base, NoiseSource((1, 8, 8), seed=0), schedule, tmp_path, fine_grid=8, samples=24
    )
    probe_x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    probe_t = torch.rand(5, generator=torch.Generator().manual_seed(2))
    seen = {}

    def inspect(info):
        wrapped = info["model"]
        trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
        seen["trainable"] = trainable
        seen["base"] = {
            n: p.detach().clone() for n, p in wrapped.named_parameters() if n not in trainable
        }
        with torch.no_grad():
            seen["unmerged"] = wrapped(probe_x, probe_t)

    cfg = config(lora_rank=4, iterations=15, lr=1e-2, ema_decay=0.0, holdout=0)
    result = straighten(base, pairs, schedule, cfg, progress=False, callback=inspect)
    # only lora_A / lora_B train, rank 4 on the Linear and the three Conv2d layers
    assert all("lora_" in n for n in seen["trainable"]) and len(seen["trainable"]) == 8
    expected = 4 * (1 + 32)  # time: Linear(1, 32)
    expected += 4 * (1 * 9 + 32) + 4 * (32 * 9 + 32) + 4 * (32 * 9 + 1)  # A: in*k*k*r, B: r*out
    assert result.trainable_parameters == expected < sum(p.numel() for p in base.parameters()) / 3
    # the frozen base weights did not move
    original = dict(base.named_parameters())
    for name, value in seen["base"].items():
        key = name.removeprefix("model.").replace(".base_layer", "")
        assert torch.equal(value, original[key]), name
    # the export is the plain architecture, strictly loadable, with the adapters folded in
    merged = result.module
    assert type(merged) is TinyConvField
    assert all(type(m) in (TinyConvField, nn.Linear, nn.Conv2d) for m in merged.modules())
    TinyConvField().load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        out = merged(probe_x, probe_t)
        torch.testing.assert_close(out, seen["unmerged"], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, base(probe_x, probe_t), atol=1e-4)  # it did train


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_reproduces_the_uninterrupted_run(setup, tmp_path, lora_rank):
    field, schedule, train, _ = setup
    cfg = config(lora_rank=lora_rank, holdout=16, checkpoint_every=5)
    straight = straighten(field, train, schedule, cfg, out_dir=tmp_path / "a", progress=False)

    # split by iterations: 12, then 20 in the same folder
    straighten(field, train, schedule, config(lora_rank=lora_rank, holdout=16, iterations=12),
               out_dir=tmp_path / "b", progress=False)  # fmt: skip
    split = straighten(field, train, schedule, cfg, out_dir=tmp_path / "b", progress=False)

    # interrupted: a crash at iteration 13 leaves the checkpoint of iteration 10
    def crash(info):
        if info["iteration"] == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        straighten(
            field, train, schedule, cfg, out_dir=tmp_path / "c", progress=False, callback=crash
        )
    assert torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)["iteration"] == 10
    resumed = straighten(field, train, schedule, cfg, out_dir=tmp_path / "c", progress=False)

    want = straight.module.state_dict()
    for result in (split, resumed):
        assert result.iterations == 20
        got = result.module.state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert resumed.history == straight.history
    history = json.loads((tmp_path / "c" / "history.json").read_text())
    assert history[-1]["iteration"] == 20


def test_select_best_returns_the_weights_of_the_lowest_heldout_error(setup):
    field, schedule, train, _ = setup
    cfg = config(iterations=30, select="best", holdout=32, eval_every=3, lr=2e-2)
    result = straighten(field, train, schedule, cfg, progress=False)
    losses = {h["iteration"]: h["heldout_loss"] for h in result.history}
    assert result.best_iteration == min(losses, key=losses.get)
    error = eval_interval_error(result.module, train, schedule, result.heldout_indices)
    assert error == pytest.approx(min(losses.values()), rel=1e-5)


def test_bad_checkpoints_and_folders_raise_clear_errors(setup, tmp_path):
    field, schedule, train, _ = setup
    cfg = config(iterations=4, holdout=8)
    straighten(field, train, schedule, cfg, out_dir=tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="lr: 0.003 in the checkpoint, 0.001 now"):
        straighten(field, train, schedule, config(iterations=4, holdout=8, lr=1e-3),
                   out_dir=tmp_path / "run", progress=False)  # fmt: skip
    other = Schedule(train.times[train.for_schedule(schedule)][[0, 1, 3]])
    with pytest.raises(CheckpointError, match="schedule times"):
        straighten(field, train, other, cfg, out_dir=tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="base model weights"):
        straighten(TinyField(), train, schedule, cfg, out_dir=tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="beyond the 2 asked"):
        straighten(field, train, schedule, config(iterations=2, holdout=8), out_dir=tmp_path / "run",
                   progress=False)  # fmt: skip

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        straighten(field, train, schedule, cfg, out_dir=tmp_path / "bad", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BossflowError, match="not a directory"):
        straighten(field, train, schedule, cfg, out_dir=tmp_path / "file", progress=False)
    with pytest.raises(ConfigError, match="choose one of"):
        straighten(field, train, schedule, config(objective="redress"), progress=False)
    with pytest.raises(ConfigError, match="holdout"):
        straighten(field, train, schedule, config(select="best", holdout=0), progress=False)


def test_a_failing_write_leaves_no_file_that_looks_complete(setup, tmp_path, monkeypatch):
    field, schedule, train, _ = setup
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    # one clear error naming the file, not torch's RuntimeError
    with pytest.raises(BossflowError, match=r"could not write .*checkpoint.pt: disk full \(is the"):
        straighten(field, train, schedule, config(iterations=4), out_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # no checkpoint.pt, no temporary file

    monkeypatch.setattr(torch, "save", real_save)
    straighten(field, train, schedule, config(iterations=4), out_dir=tmp_path, progress=False)
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(BossflowError, match="could not write .*checkpoint.pt: disk full"):
        straighten(field, train, schedule, config(iterations=8), out_dir=tmp_path, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "history.json"]


def test_export_loads_strictly_into_the_base_architecture(setup, tmp_path):
    field, schedule, train, _ = setup
    result = straighten(field, train, schedule, config(iterations=5), progress=False)
    path = save_straightened(result, tmp_path / "straight")
    assert path.name == "straight.safetensors"
    fresh = TinyField()
    fresh.load_state_dict(load_file(path), strict=True)
    x, t = torch.randn(4, 2), torch.rand(4)
    assert torch.equal(fresh(x, t), result.module(x, t))
    provenance = json.loads(path.with_suffix(".json").read_text())
    assert provenance["objective"] == "boss" and provenance["iterations"] == 5
    assert provenance["schedule"]["times"] == schedule.tolist()
    assert provenance["history"] == result.history


def test_interval_error_is_zero_on_straight_paths_and_matches_a_direct_sum(tmp_path):
    field = AffineGaussianField(scale=0.5, shift=1.0)  # straight trajectories: Euler is exact
    schedule = Schedule(np.array([0.0, 0.25, 1.0]))
    noise = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pairs = make_pairs(field, noise, schedule, tmp_path / "straight", fine_grid=4)
    assert eval_interval_error(field, pairs, schedule, range(6)) < 1e-12
    # a field that is wrong by a constant 1 in every dimension: each step misses by h per value
    wrong = lambda x, t: field(x, t) + 1.0  # noqa: E731
    expected = (0.25**2 + 0.75**2) / 2
    assert eval_interval_error(wrong, pairs, schedule, [0, 3]) == pytest.approx(expected)


def test_amp_and_cosine_schedule_run(setup):
    field, schedule, train, _ = setup
    seen: list[tuple[bool, torch.dtype]] = []  # (training?, output dtype) of the first layer

    def watch(module, inputs, output):
        seen.append((module.training, output.dtype))

    hook = field.net[0].register_forward_hook(watch)  # deep-copied with it by straighten
    cfg = config(iterations=6, warmup=2, amp=True, lr_schedule="cosine", holdout=8)
    try:
        result = straighten(field, train, schedule, cfg, progress=True)
        seen_amp = list(seen)
        seen.clear()
        straighten(field, train, schedule, replace(cfg, amp=False), progress=False)
    finally:
        hook.remove()
    assert np.isfinite(result.history[-1]["train_loss"])
    assert result.history[-1]["lr"] < cfg.lr
    # the training forwards ran under bfloat16 autocast; the held-out checks in float32
    assert [dtype for training, dtype in seen_amp if training] == [torch.bfloat16] * 6
    assert {dtype for training, dtype in seen_amp if not training} == {torch.float32}
    assert {dtype for _, dtype in seen} == {torch.float32}  # amp=False: no autocast


class DropoutField(TinyField):
    """TinyField with dropout in training mode and a fixed (non-trainable) input scale, like
    NCSN++'s dropout and its frozen Fourier features."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.fixed = nn.Parameter(torch.tensor(1.5), requires_grad=False)
        self.fourier = GaussianFourierProjection(2)  # NCSN++'s time features: W never trains
        self.functional = functional  # F.dropout: torch's generators, not the row-keyed masks

    def forward(self, x, t):
        x = self.fixed * x + 0.1 * self.fourier(t)[:, :2]
        h = super().forward(x, t)
        return F.dropout(h, 0.3, self.training) if self.functional else self.drop(h)


def test_dropout_is_seeded_per_step_and_per_rank_and_frozen_weights_stay_frozen(
    setup, monkeypatch, tmp_path
):
    """Dropout masks come from (seed, iteration, row): the same weights whatever torch's global
    generator held and whichever process holds the rows; functional dropout draws from the
    generators seeded by (seed, rank, iteration) (two processes must not share them); a resumed
    run equals the uninterrupted one; a weight the module does not train is not trained."""
    from bossflow.straighten import train as train_module

    _, schedule, train, _ = setup
    torch.manual_seed(0)
    field = DropoutField()
    cfg = config(iterations=6, checkpoint_every=3, eval_every=3)

    def run(global_seed, out=None, stop=None):
        torch.manual_seed(global_seed)

        def callback(info):
            if stop is not None and info["iteration"] == stop:
                raise KeyboardInterrupt

        r = straighten(field, train, schedule, cfg, out, progress=False, callback=callback)
        return {k: v.clone() for k, v in r.module.state_dict().items()}, r.module

    a, module = run(1)
    b, _ = run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the global generator does not matter
    assert torch.rand(()) == torch.rand((), generator=torch.Generator().manual_seed(2))  # restored
    assert a["fixed"] == 1.5 and not module.fixed.requires_grad  # frozen, and still frozen
    assert module.net[0].weight.requires_grad and not module.training
    with pytest.raises(KeyboardInterrupt):
        run(3, tmp_path / "r", stop=4)
    resumed, _ = run(4, tmp_path / "r")
    assert all(torch.equal(a[k], resumed[k]) for k in a)
    # the same run as process 1 of several: nn.Dropout's masks are the rows', F.dropout's its own
    real = train_module._step_seed
    monkeypatch.setattr(train_module, "_step_seed", lambda seed, rank, it: real(seed, 1, it))
    other, _ = run(1)
    assert all(torch.equal(a[k], other[k]) for k in a)

    def functional(rank):
        monkeypatch.setattr(train_module, "_step_seed", lambda seed, _, it: real(seed, rank, it))
        torch.manual_seed(0)
        r = straighten(DropoutField(functional=True), train, schedule, cfg, progress=False)
        return r.module.state_dict()["net.0.weight"]

    assert torch.equal(functional(0), functional(0))
    assert not torch.equal(functional(0), functional(1))
    # a module frozen for inference trains in full, except the parameters it declares fixed
    field.requires_grad_(False)
    frozen, module = run(1)
    assert torch.equal(frozen["fourier.W"], field.fourier.W) and frozen["fixed"] != 1.5
    assert not any(p.requires_grad for p in module.parameters())  # returned as it came


def test_resume_on_a_store_of_another_grid_or_dtype_is_refused(setup, tmp_path):
    """The same times and noises on another fine grid (other states) or in float16: a resumed run
    mixed them in silently."""
    field, schedule, _, _ = setup
    noise = NoiseSource((2,), seed=1)
    base = make_pairs(field, noise, schedule, tmp_path / "a", fine_grid=GRID, samples=32)
    cfg = config(iterations=4, checkpoint_every=2, holdout=8)
    straighten(field, base, schedule, replace(cfg, iterations=2), tmp_path / "run", progress=False)
    other_grid = Schedule(np.union1d(schedule.times, np.linspace(0, 1, 7)))
    others = {
        "grid": make_pairs(
            field, noise, schedule, tmp_path / "b", fine_grid=other_grid, samples=32
        ),
        "dtype": make_pairs(field, noise, schedule, tmp_path / "c", GRID, 32, dtype=torch.float16),
    }
    for store in others.values():
        with pytest.raises(CheckpointError, match="pair store"):
            straighten(field, store, schedule, cfg, tmp_path / "run", progress=False)
    assert straighten(field, base, schedule, cfg, tmp_path / "run", progress=False).iterations == 4


def test_half_precision_models_train_adapters_and_averages_in_float32(setup):
    """bf16 LoRA adapters (peft's LoraModel keeps the base dtype) barely moved under Adam, and a
    bf16 EMA stopped once (1 - d) * step fell below bf16 resolution."""
    from bossflow.training import EMA

    field, schedule, train, _ = setup
    half = copy.deepcopy(field).to(torch.bfloat16)
    seen = {}
    cfg = config(iterations=2, lora_rank=2, holdout=8)
    result = straighten(half, train, schedule, cfg, progress=False,
                        callback=lambda i: seen.setdefault("dtypes", {p.dtype for p in
                                                                      i["model"].parameters()
                                                                      if p.requires_grad}))  # fmt: skip
    assert seen["dtypes"] == {torch.float32}
    assert next(result.module.parameters()).dtype == torch.bfloat16  # merged back in bf16
    w = torch.ones(1, dtype=torch.bfloat16)
    ema = EMA([w], decay=0.999)
    with torch.no_grad():
        w.fill_(1.5)
    for n in range(20000):
        ema.update(n)
    assert abs(float(ema.shadow[0]) - 1.5) < 1e-3  # a bf16 shadow stayed near 1.07
