"""The end-to-end demo and the CLI commands over it (sample, evaluate, straighten), on digits."""

import json

import pytest
import torch

from bossflow.cli import main
from bossflow.metrics import METHODS
from bossflow.pipeline import DemoConfig, run_demo
from bossflow.sampler import load_schedule

REQUIRED = {"method", "nfe", "mse_to_reference", "psnr", "frechet", "wall_s", "iterations"}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    return out


@pytest.mark.slow
def test_quick_demo_writes_a_valid_report(quick_demo):
    results = json.loads((quick_demo / "results.json").read_text())
    records = results["records"]
    assert all(set(r) >= REQUIRED for r in records)
    cfg = DemoConfig.quick()
    seen = {(r["method"], r["nfe"]) for r in records}
    for k in cfg.nfes:
        assert {("uniform", k), ("edm", k), ("bellman", k)} <= seen
    for k in cfg.straighten_nfes:
        assert {("boss", k), ("boss-lora", k), ("reflow", k)} <= seen
    assert ("reference", cfg.reference_steps) in seen
    for k in cfg.learn_nfes:  # learned samplers: one row per budget, NFE counted = K
        assert ("learned", k) in seen
        sampler = load_schedule(quick_demo / "schedule" / f"learned_nfe{k}.json")
        assert sampler.nfe == k and sampler.solver in cfg.learn_solvers
        chosen = results["learned_samplers"][f"learned-nfe{k}"]
        assert set(chosen["families"]) == set(cfg.learn_solvers)
        best = min(chosen["families"].items(), key=lambda kv: kv[1]["heldout_mse"])[0]
        assert chosen["chosen"] == sampler.solver == best
    for k in cfg.boss_learn_nfes:
        assert ("boss-learned", k) in seen
        assert (quick_demo / "straighten" / f"boss-nfe{k}" / f"learned_nfe{k}.json").exists()
    assert {r["method"] for r in records} <= set(METHODS)
    for r in records:
        if r["method"] == "reference":
            assert r["mse_to_reference"] == 0
        else:
            assert r["mse_to_reference"] > 0 and r["wall_s"] > 0
        if r["method"] in ("boss", "boss-lora", "reflow", "boss-learned"):
            assert r["iterations"] is not None
    for name in ("report.md", "samples.png", "schedules.png", "error_vs_nfe.png"):
        assert (quick_demo / name).stat().st_size > 0
    # more steps of the same schedule family get closer to the reference
    mse = {(r["method"], r["nfe"]): r["mse_to_reference"] for r in records}
    assert mse[("uniform", 4)] < mse[("uniform", 2)]
    assert mse[("bellman", 4)] < mse[("bellman", 2)]


@pytest.mark.slow
def test_demo_rerun_resumes_instead_of_recomputing(quick_demo, capsys):
    before = (quick_demo / "straighten" / "boss-nfe2" / "checkpoint.pt").stat().st_mtime_ns
    run_demo(quick_demo, DemoConfig.quick(), progress=False)
    after = (quick_demo / "straighten" / "boss-nfe2" / "checkpoint.pt").stat().st_mtime_ns
    assert before == after  # finished training is not redone
    learn_ckpt = quick_demo / "learn" / "learned-nfe2" / "ab2-nfe2" / "checkpoint.pt"
    assert learn_ckpt.exists()


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.mark.slow
def test_cli_sample_evaluate_straighten_on_digits(quick_demo, tmp_path, capsys):
    schedule = quick_demo / "schedule" / "schedule_nfe2.json"
    cpu = ("--device", "cpu")
    png = tmp_path / "s.png"
    assert run("sample", "--schedule", schedule, "--n", 8, "--out", png, *cpu) == 0
    assert png.stat().st_size > 0
    ev = tmp_path / "ev"
    grids = ("--schedule", schedule, "--nfe", 2, "--spacing", "uniform")
    sizes = ("--samples", 16, "--reference-steps", 50)
    assert run("evaluate", *grids, *sizes, "--out", ev, *cpu) == 0
    results = json.loads((ev / "results.json").read_text())
    records = results["records"]
    assert results["frechet_backend"] in ("torchmetrics", "float64")  # which one measured
    assert {r["method"] for r in records} == {"bellman", "uniform"}
    assert all(r["frechet"] is not None for r in records)
    out = tmp_path / "st"
    train = ("--pairs", 24, "--kmax", 20, "--iterations", 4, "--batch-size", 8, "--out", out)
    assert run("straighten", "--schedule", schedule, *train, "--quiet", *cpu) == 0
    weights = out / "model.safetensors"
    assert weights.exists() and (out / "model.json").exists()
    tuned = ("--schedule", schedule, "--finetuned", weights, "--n", 4)
    assert run("sample", *tuned, "--out", tmp_path / "f.png", *cpu) == 0
    # pairs made for another schedule are refused with a clear message
    other = quick_demo / "schedule" / "schedule_nfe4.json"
    assert run("straighten", "--schedule", other, *train, "--quiet", *cpu) == 2
    assert "another schedule" in capsys.readouterr().err


def test_finetuned_file_that_does_not_match_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"bogus": torch.zeros(2)}, str(bad))
    args = ("--nfe", 2, "--finetuned", bad, "--out", tmp_path / "x.png", "--device", "cpu")
    assert run("sample", *args) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "missing keys" in err


def test_demo_report_links_every_image_and_writes_results_last(quick_demo):
    report = (quick_demo / "report.md").read_text()
    for png in quick_demo.glob("*.png"):
        assert f"]({png.name})" in report
    assert "[results.json](results.json)" in report and "```json" not in report
    written = [p for p in quick_demo.iterdir() if p.is_file() and not p.name.startswith(".")]
    assert max(written, key=lambda p: p.stat().st_mtime_ns).name == "results.json"


def test_demo_checks_its_solvers_and_starts_each_family_from_its_own_bellman_times(tmp_path):
    """A misspelt family failed at stage 3, after the straightening; Heun (2 evaluations per
    step) started from uniform times while `schedule --method learned` used Bellman ones."""
    from bossflow.errors import ConfigError
    from bossflow.noise import NoiseSource
    from bossflow.pipeline import _schedule_stage
    from bossflow.spec import load_model

    with pytest.raises(ConfigError, match="unknown learn_solvers entry 'eulr'"):
        DemoConfig.quick(learn_solvers=("eulr",))
    cfg = DemoConfig.quick(learn_solvers=("euler", "heun"))
    model = load_model("digits")
    source = NoiseSource(model.sample_shape, seed=0)
    _, bellman = _schedule_stage(model, cfg, tmp_path, source, False, None)
    assert set(bellman) == {1, 2, 4}  # Heun at NFE 2 and 4 starts from the 1- and 2-step ones
    written = sorted(p.name for p in tmp_path.glob("schedule_nfe*.json"))
    assert written == ["schedule_nfe2.json", "schedule_nfe4.json"]  # the report's, as before
