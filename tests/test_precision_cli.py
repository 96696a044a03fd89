"""--precision and --channels-last: the network runs cheaper, results stay those of fp32 (closely)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bossflow import Schedule
from bossflow.bellman import CostMatrix
from bossflow.cli import main
from bossflow.pretrained import load_digits_field
from bossflow.straighten import PairStore


def run(*argv) -> int:
    return main([str(a) for a in argv])


SCHEDULE = ("schedule", "--nfe", "2,4", "--kmax", 20, "--samples", 32, "--quiet", "--device", "cpu")


def test_schedule_in_fp16_channels_last_matches_fp32_and_is_its_own_cache(tmp_path, capsys):
    assert run(*SCHEDULE, "--out", tmp_path / "fp32") == 0
    assert run(*SCHEDULE, "--out", tmp_path / "fp16", "--precision", "fp16", "--channels-last") == 0
    full = CostMatrix.load(tmp_path / "fp32" / "cost_matrix.npz").values
    half = CostMatrix.load(tmp_path / "fp16" / "cost_matrix.npz").values
    rel = np.abs(half - full).max() / np.abs(full).max()
    assert 0 < rel < 1e-3  # fp16 arithmetic (not a no-op), costs still close (measured 1.8e-4)
    for k in (2, 4):
        a = Schedule.load(tmp_path / "fp32" / f"schedule_nfe{k}.json")
        b = Schedule.load(tmp_path / "fp16" / f"schedule_nfe{k}.json")
        np.testing.assert_array_equal(a.times, b.times)
        assert (
            b.provenance["precision"] == "fp16, channels-last" and "precision" not in a.provenance
        )
    # a cost matrix counted in fp32 is not extended in bf16: another precision is another field
    capsys.readouterr()
    assert run(*SCHEDULE, "--out", tmp_path / "fp32", "--precision", "bf16") == 2
    assert "was made with another model" in capsys.readouterr().err


def _plain_layout(field) -> bool:
    return all(p.is_contiguous() for p in field.parameters())


def test_straighten_makes_pairs_in_the_precision_and_trains_in_float32(tmp_path, monkeypatch):
    import importlib

    straighten_module = importlib.import_module("bossflow.straighten")  # (bossflow.straighten
    # is also the function, exported by the package)
    real, layouts = straighten_module.straighten, []

    def spy(field, *args, **kwargs):  # the student as fine-tuning trains it
        result = real(field, *args, **kwargs)
        layouts.append(_plain_layout(result.module))
        return result

    monkeypatch.setattr(straighten_module, "straighten", spy)
    schedule = tmp_path / "s"
    assert run(*SCHEDULE, "--out", schedule) == 0
    common = ("straighten", "--schedule", schedule / "schedule_nfe2.json", "--kmax", 20)
    sizes = ("--pairs", 12, "--holdout", 4, "--iterations", 2, "--batch-size", 4, "--quiet")
    for name, extra in (("fp32", ()), ("bf16", ("--precision", "bf16", "--channels-last"))):
        assert run(*common, *sizes, "--device", "cpu", "--out", tmp_path / name, *extra) == 0
    full = PairStore.open(tmp_path / "fp32" / "pairs")
    low = PairStore.open(tmp_path / "bf16" / "pairs")
    a, b = full.states[range(12)], low.states[range(12)]
    rel = float((a - b).abs().max() / a.abs().max())
    assert 0 < rel < 5e-2  # the teacher ran in bf16
    # ... and the student trained in the network's own layout (FSDP2 refuses channels-last weights)
    assert layouts == [True, True]
    provenance = json.loads((tmp_path / "bf16" / "model.json").read_text())
    assert provenance["pairs"]["precision"] == "bf16, channels-last"
    # the student is the plain network: the same keys as the base (no wrapper prefix), loadable
    base = load_digits_field().state_dict()
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert set(weights) == set(base)
    assert all(w.dtype == torch.float32 and w.is_contiguous() for w in weights.values())
    out = tmp_path / "x.pt"
    tuned = ("--schedule", schedule / "schedule_nfe2.json", "--samples", 4, "--out", out)
    assert run("sample", *tuned, "--finetuned", tmp_path / "bf16" / "model.safetensors") == 0


def test_learned_samplers_record_the_teachers_precision_and_learn_on_the_plain_network(
    tmp_path, monkeypatch
):
    import bossflow.learn as learn_module

    real, layouts = learn_module.learn_best_sampler, []

    def spy(field, *args, **kwargs):
        layouts.append(_plain_layout(field) and "Precision" not in repr(field))
        return real(field, *args, **kwargs)

    monkeypatch.setattr(learn_module, "learn_best_sampler", spy)
    learned = ("--method", "learned", "--solvers", "euler", "--learn-iterations", 2)
    extra = ("--teacher-steps", 20, "--precision", "fp16", "--channels-last")
    assert run(*SCHEDULE, *learned, *extra, "--out", tmp_path / "l") == 0
    assert layouts == [True, True]
    for k in (2, 4):
        provenance = json.loads((tmp_path / "l" / f"learned_nfe{k}.json").read_text())["provenance"]
        assert provenance["precision"] == "fp16, channels-last"


def test_sample_in_bf16_is_close_to_fp32(tmp_path):
    common = ("sample", "--nfe", 4, "--samples", 8, "--save-tensor")
    assert run(*common, tmp_path / "a.pt", "--out", tmp_path / "a.png") == 0
    assert run(*common, tmp_path / "b.pt", "--out", tmp_path / "b.png", "--precision", "bf16") == 0
    a = torch.load(tmp_path / "a.pt", weights_only=True)["samples"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["samples"]
    assert a.dtype == b.dtype == torch.float32
    rel = float((a - b).abs().max() / a.abs().max())
    assert 0 < rel < 5e-2


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ("--precision", "tf32", "--device", "cpu"),
            "--precision tf32 is a CUDA matmul mode and changes nothing on cpu",
        ),
        (
            ("--model", "spiral", "--shape", "2", "--channels-last"),
            "--channels-last is for image models",
        ),
    ],
)
def test_precision_options_that_would_do_nothing_are_refused(tmp_path, capsys, argv, message):
    assert run("schedule", "--quiet", *argv, "--out", tmp_path / "o") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # compiles (about 5 s here)
def test_compiled_network_gives_the_eager_schedule_and_keeps_its_own_cache(
    tmp_path, user_module, capsys
):
    user_module("mymodel")
    import mymodel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(mymodel.Net().state_dict(), str(tmp_path / "w.safetensors"))
    user = ("schedule", "--model", "mymodel:Net", "--checkpoint", tmp_path / "w.safetensors")
    user += ("--nfe", "2,3", "--kmax", 12, "--samples", 12, "--quiet", "--device", "cpu")
    user += ("--batch-size", 5)  # batches of 5, 5, 2: two sizes
    assert run(*user, "--out", tmp_path / "eager") == 0
    assert run(*user, "--out", tmp_path / "compiled", "--compile") == 0
    eager = CostMatrix.load(tmp_path / "eager" / "cost_matrix.npz").values
    compiled = CostMatrix.load(tmp_path / "compiled" / "cost_matrix.npz").values
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-7 * np.abs(eager).max())
    for k in (2, 3):
        a = Schedule.load(tmp_path / "eager" / f"schedule_nfe{k}.json")
        b = Schedule.load(tmp_path / "compiled" / f"schedule_nfe{k}.json")
        np.testing.assert_array_equal(a.times, b.times)
        assert b.provenance["precision"] == "compiled"
    capsys.readouterr()
    assert run(*user, "--out", tmp_path / "eager", "--compile") == 2  # another field's cache
    assert "was made with another model" in capsys.readouterr().err
