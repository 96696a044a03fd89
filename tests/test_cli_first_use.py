"""First use of the command line: help, up-front option checks, any sample shape."""

import argparse
import json
import subprocess
import sys
import time

import pytest
import torch

from bossflow import Schedule
from bossflow.cli import build_parser, main

POINT_MODEL = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x, t):
        return self.lin(torch.cat([x, t[:, None]], 1))
"""


def run(*args) -> int:
    return main([str(a) for a in args])


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


# -- help ---------------------------------------------------------------------------------------
def test_every_option_has_help_with_its_default_and_every_command_a_description():
    commands = subcommands()
    assert set(commands) == {"schedule", "sample", "evaluate", "straighten", "demo", "train-base"}
    for name, parser in commands.items():
        assert parser.description, f"{name} has no description"
        text = parser.format_help()
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            option = action.option_strings[0]
            assert action.help, f"{name} {option} has no help"
            shown = formatter._get_help_string(action)
            assert action.required or "(default" in shown, f"{name} {option}: {shown!r}"
            assert option in text
        # the defaults are shown in the --help text itself
        assert "(default:" in " ".join(text.split())


def test_help_shows_the_library_defaults_and_the_registries():
    from bossflow.bellman.cost import METRICS
    from bossflow.schedule import SCHEDULES
    from bossflow.solvers import SOLVERS
    from bossflow.spec import CONVENTIONS
    from bossflow.straighten import OBJECTIVES, StraightenConfig

    commands = subcommands()

    def action(command, option):
        return next(a for a in commands[command]._actions if option in a.option_strings)

    lib = StraightenConfig()
    for option, field in [("--select", "select"), ("--warmup", "warmup"), ("--lr", "lr")]:
        assert action("straighten", option).default == getattr(lib, field)
    assert list(action("straighten", "--objective").choices) == list(OBJECTIVES)
    assert list(action("sample", "--solver").choices) == list(SOLVERS)
    assert list(action("sample", "--spacing").choices) == list(SCHEDULES)
    assert list(action("schedule", "--metric").choices) == list(METRICS)
    assert list(action("schedule", "--convention").choices) == list(CONVENTIONS)
    help_text = " ".join(commands["straighten"].format_help().split())
    assert f"(default: {lib.select})" in help_text


def test_sample_help_promises_one_schedule_and_shape_any_shape():
    parser = subcommands()["sample"]
    for action in parser._actions:
        if set(action.option_strings) & {"--schedule", "--nfe", "--spacing"}:
            assert action.nargs is None and not isinstance(action, argparse._AppendAction)
            assert "repeat" not in action.help and "comma" not in action.help
    text = " ".join(parser.format_help().split())
    assert "may be repeated" not in text
    assert "any number of comma-separated sizes" in text  # --shape
    assert run("sample", "--model", "spiral", "--nfe", 2, "--out", "x.png", "--schedule", "s") == 2


@pytest.mark.slow
def test_version_and_python_m_bossflow():
    from bossflow import __version__

    out = subprocess.run(
        [sys.executable, "-m", "bossflow", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"bossflow {__version__}"
    usage = subprocess.run(
        [sys.executable, "-m", "bossflow", "sample", "--help"], capture_output=True, text=True
    )
    assert usage.returncode == 0 and "--solver" in usage.stdout


# -- options checked before long phases ------------------------------------------------------------
@pytest.fixture(scope="module")
def spiral_schedule(tmp_path_factory):
    out = tmp_path_factory.mktemp("sched")
    assert (
        run(
            "schedule",
            "--model",
            "spiral",
            "--nfe",
            2,
            "--kmax",
            8,
            "--samples",
            4,
            "--quiet",
            "--out",
            out,
        )
        == 0
    )
    return out / "schedule_nfe2.json"


def schedule_with_kmax(tmp_path, source, value):
    data = json.loads(source.read_text())
    data["provenance"]["k_max"] = value
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "options, message",
    [
        (["--lr", "-1"], "argument --lr: expected a positive number, got -1"),
        (["--lr", "nan"], "expected a positive number"),
        (["--warmup", "-3"], "argument --warmup: expected an integer >= 0, got -3"),
        (["--holdout", "1.5"], "--holdout 1.5 is not a fraction in [0, 1)"),
        (["--pairs", "8", "--holdout", "8"], "holds out 8 of the 8 --pairs noises"),
        (["--select", "best", "--holdout", "0"], "--select best needs held-out noises"),
        (["--lora-rank", "-1"], "argument --lora-rank: expected an integer >= 0"),
        (["kmax=abc"], "records k_max 'abc', which is not a positive whole number"),
        (["kmax=null"], "records k_max null, which is not a positive whole number"),
        (["--model", ":"], "--model ':' is not package.module:callable"),
        (["--model", "rectified-flow:"], "rectified-flow:CONFIG needs a config"),
        (["--model", "os.path:join"], "calling join() for --model 'os.path:join' failed"),
        (["--pairs", "16"], "spiral has no weights to fine-tune"),
    ],
)
def test_straighten_bad_options_fail_fast_on_one_line_and_leave_no_out(
    tmp_path, capsys, spiral_schedule, options, message
):
    schedule = spiral_schedule
    if options[0].startswith("kmax="):
        value = {"kmax=abc": "abc", "kmax=null": None}[options[0]]
        schedule, options = schedule_with_kmax(tmp_path, spiral_schedule, value), []
    out = tmp_path / "new" / "out"
    model = [] if "--model" in options else ["--model", "spiral"]
    argv = ["straighten", *model, "--schedule", str(schedule), "--out", str(out), *options]
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own checks
        code = exit.code
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err and "np.float64" not in err
    assert elapsed < 1.0  # before any pairs are made
    assert not (tmp_path / "new").exists()  # no empty --out (or parent) left behind


def test_lora_without_peft_fails_up_front(tmp_path, capsys, monkeypatch, spiral_schedule):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes "import peft" fail
    out = tmp_path / "o"
    argv = ("straighten", "--model", "spiral", "--schedule", spiral_schedule, "--lora-rank", 4)
    assert run(*argv, "--out", out) == 2
    err = capsys.readouterr().err
    assert "--lora-rank 4 (LoRA straightening) needs the optional package 'peft'" in err
    assert "pip install 'bossflow[lora]'" in err and not out.exists()


def test_output_folder_that_cannot_be_created(tmp_path, capsys):
    assert run("schedule", "--model", "spiral", "--quiet", "--out", "/proc/bossflow-test/o") == 2
    assert "cannot create output folder /proc/bossflow-test" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run("sample", "--model", "spiral", "--nfe", 2, "--out", blocker / "x.png") == 2
    assert "not a directory" in capsys.readouterr().err
    assert run("sample", "--model", "spiral", "--nfe", 2, "--out", tmp_path) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err


def test_failed_model_check_removes_the_out_it_created_but_keeps_others(tmp_path, capsys):
    fresh = tmp_path / "fresh"
    assert run("schedule", "--model", "nope", "--quiet", "--out", fresh) == 2
    assert not fresh.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert run("schedule", "--model", "nope", "--quiet", "--out", kept) == 2
    assert kept.is_dir()  # the user's folder stays, even empty


# -- any sample shape -------------------------------------------------------------------------------
def test_spiral_through_schedule_sample_and_evaluate(tmp_path, capsys, spiral_schedule):
    png = tmp_path / "x.png"
    assert run("sample", "--model", "spiral", "--nfe", 4, "--n", 8, "--out", png) == 0
    printed = capsys.readouterr().out
    assert "not 1- or 3-channel images" in printed and not png.exists()
    assert torch.load(tmp_path / "x.pt")["samples"].shape == (8, 2, 4, 4)
    ev = tmp_path / "ev"
    args = ("--schedule", spiral_schedule, "--nfe", 2, "--samples", 8, "--reference-steps", 16)
    assert run("evaluate", "--model", "spiral", *args, "--out", ev) == 0
    printed = capsys.readouterr().out
    assert printed.index("note:") < printed.index("[1/3] reference solve")  # decided up front
    records = json.loads((ev / "results.json").read_text())["records"]
    assert {r["psnr"] for r in records} == {"nan"} and all(
        r["mse_to_reference"] > 0 for r in records
    )
    report = (ev / "report.md").read_text()
    assert "PSNR, sample grids" in report and not (ev / "samples.png").exists()


def test_point_model_through_every_command(tmp_path, monkeypatch, capsys):
    (tmp_path / "pointnet.py").write_text(POINT_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = ("--model", "pointnet:Net", "--shape", 2, "--device", "cpu")
    sched = tmp_path / "sched"
    assert (
        run("schedule", *model, "--nfe", 2, "--kmax", 8, "--samples", 8, "--quiet", "--out", sched)
        == 0
    )
    schedule = sched / "schedule_nfe2.json"
    assert Schedule.load(schedule).steps == 2
    png = tmp_path / "points.png"
    assert run("sample", *model, "--schedule", schedule, "--n", 32, "--out", png) == 0
    assert "scatter" in capsys.readouterr().out
    assert png.stat().st_size > 0 and not (tmp_path / "points.pt").exists()  # not asked for
    keep = ("--save-tensor", tmp_path / "points.pt")
    assert run("sample", *model, "--schedule", schedule, "--n", 32, "--out", png, *keep) == 0
    assert torch.load(tmp_path / "points.pt")["samples"].shape == (32, 2)
    tuned = tmp_path / "tuned"
    train = ("--pairs", 16, "--iterations", 3, "--batch-size", 4, "--quiet")
    assert run("straighten", *model, "--schedule", schedule, *train, "--out", tuned) == 0
    lora = tmp_path / "lora"  # the official BOSS code's LoRA scale: alpha 1 (1 / r)
    options = ("--lora-rank", 2, "--lora-alpha", 1)
    assert run("straighten", *model, "--schedule", schedule, *train, *options, "--out", lora) == 0
    assert json.loads((lora / "model.json").read_text())["config"]["lora_alpha"] == 1.0
    assert json.loads((lora / "model-lora" / "adapter_config.json").read_text())["lora_alpha"] == 1
    ev = tmp_path / "ev"
    finetuned = ("--finetuned", tuned / "model.safetensors", "--method", "boss")
    sizes = ("--samples", 16, "--reference-steps", 8, "--quiet")
    assert run("evaluate", *model, "--schedule", schedule, *finetuned, *sizes, "--out", ev) == 0
    (record,) = json.loads((ev / "results.json").read_text())["records"]
    assert record["method"] == "boss" and record["iterations"] == 3  # from tuned/model.json
    assert "](samples.png)" in (ev / "report.md").read_text()


def test_evaluate_without_matplotlib_fails_before_computing(tmp_path, capsys, monkeypatch):
    import bossflow.solvers

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    calls = []
    monkeypatch.setattr(bossflow.solvers, "reference_solve", lambda *a, **k: calls.append(1))
    out = tmp_path / "ev"
    assert run("evaluate", "--model", "spiral", "--nfe", 2, "--samples", 4, "--out", out) == 2
    assert "pip install 'bossflow[plots]'" in capsys.readouterr().err
    assert calls == [] and not out.exists()


def test_evaluate_refuses_colliding_labels_before_the_reference_solve(
    tmp_path, capsys, monkeypatch
):
    import bossflow.solvers

    calls = []
    monkeypatch.setattr(bossflow.solvers, "reference_solve", lambda *a, **k: calls.append(1))
    args = ("--model", "spiral", "--nfe", 2, "--spacing", "uniform,edm", "--method", "mine")
    assert run("evaluate", *args, "--out", tmp_path / "ev") == 2
    assert "both be reported as mine at 2 NFE" in capsys.readouterr().err and calls == []


# -- options that would be ignored, or fail only after the work --------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (  # learned-sampler options under the default --method bellman were ignored
            ["schedule", "--teacher-steps", "50", "--no-scales"],
            "--no-scales, --teacher-steps only matter with --method learned",
        ),
        (  # --spacing beside --schedule, without --nfe, was ignored
            ["sample", "--schedule", "{schedule}", "--spacing", "edm"],
            "--spacing only matters with --nfe",
        ),
        (
            ["evaluate", "--schedule", "{schedule}", "--spacing", "edm"],
            "--spacing only matters with --nfe",
        ),
        (  # --weights is a rectified-flow checkpoint's choice; digits ignored it
            ["sample", "--nfe", "2", "--weights", "model"],
            "--weights picks the EMA or raw weights of a rectified-flow checkpoint",
        ),
        (  # full fine-tuning ignored the targets
            ["straighten", "--schedule", "{schedule}", "--lora-targets", "conv_in"],
            "--lora-targets only matters with --lora-rank",
        ),
        (
            ["straighten", "--schedule", "{schedule}", "--lora-alpha", "1"],
            "--lora-alpha only matters with --lora-rank",
        ),
        (  # an unguided model ignored the mode
            ["straighten", "--schedule", "{schedule}", "--guidance-mode", "distill"],
            "--guidance-mode only matters with a guided model",
        ),
        (  # was refused by straighten() after every pair was made
            [
                "straighten",
                "--schedule",
                "{schedule}",
                "--lora-rank",
                "2",
                "--lora-targets",
                "nope",
            ],
            "lora_targets ['nope'] match no nn.Linear or nn.Conv2d layer",
        ),
        (  # the tensor of --out x.pt was silently not written
            ["sample", "--nfe", "2", "--save-tensor", "{tmp}/y.pt", "--out", "{tmp}/x.pt"],
            "already saves the tensor; drop --save-tensor",
        ),
        (  # was found when writing, after sampling
            ["sample", "--nfe", "2", "--save-tensor", "{tmp}"],
            "is a folder; give a .pt file name",
        ),
        (["sample", "--nfe", "2", "--model", "digits-cond", "--guidance-scale", "inf"], "finite"),
        (["train-base", "--check-samples", "1"], "expected an integer >= 2, got 1"),
        (  # loaded, then failed at the first call advising --convention (refused for digits)
            ["sample", "--nfe", "2", "--checkpoint", "digits-classifier"],
            "holds a DigitClassifier, not a digits velocity field",
        ),
        (  # loaded without its labels, then failed asking for cond= (Python advice)
            ["sample", "--nfe", "2", "--checkpoint", "digits-cond"],
            "is a class-conditional digits model; load it with --model digits-cond",
        ),
        (  # a typo dropped a dimension: (2, 4)
            ["sample", "--nfe", "2", "--model", "spiral", "--shape", "2,,4"],
            "--shape must be comma-separated integers like 3,32,32, got '2,,4'",
        ),
        (["demo", "--pair-samples", "1"], "pair_samples 1 leaves no noise to fine-tune on"),
    ],
)
def test_options_that_would_do_nothing_or_fail_late_are_refused_first(
    tmp_path, capsys, argv, message
):
    from bossflow.schedule import uniform

    uniform(2).save(tmp_path / "s.json")
    argv = [a.format(schedule=tmp_path / "s.json", tmp=tmp_path) for a in argv]
    out = (
        []
        if "--out" in argv
        else ["--out", str(tmp_path / "o" / ("x.png" if argv[0] == "sample" else ""))]
    )
    start = time.perf_counter()
    try:
        code = main([*argv, *out, "--quiet"] if argv[0] != "sample" else [*argv, *out])
    except SystemExit as exit:  # argparse's own checks
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err and err.strip().count("\n") == 0
    assert time.perf_counter() - start < 5  # before any long phase
    assert not (tmp_path / "o").exists()


def test_shapes_from_python_are_checked_like_the_command_lines():
    from bossflow import load_model
    from bossflow.errors import ConfigError

    assert load_model("spiral", shape=[2]).sample_shape == (2,)
    assert load_model("spiral", shape="2,4,4,").sample_shape == (2, 4, 4)
    for bad in ((2, 0), (), ("2", "4")):
        with pytest.raises(ConfigError, match="--shape must be"):
            load_model("spiral", shape=bad)
