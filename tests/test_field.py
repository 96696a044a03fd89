import pytest
import torch

from bossflow import sample, uniform
from bossflow.field import (
    DiffusersField,
    FlowMatchingField,
    NFECounter,
    RectifiedFlowField,
    SpiralField,
    TorchCFMField,
    time_batch,
)


class Recorder(torch.nn.Module):
    """Returns x * (1 + time input) and records how it was called."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return args, kwargs


def test_rectified_flow_adapter_time_map():
    net = lambda x, tc: x * tc[:, None]  # noqa: E731
    field = RectifiedFlowField(net, eps=1e-3)
    x = torch.ones(3, 2)
    t = torch.tensor([0.0, 0.5, 1.0])
    out = field(x, t)
    tc = 999 * (1e-3 + (1 - 1e-3) * t)
    torch.testing.assert_close(out, tc[:, None].expand(3, 2))  # the network's own velocity
    assert field.network is net


def test_rectified_flow_uniform_euler_equals_original_sampler():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    raw = lambda x, tc: net(x) * torch.cos(tc / 999)[:, None]  # noqa: E731
    z = torch.randn(5, 3)
    # the original Euler loop (RectifiedFlow ImageGeneration/sampling.py, euler_sampler):
    # dt = 1 / N, num_t = i / N * (T - eps) + eps, pred = model_fn(x, num_t * 999), x += pred dt
    eps, n, x = 1e-3, 7, z.clone()
    with torch.no_grad():
        for i in range(n):
            t = torch.full((5,), i / n * (1.0 - eps) + eps)
            x = x + raw(x, t * 999) * (1.0 / n)
        ours = sample(RectifiedFlowField(raw, eps=eps), z, uniform(n))
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-6)


def test_diffusers_adapter_convention():
    model = lambda x, timestep: type("Out", (), {"sample": x * timestep[:, None]})()  # noqa: E731
    field = DiffusersField(model)
    x = torch.ones(2, 3)
    out = field(x, torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(out, -torch.tensor([[750.0] * 3, [0.0] * 3]))


def test_flow_matching_adapter_passes_scalar_time_and_extras():
    seen = []

    def model(x, t, label=None):
        seen.append((t.ndim, label))
        return x * t

    field = FlowMatchingField(model, label=3)
    x = torch.ones(4, 2)
    torch.testing.assert_close(field(x, torch.full((4,), 0.5)), x * 0.5)
    assert seen == [(0, 3)]
    mixed = field(x, torch.tensor([0.1, 0.2, 0.1, 0.3]))
    torch.testing.assert_close(mixed[:, 0], torch.tensor([0.1, 0.2, 0.1, 0.3]))


def test_flow_matching_time_detection_is_not_fooled_by_dropout():
    """A model that takes a (B,) time, in training mode with dropout: the two ways of calling it
    draw other masks, which made the detection settle on one call per time."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = torch.nn.Linear(3, 2), torch.nn.Dropout(0.5)

        def forward(self, x, t):
            return self.drop(self.lin(torch.cat([x, t.expand(x.shape[0])[:, None]], 1)))

    field = FlowMatchingField(Net()).train()
    field.network.lin.eval()  # a submodule its owner keeps in eval mode stays so
    field(torch.ones(4, 2), torch.tensor([0.1, 0.2, 0.1, 0.3]))
    assert field.batched_time is True
    assert field.network.training and field.network.drop.training and not field.network.lin.training


def test_flow_matching_solver_agrees_with_our_euler_on_our_grid():
    fm = pytest.importorskip("flow_matching", reason="flow_matching not installed")
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    field = SpiralField()

    class Wrapped(ModelWrapper):
        def forward(self, x, t, **extras):
            return field(x, t.expand(x.shape[0]))

    schedule = uniform(5)
    z = torch.randn(3, 4, dtype=torch.float64)
    theirs = ODESolver(Wrapped(torch.nn.Identity())).sample(
        x_init=z, time_grid=schedule.to_time_grid(z), method="euler", step_size=None
    )
    torch.testing.assert_close(theirs, sample(field, z, schedule))
    assert fm is not None


def test_torchcfm_adapter_argument_order():
    model = lambda t, x: x + t[:, None]  # noqa: E731
    out = TorchCFMField(model)(torch.zeros(2, 3), torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(out[:, 0], torch.tensor([0.1, 0.2]))
    scalar = TorchCFMField(lambda t, x: x + t, scalar_time=True)
    torch.testing.assert_close(
        scalar(torch.zeros(2, 3), torch.tensor(0.5)), torch.full((2, 3), 0.5)
    )


def test_nfe_counter_and_time_batch():
    counter = NFECounter(SpiralField())
    x = torch.zeros(5, 2)
    counter(x, torch.zeros(5))
    counter(x[:2], torch.zeros(2))
    assert (counter.nfe, counter.samples) == (2, 7)
    assert time_batch(0.3, x).shape == (5,)
    with pytest.raises(ValueError, match="shape"):
        time_batch(torch.zeros(3), x)


def test_low_precision_states_get_float32_times():
    seen = []

    def field(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert time_batch(0.55, x).dtype == torch.float32
    sample(field, x, uniform(500))
    times = torch.stack([t[0] for t in seen])
    assert times.dtype == torch.float32 and times.unique().numel() == 500  # bf16 would merge them


def test_precision_runs_the_network_cheaper_and_returns_the_states_dtype():
    from bossflow.field import Precision
    from bossflow.pretrained import load_digits_field

    torch.manual_seed(0)
    field = load_digits_field()
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    with torch.no_grad():
        full = field(x, t)
        bf16 = Precision(field)(x, t)
        layout = Precision(load_digits_field(), None, channels_last=True)(x, t)
    assert bf16.dtype == torch.float32 and bf16.is_contiguous()
    err = float((bf16 - full).abs().max() / full.abs().max())
    assert 1e-5 < err < 5e-2  # bfloat16 arithmetic: visibly different, still close
    torch.testing.assert_close(layout, full, rtol=1e-4, atol=1e-5)  # a layout change only


def test_precision_tf32_holds_only_during_the_fields_calls():
    from bossflow.checkpoint import module_fingerprint
    from bossflow.errors import ConfigError
    from bossflow.field import Precision, _tf32

    objects, name = _tf32._settings()  # fp32_precision on this torch, allow_tf32 before 2.9

    def state():
        return tuple(getattr(o, name) for o in objects)

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x, t):
            seen.append(state())
            return x

    x, t = torch.randn(2, 3), torch.rand(2)
    on = ("tf32", "tf32") if name == "fp32_precision" else (True, True)
    for user in ((), ("ieee", "ieee")) if name == "fp32_precision" else ((),):
        saved = state()
        for o, value in zip(objects, user):  # a program that set the new settings itself
            setattr(o, name, value)
        before = state()
        seen.clear()
        try:
            Precision(Probe(), None, tf32=True)(x, t)
            Precision(Probe(), None)(x, t)
            assert seen == [on, before]
            assert state() == before
        finally:
            for o, value in zip(objects, saved):
                setattr(o, name, value)
    fingerprints = {
        module_fingerprint(Precision(Probe(), None, tf32=tf32)) for tf32 in (False, True)
    }
    assert len(fingerprints) == 2  # a TF32 cache is not resumed in full fp32
    with pytest.raises(ConfigError, match="torch.float16, torch.bfloat16 or None"):
        Precision(Probe(), torch.float64)


def test_precision_compile_keeps_the_fields_weights_and_values():
    import copy

    from bossflow.checkpoint import module_fingerprint
    from bossflow.field import Precision

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    field = TorchCFMField(lambda t, x: net(x))
    field.net = net  # (the weights, as a module of the field)
    compiled = Precision(field, None, compile=True)
    x, t = torch.randn(6, 4), torch.rand(6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), field(x, t))
        torch.testing.assert_close(copy.deepcopy(compiled)(x, t), field(x, t))
    assert list(compiled.state_dict()) == [f"field.{k}" for k in field.state_dict()]
    assert module_fingerprint(compiled) != module_fingerprint(Precision(field, None))
