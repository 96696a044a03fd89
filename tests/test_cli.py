import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bossflow import Schedule
from bossflow.bellman import CostMatrix
from bossflow.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "rectified_flow"


def run(command: str, *more) -> int:
    """``main`` on ``command`` split at spaces, then ``more`` (paths, values) as strings."""
    return main(command.split() + [str(a) for a in more])


def test_schedule_writes_matrix_and_schedules(tmp_path, capsys):
    out = tmp_path / "run"
    spiral = "schedule --model spiral --nfe 2,3 --kmax 12 --samples 10 --quiet"
    assert run(f"{spiral} --batch-size 4 --out", out) == 0
    printed = capsys.readouterr().out
    assert "NFE" in printed and "0.000" in printed
    cost = CostMatrix.load(out / "cost_matrix.npz")
    assert cost.count == 10 and cost.values.shape == (13, 13)
    for k in (2, 3):
        s = Schedule.load(out / f"schedule_nfe{k}.json")
        assert s.steps == k and s.method == "bellman"
        assert s.provenance["model"] == "spiral" and s.provenance["samples"] == 10
    # another batch size gives the same matrix: sample m's noise depends only on (seed, m)
    again = tmp_path / "again"
    assert run(f"{spiral} --batch-size 10 --out", again) == 0
    np.testing.assert_allclose(
        CostMatrix.load(again / "cost_matrix.npz").values, cost.values, rtol=1e-12
    )
    # asking for more samples resumes from the 10 already counted
    assert run("schedule --model spiral --nfe 2 --kmax 12 --samples 14 --quiet --out", out) == 0
    assert CostMatrix.load(out / "cost_matrix.npz").count == 14


def test_schedule_on_user_module_with_checkpoint(tmp_path, user_module, capsys):
    user_module("mymodel")
    import mymodel
    from safetensors.torch import save_file

    save_file(mymodel.Net().state_dict(), str(tmp_path / "w.safetensors"))
    user = "schedule --model mymodel:Net --quiet --device cpu --nfe 2 --kmax 8 --samples 4"
    assert run(f"{user} --out", tmp_path / "o", "--checkpoint", tmp_path / "w.safetensors") == 0
    # a checkpoint with another shape names the key
    bad = {"lin.weight": torch.zeros(3, 5), "lin.bias": torch.zeros(4)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    assert run(f"{user} --out", tmp_path / "o2", "--checkpoint", tmp_path / "bad.safetensors") == 2
    assert "lin.weight" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        ("--model nope", "unknown model 'nope'"),
        ("--model no_such_module:f", "cannot import"),
        ("--model spiral --nfe 30 --kmax 20", "raise --kmax"),
        ("--model spiral --checkpoint x.pt", "no weights"),
        ("--model rectified-flow:cifar10", "--checkpoint"),
    ],
)
def test_schedule_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    assert run(f"schedule {args} --quiet --out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_output_folder_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert run("schedule --model spiral --quiet --out", f) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_help_explains_options():
    command = [sys.executable, "-m", "bossflow.cli", "schedule", "--help"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    options = ("--nfe", "--kmax", "--samples", "--batch-size", "--seed", "--out", "--checkpoint")
    for option in (*options, "--convention"):
        assert option in out


@pytest.mark.slow
def test_schedule_and_sample_on_rectified_flow_checkpoint(tmp_path):
    config = json.loads((FIXTURES / "tiny_cifar_like.json").read_text())["config"]
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    spec = f"--model rectified-flow:{tmp_path / 'tiny.json'} --device cpu"
    weights = ("--checkpoint", FIXTURES / "tiny_cifar_like_checkpoint.pth")
    out = tmp_path / "s"
    assert run(f"schedule {spec} --nfe 2 --kmax 6 --samples 2 --quiet --out", out, *weights) == 0
    s = Schedule.load(out / "schedule_nfe2.json")
    assert "tiny_cifar_like_checkpoint.pth" in s.provenance["model"]
    png = tmp_path / "x.png"
    assert (
        run(f"sample {spec} --n 2 --out", png, "--schedule", out / "schedule_nfe2.json", *weights)
        == 0
    )
    assert png.stat().st_size > 0
    # straighten (LoRA) and evaluate the fine-tuned network, all from the released layout
    tuned = tmp_path / "st"
    schedule = ("--schedule", out / "schedule_nfe2.json")
    train = "--pairs 8 --iterations 2 --batch-size 4 --lora-rank 4 --quiet"
    assert run(f"straighten {spec} {train} --out", tuned, *schedule, *weights) == 0
    finetuned = ("--finetuned", tuned / "model.safetensors", "--method", "boss-lora")
    ev = tmp_path / "ev"
    evaluate = f"evaluate {spec} --samples 2 --reference-steps 4 --out"
    assert run(evaluate, ev, *schedule, *weights, *finetuned) == 0
    records = json.loads((ev / "results.json").read_text())["records"]
    assert [(r["method"], r["nfe"]) for r in records] == [("boss-lora", 2)]


@pytest.mark.slow
def test_train_base_writes_loadable_weights_with_provenance(tmp_path):
    out = tmp_path / "base"
    assert (
        run("train-base --steps 3 --classifier-steps 3 --check-samples 4 --quiet --out", out) == 0
    )
    meta = json.loads((out / "digits.json").read_text())
    assert meta["class"] == "DigitUNet" and meta["provenance"]["settings"]["steps"] == 3
    assert "checkpoint" not in meta["provenance"]["call"]  # the call as given
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".checkpoint")) == []
    assert (
        run(
            "sample --nfe 2 --n 2 --device cpu --out",
            tmp_path / "s.png",
            "--checkpoint",
            out / "digits.safetensors",
        )
        == 0
    )


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu", "unknown --device"),
        ("cuda:0", "CUDA"),
        ("meta", "not available in this torch"),  # was a traceback from deep inside
        ("cuda:64", "CUDA"),
    ],
)
def test_bad_device_is_one_clear_line(tmp_path, capsys, device, message):
    if device == "cuda:0" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert run(f"schedule --model spiral --quiet --device {device} --out", tmp_path / "o") == 2
    assert message in capsys.readouterr().err


def test_small_input_errors():
    from bossflow.errors import BossflowError, ConfigError
    from bossflow.io import atomic_write_text
    from bossflow.noise import NoiseSource
    from bossflow.pipeline import DemoConfig

    with pytest.raises(ConfigError, match="non-negative"):
        NoiseSource((2,), seed=-1)
    with pytest.raises(ConfigError, match="must be among nfes"):
        DemoConfig(nfes=(2, 4), straighten_nfes=(3,))
    # the learning's checks come before stage 1, not at stage 3 after the straightening
    with pytest.raises(ConfigError, match="learn_samples 1 leaves no noise to learn on"):
        DemoConfig(learn_samples=1)
    with pytest.raises(ConfigError, match="none of learn_solvers heun can spend exactly 3"):
        DemoConfig(
            nfes=(2, 3),
            learn_nfes=(3,),
            straighten_nfes=(2,),
            boss_learn_nfes=(2,),
            learn_solvers=("heun",),
        )
    with pytest.raises(BossflowError, match="could not write"):
        atomic_write_text("/proc/bossflow-test.json", "{}")


def test_sample_out_pt_keeps_the_picture_beside_the_tensor(tmp_path):
    """--out pts.pt for 2-D points wrote the scatter plot, then the tensor over it."""
    out = tmp_path / "pts.pt"
    assert run("sample --model spiral --shape 2 --nfe 4 --samples 8 --out", out) == 0
    assert (tmp_path / "pts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.load(out, weights_only=True)["samples"].shape == (8, 2)


@pytest.mark.parametrize(
    "command, message",
    [
        (  # refused before the cost matrix and the teacher solve, naming the options
            "schedule --model spiral --method learned --samples 16 --learn-holdout 16 --quiet",
            "--learn-holdout 16 leaves no training noise among --samples 16",
        ),
        (  # --classifier-steps was silently ignored
            "train-base --conditional --classifier-steps 5 --quiet",
            "--conditional trains the flow model only",
        ),
    ],
)
def test_options_that_cannot_work_together_are_refused_first(tmp_path, capsys, command, message):
    assert run(f"{command} --out", tmp_path / "o") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sigterm_unwinds_like_ctrl_c_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    """torchrun stops its workers with SIGTERM (after a failure or a Ctrl-C): a worker writing a
    file left its half-written temporary behind (the default SIGTERM ends the process at once)."""
    import os
    import signal

    from bossflow import io

    real = io._fsync

    def terminated_while_writing(path, directory=False):
        if not directory:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the temporary is being written
        return real(path, directory=directory)

    monkeypatch.setattr(io, "_fsync", terminated_while_writing)
    from bossflow import distributed

    real_shutdown = distributed.shutdown

    def terminated_again_while_cleaning_up():  # a scheduler's SIGTERM and torchrun's, say
        os.kill(os.getpid(), signal.SIGTERM)
        real_shutdown()

    monkeypatch.setattr(distributed, "shutdown", terminated_again_while_cleaning_up)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "s"
    argv = ["schedule", "--nfe", "2", "--kmax", "8", "--samples", "4", "--quiet", "--out", str(out)]
    assert main(argv) == 130
    assert (
        "bossflow schedule: interrupted; rerun the same command to resume"
        in capsys.readouterr().err
    )
    assert not [p.name for p in out.rglob("*") if ".tmp" in p.name]
    assert not (out / "cost_matrix.npz").exists()  # the write that was interrupted
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler back
