"""Two CPU ranks under torchrun (gloo) give the single-process results.

Each test launches ``torchrun --standalone --nproc_per_node=2`` on tests/dist_worker.py or on
``-m bossflow`` and compares with the same work done in this (single) process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bossflow import distributed as dist
from bossflow.errors import ConfigError
from bossflow.io import atomic_write_text

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dist_worker as worker  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this PyTorch has no torch.distributed"
)


@pytest.fixture(autouse=True)
def one_thread():
    """The ranks run one thread each; the single-process reference must too (float32 sums
    split over threads round differently, a difference that has nothing to do with ranks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun(*args: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (a free port; one thread per rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BOSSFLOW_PROGRESS": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(cwd), str(HERE), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in a)


# -- single process: nothing distributed is touched -------------------------------------------------


def test_single_process_needs_no_process_group(tmp_path):
    assert not dist.is_distributed() and dist.rank() == 0 and dist.world_size() == 1
    assert not dist.init_from_env()  # WORLD_SIZE unset: nothing is initialised
    assert not torch.distributed.is_initialized()
    assert dist.round_rows(8, 10, 4) == (range(8, 10), 10)
    assert dist.split_range(5) == range(5)
    x = np.arange(3.0)
    assert dist.all_reduce_sum_float64(x) is x and dist.all_gather_object(1) == [1]
    assert dist.broadcast_object("a") == "a"
    atomic_write_text(tmp_path / "f.txt", "x")  # rank 0 of one: writes
    assert (tmp_path / "f.txt").read_text() == "x"


def test_world_size_without_torchrun_variables_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(dist.DistributedError, match="launch with torchrun"):
        dist.init_from_env()


def test_one_gpu_per_process_or_one_clear_error(monkeypatch):
    """Under torchrun on CUDA each process takes the GPU of its LOCAL_RANK: more processes than
    GPUs, or one ``cuda:N`` for several processes, stop before joining the group."""
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    for key, value in {**env, "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(dist.DistributedError, match="process 1 of this node has no GPU of its own"):
        dist.init_from_env("cuda")
    with pytest.raises(dist.DistributedError, match="all 2 processes of this node on one GPU"):
        dist.init_from_env("cuda:0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per node names its GPU itself
    with pytest.raises(dist.DistributedError, match="unknown --device 'cuda:x'"):
        dist.init_from_env("cuda:x")
    assert not torch.distributed.is_initialized()


def test_train_base_refuses_torchrun(tmp_path, monkeypatch, capsys):
    """Every process would train the same model in full: one clear line instead."""
    from bossflow.cli import main

    patches = (("is_distributed", True), ("rank", 0), ("world_size", 2), ("report_failure", True))
    for name, value in patches:
        monkeypatch.setattr(dist, name, lambda *a, v=value: v)
    assert main(["train-base", "--steps", "1", "--out", str(tmp_path / "b")]) == 2
    assert "run it without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "b" / "digits.safetensors").exists()


def test_ctrl_c_on_every_rank_prints_one_line_and_tells_the_others(tmp_path, monkeypatch, capsys):
    """Ctrl-C reaches every process of a torchrun job: the first to publish it prints the one
    line (it was printed once per rank); a rank interrupted alone publishes it for the others."""
    from bossflow.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("bossflow.spec.load_model", interrupted)
    monkeypatch.chdir(tmp_path)
    published = []
    for name, value in (("is_distributed", True), ("rank", 1), ("world_size", 2)):
        monkeypatch.setattr(dist, name, lambda *a, v=value: v)
    for first in (False, True):
        monkeypatch.setattr(dist, "report_failure", lambda err, f=first: published.append(err) or f)
        assert main(["schedule", "--nfe", "2", "--samples", "4", "--quiet"]) == 130
        err = capsys.readouterr().err
        assert err.count("interrupted; rerun the same command to resume") == int(first)
    assert [type(e) for e in published] == [KeyboardInterrupt] * 2


def test_a_peer_killed_during_ddp_or_fsdp_is_one_line_not_a_model_error(monkeypatch):
    """kill -9 of one rank while training: DDP's all-reduce raised gloo's RuntimeError on the
    survivor (a traceback), FSDP's gather inside the forward pass was reported as the model
    raising, with advice about --shape."""
    from bossflow.errors import DistributedError
    from bossflow.field import call_field

    for name, value in (("is_distributed", True), ("rank", 0), ("world_size", 2)):
        monkeypatch.setattr(dist, name, lambda *a, v=value: v)
    monkeypatch.setattr(dist, "_store", lambda: None)  # nobody published a message
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:4242: Connection reset by peer")  # fmt: skip
    lost = dist.lost_peer(gloo, "the gradient reduction")
    assert isinstance(lost, DistributedError)
    assert str(lost).startswith("the gradient reduction failed on rank 0 ([../third_party/gloo")
    assert "another process probably died" in str(lost)
    assert dist.lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), "x") is None

    def gathering(x, t):
        raise gloo

    with pytest.raises(DistributedError, match="the model's forward pass failed on rank 0"):
        call_field(gathering, torch.zeros(2, 3), torch.zeros(2), "the model")


def test_run_demo_from_python_prints_on_rank_zero_only(tmp_path, monkeypatch):
    """run_demo called by every process of a torchrun job: the CLI silences the other ranks'
    stdout, a Python caller relies on run_demo (its stage lines and bars came once per rank)."""
    from bossflow import pipeline

    seen = []
    monkeypatch.setattr(
        pipeline, "_run_demo_locked", lambda out, cfg, dev, progress: seen.append(progress)
    )
    for zero in (True, False):
        monkeypatch.setattr(dist, "is_rank_zero", lambda z=zero: z)
        pipeline.run_demo(tmp_path / "demo", progress=True)
    assert seen == [True, False]


def test_batch_that_does_not_split_is_refused_before_the_pairs(tmp_path, monkeypatch, capsys):
    """--batch-size 16 on 3 processes was refused by straighten() after every pair was made."""
    from bossflow.cli import main
    from bossflow.pipeline import DemoConfig, run_demo
    from bossflow.schedule import uniform

    uniform(2).save(tmp_path / "s.json")
    patches = (("is_distributed", True), ("rank", 0), ("world_size", 3), ("report_failure", True))
    for name, value in patches:
        monkeypatch.setattr(dist, name, lambda *a, v=value: v)
    out = tmp_path / "st"
    argv = ["straighten", "--schedule", str(tmp_path / "s.json"), "--batch-size", "16"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    assert (
        "--batch-size 16 is split over 3 processes; pass a multiple of 3" in capsys.readouterr().err
    )
    assert not out.exists()  # no pairs
    with pytest.raises(ConfigError, match=r"fine-tuning batch \(--batch-size\) 32 is split over 3"):
        run_demo(tmp_path / "demo", DemoConfig.quick())
    assert not (tmp_path / "demo" / "schedule").exists()
    # the demo's own option for it (the demo had none: its advice could not be followed)
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--quiet"]) == 2
    assert "(--batch-size) 32 is split over 3 processes" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr("bossflow.pipeline.run_demo", lambda out, config, **kw: seen.append(config))
    assert main(["demo", "--quick", "--batch-size", "33", "--out", str(tmp_path / "demo")]) == 0
    assert seen[0].batch_size == 33 and seen[0].iterations == DemoConfig.quick().iterations


@pytest.mark.slow
def test_sharding_options_on_one_process(tmp_path, capsys):
    from bossflow.cli import main
    from bossflow.errors import ConfigError
    from bossflow.straighten import StraightenConfig

    with pytest.raises(ConfigError, match='use sharding="ddp"'):
        StraightenConfig(sharding="fsdp", lora_rank=2).check()
    with pytest.raises(ConfigError, match="unknown sharding 'zero3'"):
        StraightenConfig(sharding="zero3").check()
    # one process: nothing to shard, the same run
    _, scheds = worker.schedules(tmp_path)
    store = worker.pairs(tmp_path, scheds)
    a = worker.train(store, scheds[2], 0, None, sharding="fsdp")
    b = worker.train(store, scheds[2], 0, None)
    assert max_rel(a.module.state_dict(), b.module.state_dict()) == 0
    scheds[2].save(tmp_path / "s.json")
    args = ["straighten", "--sharding", "fsdp", "--lora-rank", "2", "--schedule"]
    assert main([*args, str(tmp_path / "s.json"), "--out", str(tmp_path / "x")]) == 2
    assert 'use sharding="ddp"' in capsys.readouterr().err


# -- two ranks ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    """Cost matrix to 1e-12 relative, identical schedules and pairs (and shards), full and LoRA
    straightening with the same global batch to 1e-4, LoRA adapters equal on both ranks."""
    run = torchrun(str(HERE / "dist_worker.py"), "all", str(tmp_path / "two"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "result.pt", weights_only=False)
    (tmp_path / "one").mkdir()
    one = worker.run_all(tmp_path / "one")

    assert two["count"] == one["count"] == worker.SAMPLES
    scale = np.abs(one["cost_sum"]).max()
    assert np.abs(two["cost_sum"] - one["cost_sum"]).max() <= 1e-12 * scale
    assert np.abs(two["cost_sumsq"] - one["cost_sumsq"]).max() <= 1e-12 * one["cost_sumsq"].max()
    assert two["schedules"] == one["schedules"]
    assert torch.equal(two["pairs"], one["pairs"])
    assert two["shards"] == one["shards"]  # the same shard files as one process writes
    # reference solves, evaluation and teacher endpoints split 3 + 2, gathered in sample order
    for key in ("reference", "samples", "teacher"):
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two["mse"], one["mse"], rtol=1e-4)
    # sampler learning, data parallel: the same steps as one process with the whole batch
    assert two["learned"]["solver"] == one["learned"]["solver"]
    assert not np.allclose(one["learned"]["times"], one["schedules"][2], rtol=1e-3)  # it moved
    for key in ("times", "scales"):
        np.testing.assert_allclose(two["learned"][key], one["learned"][key], rtol=1e-6)
    for key in ("train_loss", "heldout_loss"):
        np.testing.assert_allclose(
            [h[key] or 0.0 for h in two["learn_history"]],
            [h[key] or 0.0 for h in one["learn_history"]],
            rtol=1e-6,
        )
    for lora in (0, 2):
        assert max_rel(two[f"weights_{lora}"], one[f"weights_{lora}"]) <= 1e-4
        assert not any(k.startswith("module.") for k in two[f"weights_{lora}"])
        h1, h2 = one[f"history_{lora}"], two[f"history_{lora}"]
        assert [h["iteration"] for h in h1] == [h["iteration"] for h in h2]
        # the callback's loss is the global batch's, not this rank's share's
        np.testing.assert_allclose(two[f"losses_{lora}"], one[f"losses_{lora}"], rtol=1e-4)
        np.testing.assert_allclose(
            [h["heldout_loss"] for h in h2], [h["heldout_loss"] for h in h1], rtol=1e-4
        )
        # the weights moved: a run that trained nothing would also "match"
        base = worker.field().state_dict()
        assert max_rel(one[f"weights_{lora}"], base) > 1e-3
    # LoRA processes in lockstep: both ranks hold the same adapters (drift would show here)
    rank0, rank1 = two["adapters_by_rank"]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


@pytest.mark.slow
def test_killed_at_two_ranks_resumes_at_one_then_two(tmp_path):
    """2 ranks stop after the checkpoint at 3, one process continues past the one at 6, two ranks
    finish at 9: the weights of an uninterrupted single-process run."""
    out = tmp_path / "run"
    first = torchrun(str(HERE / "dist_worker.py"), "resume", str(out), "4", "2", cwd=tmp_path)
    assert first.returncode != 0  # the callback killed it
    assert (out / "train" / "checkpoint.pt").exists()
    assert torch.load(out / "train" / "checkpoint.pt", weights_only=False)["iteration"] == 3

    _, scheds = worker.schedules(out)
    store = worker.pairs(out, scheds)
    with pytest.raises(worker.Stop):  # one process: from 3 to the checkpoint at 6, then dies
        worker.train(store, scheds[2], 2, out / "train", 9, stop=7)
    assert torch.load(out / "train" / "checkpoint.pt", weights_only=False)["iteration"] == 6

    last = torchrun(str(HERE / "dist_worker.py"), "resume", str(out), "0", "2", cwd=tmp_path)
    assert last.returncode == 0, last.stderr[-3000:]
    resumed = torch.load(out / "final.pt")

    (tmp_path / "ref").mkdir()
    shutil.copytree(out / "pairs", tmp_path / "ref" / "pairs")
    whole = worker.train(store, scheds[2], 2, tmp_path / "ref" / "train", 9)
    assert max_rel(resumed, whole.module.state_dict()) <= 1e-4


@pytest.mark.slow
def test_fsdp_sharded_full_fine_tuning_is_the_ddp_run_and_resumes_unsharded(tmp_path):
    """FSDP2 over 2 ranks is the same optimisation as DDP over 2 ranks (to float rounding), its
    checkpoint holds plain full tensors, and one unsharded process resumes it."""
    out = tmp_path / "run"
    run = torchrun(str(HERE / "dist_worker.py"), "fsdp", str(out), cwd=tmp_path, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    two = torch.load(out / "fsdp.pt", weights_only=False)
    fsdp, ddp = two["fsdp"], two["ddp"]
    assert max_rel(fsdp["weights"], ddp["weights"]) <= 1e-6  # measured: 0 (bit for bit)
    assert [h["heldout_loss"] for h in fsdp["history"]] == pytest.approx(
        [h["heldout_loss"] for h in ddp["history"]], rel=1e-6
    )
    assert max_rel(fsdp["weights"], worker.field().state_dict()) > 1e-3  # it trained
    ckpt = torch.load(out / "train" / "checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] == 3
    assert all(type(v) is torch.Tensor for v in ckpt["model"].values())  # no DTensor shards
    assert all(type(v) is torch.Tensor for v in ckpt["ema"].values())
    assert sorted(ckpt["optimizer"]["state"]) == list(range(len(ckpt["ema"])))  # plain layout
    _, scheds = worker.schedules(out)
    store = worker.pairs(out, scheds)
    resumed = worker.train(store, scheds[2], 0, out / "train", 9)  # one process, not sharded
    assert resumed.iterations == 9 and resumed.history[-1]["iteration"] == 9
    whole = worker.train(store, scheds[2], 0, None, 9)
    assert max_rel(resumed.module.state_dict(), whole.module.state_dict()) <= 1e-4  # 5.7e-5


_FAILING_MODULE = """\
import os
import torch

class Net(torch.nn.Module):
    sample_shape = (4,)

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 4)

    def forward(self, x, t):
        if os.environ.get("RANK") == "1":  # bad input on one rank
            raise ValueError("rank one cannot take this input")
        return self.lin(torch.cat([x, t[:, None]], 1))
"""


_UNUSED_MODULE = """\
import torch

class Net(torch.nn.Module):
    sample_shape = (2,)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))
        self.head = torch.nn.Linear(4, 4)  # trainable, never called (an unused head, say)

    def forward(self, x, t):
        return self.lin(torch.cat([x, t[:, None]], 1))
"""


@pytest.mark.slow
def test_a_model_with_unused_parameters_trains_as_on_one_process(tmp_path):
    """DDP's default stops at the second step of a model whose loss leaves a trainable parameter
    unused ("Expected to have finished reduction…"); one process trains it fine."""
    from safetensors.torch import load_file

    from bossflow.cli import main

    (tmp_path / "unused.py").write_text(_UNUSED_MODULE)
    model = ["--model", "unused:Net"]
    train = ["straighten", *model, "--schedule", "s/schedule_nfe2.json", "--pairs", "16"]
    train += ["--iterations", "3", "--batch-size", "4", "--quiet"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        mp.syspath_prepend(str(tmp_path))
        args = ["schedule", *model, "--nfe", "2", "--kmax", "10", "--samples", "8", "--quiet"]
        assert main([*args, "--out", "s"]) == 0
        assert main([*train, "--out", "one"]) == 0
    run = torchrun("-m", "bossflow", *train, "--out", "two", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    two, one = (load_file(tmp_path / w / "model.safetensors") for w in ("two", "one"))
    assert max_rel(two, one) <= 1e-5


def test_no_option_is_taken_by_torchrun():
    """torchrun parses the options after ``-m bossflow CMD`` for abbreviations of its own: an
    option of ours that is a prefix of one of torchrun's (``--n`` of ``--nnodes``) would stop the
    launch or, if unambiguous, go to torchrun instead of bossflow."""
    import argparse

    from torch.distributed.run import get_args_parser

    from bossflow.cli import build_parser

    theirs = {o for a in get_args_parser()._actions for o in a.option_strings}
    taken = []
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for o in (o for a in sub._actions for o in a.option_strings):
                    if (
                        o != "--help"
                        and o.startswith("--")
                        and any(t.startswith(o) for t in theirs)
                    ):
                        taken.append(f"{name} {o}")
    assert taken == ["sample --n"]  # kept as an alias; --samples is the name to use under torchrun


@pytest.mark.slow
def test_cli_commands_under_torchrun_match_one_process(tmp_path):
    """``torchrun -m bossflow`` schedule (with learned samplers), evaluate, sample and straighten
    (LoRA, DDP): the files one process writes, written once, with the same contents to float
    rounding."""
    import json

    from bossflow.cli import main

    schedule = ["schedule", "--model", "digits", "--samples", "16", "--kmax", "10", "--nfe", "2"]
    schedule += ["--method", "learned", "--learn-iterations", "3", "--learn-holdout", "4"]
    schedule += ["--batch-size", "4", "--quiet"]

    def evaluate(where: str) -> list[str]:
        return [
            "evaluate", "--model", "digits", "--schedule", f"{where}/s/learned_nfe2.json",
            "--nfe", "2", "--samples", "6", "--reference-steps", "20", "--out", f"{where}/e",
            "--quiet",
        ]  # fmt: skip

    def sample(where: str) -> list[str]:
        return [
            "sample", "--model", "digits", "--schedule", f"{where}/s/learned_nfe2.json",
            "--samples", "5", "--out", f"{where}/x.png", "--save-tensor", f"{where}/x.pt",
        ]  # fmt: skip

    def straighten(where: str) -> list[str]:
        return [
            "straighten", "--model", "digits", "--schedule", f"{where}/s/schedule_nfe2.json",
            "--pairs", "16", "--iterations", "4", "--batch-size", "8", "--lora-rank", "2",
            "--out", f"{where}/b", "--quiet",
        ]  # fmt: skip

    for args, once in (
        ([*schedule, "--out", "two/s"], "Bellman schedules"),
        (evaluate("two"), "report: "),
        (sample("two"), "5 samples"),
        (straighten("two"), "wrote "),
    ):
        run = torchrun("-m", "bossflow", *args, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count(once) == 1  # rank 0 alone prints
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert main([*schedule, "--out", "one/s"]) == 0
        assert main(evaluate("one")) == 0
        assert main(sample("one")) == 0
        assert main(straighten("one")) == 0

    def files(where: str) -> list[str]:
        root = tmp_path / where
        return sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file())

    assert files("two") == files("one")  # no stray temporary or per-rank files
    for name in ("s/schedule_nfe2.json", "s/learned_nfe2.json"):
        two, one = (json.loads((tmp_path / w / name).read_text()) for w in ("two", "one"))
        np.testing.assert_allclose(two["times"], one["times"], rtol=1e-9)
        assert two.get("solver") == one.get("solver")
    two, one = (json.loads((tmp_path / w / "e/results.json").read_text()) for w in ("two", "one"))
    assert [r["method"] for r in two["records"]] == [r["method"] for r in one["records"]]
    for key in ("mse_to_reference", "frechet"):
        np.testing.assert_allclose(
            [r[key] for r in two["records"]], [r[key] for r in one["records"]], rtol=1e-5
        )
    from safetensors.torch import load_file

    weights = [load_file(tmp_path / w / "b/model.safetensors") for w in ("two", "one")]
    assert not any(k.startswith("module.") for k in weights[0])
    assert max_rel(weights[0], weights[1]) <= 1e-4
    x = [torch.load(tmp_path / w / "x.pt") for w in ("two", "one")]
    torch.testing.assert_close(x[0], x[1], rtol=1e-5, atol=1e-6)
    cost = [np.load(tmp_path / w / "s/cost_matrix.npz") for w in ("two", "one")]
    for key in cost[1].files:
        if cost[1][key].dtype.kind == "f":
            np.testing.assert_allclose(cost[0][key], cost[1][key], rtol=1e-12, atol=0)


@pytest.mark.slow
def test_guided_demo_under_torchrun_is_the_one_process_demo(tmp_path):
    """``torchrun -m bossflow demo --model digits-cond``: every stage (schedules, BOSS full and
    LoRA, reflow, learned samplers, evaluation) on two ranks, guided and conditioned by sample
    index, writes the files and records one process writes."""
    import json

    from bossflow.cli import main

    args = ["demo", "--quick", "--model", "digits-cond", "--iterations", "4"]
    args += ["--pair-samples", "64", "--eval-samples", "32", "--quiet"]
    run = torchrun("-m", "bossflow", *args, "--out", "two", cwd=tmp_path, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert main([*args, "--out", "one"]) == 0

    def files(where: str) -> list[str]:
        root = tmp_path / where
        return sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file())

    assert files("two") == files("one")  # rank 0 alone writes, and nothing is left behind
    two, one = (json.loads((tmp_path / w / "results.json").read_text()) for w in ("two", "one"))
    assert two["schedules"] == one["schedules"]
    assert two["class_agreement"] == one["class_agreement"]
    assert [(r["method"], r["nfe"]) for r in two["records"]] == [
        (r["method"], r["nfe"]) for r in one["records"]
    ]
    assert {r["method"] for r in one["records"]} >= {"bellman", "learned", "boss", "boss-lora"}
    for key in ("mse_to_reference", "frechet"):
        np.testing.assert_allclose(
            [r[key] for r in two["records"]], [r[key] for r in one["records"]], rtol=1e-4
        )
    for name, learned in one["learned_samplers"].items():
        assert two["learned_samplers"][name]["chosen"] == learned["chosen"]


@pytest.mark.slow
def test_rectified_flow_checkpoint_straightens_on_two_ranks(tmp_path):
    """The README's torchrun example on NCSN++ (the tiny released-layout checkpoint of the
    fixtures, with the released models' dropout): LoRA through DDP and full fine-tuning through
    FSDP2 give the one-process weights (dropout masks are keyed by row, not by process)."""
    import json

    from safetensors.torch import load_file

    from bossflow.cli import main
    from bossflow.spec import load_model

    fixtures = HERE / "fixtures" / "rectified_flow"
    config = json.loads((fixtures / "tiny_cifar_like.json").read_text())["config"]
    config["model"]["dropout"] = 0.15  # as the released CIFAR-10 model trains
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    model = ["--model", f"rectified-flow:{tmp_path / 'tiny.json'}", "--device", "cpu"]
    model += ["--checkpoint", str(fixtures / "tiny_cifar_like_checkpoint.pth")]
    loaded = load_model(model[1], checkpoint=model[5]).field.network.state_dict()
    original = {k: v.clone() for k, v in loaded.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        args = ["schedule", *model, "--nfe", "2", "--kmax", "6", "--samples", "4", "--quiet"]
        assert main([*args, "--out", "s"]) == 0
        train = ["straighten", *model, "--schedule", "s/schedule_nfe2.json", "--pairs", "8"]
        train += ["--iterations", "3", "--batch-size", "4", "--quiet"]
        for name, extra in (("lora", ["--lora-rank", "4"]), ("full", [])):
            assert main([*train, *extra, "--out", f"one-{name}"]) == 0
    # channels-last pairs; FSDP2 refused the student's channels-last weights after the pairs
    fsdp_cl = ("full-cl", ["--sharding", "fsdp", "--channels-last"])
    for name, extra in (("lora", ["--lora-rank", "4"]), ("full", ["--sharding", "fsdp"]), fsdp_cl):
        run = torchrun("-m", "bossflow", *train, *extra, "--out", f"two-{name}", cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        two, one = (
            load_file(tmp_path / folder / "model.safetensors")
            for folder in (f"two-{name}", f"one-{name.split('-')[0]}")
        )
        # measured 7e-8 (LoRA), 5e-7 (full), 3e-6 (channels-last); per-process dropout masks
        # were 7e-5 and 2e-4 off
        assert max_rel(two, one) <= 1e-5, name
        moved = max(float((one[k] - original[k]).abs().max()) for k in one)
        assert moved > 1e-6, name  # the runs trained


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_match_one_process(tmp_path):
    """The multi-node launch of the README, as two "nodes" of one process each on this machine
    (c10d rendezvous; LOCAL_RANK is 0 on both): the schedule one process computes."""
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BOSSFLOW_PROGRESS": "0"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
    launch += ["--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=bossflow"]
    args = ["schedule", "--model", "digits", "--samples", "12", "--kmax", "10", "--nfe", "2,3"]
    args += ["--batch-size", "4", "--quiet"]
    nodes = [
        subprocess.Popen(
            [*launch, "-m", "bossflow", *args, "--out", "two"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outs = [node.communicate(timeout=120) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert sum(out.count("Bellman schedules") for out, _ in outs) == 1  # global rank 0 prints
    from bossflow.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert main([*args, "--out", "one"]) == 0
    cost = [np.load(tmp_path / w / "cost_matrix.npz") for w in ("two", "one")]
    for key in cost[1].files:
        if cost[1][key].dtype.kind == "f":
            np.testing.assert_allclose(cost[0][key], cost[1][key], rtol=1e-12, atol=0)
    for k in (2, 3):
        name = f"schedule_nfe{k}.json"
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()


@pytest.mark.slow
def test_nodes_without_a_shared_output_folder_are_told_so(tmp_path):
    """Two "nodes" whose --out is not one folder (each rank in its own working directory), where
    node 0 holds a finished run: the rank that cannot read rank 0's pairs, then its checkpoint,
    says the folder must be shared (it said "make one with make_pairs" / "not necessarily
    damaged"); ranks that read different checkpoints are refused."""
    from bossflow.cli import main
    from bossflow.schedule import uniform

    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
        uniform(2).save(tmp_path / node / "s.json")
    (tmp_path / "node.py").write_text(
        "import os, sys\nos.chdir(f\"node{os.environ['LOCAL_RANK']}\")\n"
        "from bossflow.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    args = ["straighten", "--schedule", "s.json", "--pairs", "8", "--iterations", "2"]
    args += ["--batch-size", "4", "--out", "b", "--quiet"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path / "node0")
        assert main(args) == 0

    def error() -> str:
        run = torchrun("node.py", *args, cwd=tmp_path, timeout=60)
        assert run.returncode != 0
        lines = [ln for ln in run.stderr.splitlines() if ln.startswith("bossflow straighten: e")]
        assert len(lines) == 1, run.stderr[-3000:]
        assert "must be one folder that all processes (all nodes) see" in lines[0]
        return lines[0]

    assert "[rank 1/2] rank 0 wrote the pairs in b/pairs, which this process cannot" in error()
    shutil.rmtree(tmp_path / "node1" / "b")  # what rank 1 began there
    shutil.copytree(tmp_path / "node0" / "b" / "pairs", tmp_path / "node1" / "b" / "pairs")
    assert "[rank 1/2] rank 0 resumes from b/train/checkpoint.pt, which this process" in error()
    ckpt = torch.load(tmp_path / "node0" / "b" / "train" / "checkpoint.pt", weights_only=False)
    ckpt["wall_s"] += 1.0  # another (stale) copy of the same run
    (tmp_path / "node1" / "b" / "train").mkdir(exist_ok=True)
    torch.save(ckpt, tmp_path / "node1" / "b" / "train" / "checkpoint.pt")
    assert "the processes read different checkpoints in b/train/checkpoint.pt" in error()


@pytest.mark.slow
def test_failing_rank_ends_the_job_with_its_message(tmp_path):
    (tmp_path / "failmod.py").write_text(_FAILING_MODULE)
    start = time.monotonic()
    run = torchrun(
        "-m", "bossflow", "schedule", "--model", "failmod:Net", "--samples", "64",
        "--batch-size", "4", "--kmax", "10", "--nfe", "2", "--out", "out", "--quiet",
        cwd=tmp_path, timeout=60,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert run.returncode != 0
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("bossflow schedule: error:")]
    assert len(lines) == 1, run.stderr[-3000:]  # one message, from the rank that failed
    assert "[rank 1/2]" in lines[0] and "rank one cannot take this input" in lines[0]
    assert elapsed < 30  # not the collective's 30-minute timeout
    assert not (tmp_path / "out" / "cost_matrix.npz").exists()
