"""The command line with conditional models: --cond/--uncond/--guidance-scale, the demo on
digits-cond, the diffusers options, and user modules found from the current folder."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bossflow.cli import main
from bossflow.conditioning import prepare_conditioning
from bossflow.errors import ConfigError
from bossflow.field import Guided
from bossflow.spec import load_model

COND_MODULE = textwrap.dedent(
    '''
    import torch
    from torch import nn

    class Net(nn.Module):
        """v(x, t, label=y) on 4 values; label 3 is the null label."""

        sample_shape = (4,)

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(5, 4)
            self.emb = nn.Embedding(4, 4)

        def forward(self, x, t, label):
            h = self.lin(torch.cat([x, t[:, None].to(x.dtype)], 1)) + self.emb(label)
            return torch.tanh(h)

    def make():
        return Net()
    '''
)


@pytest.fixture
def cond_module(tmp_path, monkeypatch):
    (tmp_path / "condnet.py").write_text(COND_MODULE)
    monkeypatch.chdir(tmp_path)  # found from the current folder, as by python -m
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    save_file({"label": torch.tensor([0, 1, 2])}, str(tmp_path / "labels.safetensors"))
    save_file({"label": torch.tensor([3])}, str(tmp_path / "null.safetensors"))
    return tmp_path


def test_prepare_conditioning_cycles_rows_and_guides(cond_module):
    model = load_model("condnet:make")
    run = prepare_conditioning(
        model.field, {}, cond_module / "labels.safetensors", cond_module / "null.safetensors", 2.0
    )
    assert isinstance(run.field, Guided) and run.field.scale == 2.0
    assert run.cond(range(2, 7))["label"].tolist() == [2, 0, 1, 2, 0]  # row m mod 3
    assert run.cond([5, 0])["label"].tolist() == [2, 0]
    plain = prepare_conditioning(model.field, {}, cond_module / "labels.safetensors")
    assert plain.field is model.field and plain.guidance_scale is None
    with pytest.raises(ConfigError, match="--uncond is only used for guidance"):
        prepare_conditioning(model.field, {}, None, cond_module / "null.safetensors")
    with pytest.raises(ConfigError, match="needs the unconditional inputs"):
        prepare_conditioning(model.field, {}, cond_module / "labels.safetensors", None, 2.0)
    save_file({"other": torch.tensor([3])}, str(cond_module / "bad.safetensors"))
    save_file({"label": torch.zeros(0, dtype=torch.long)}, str(cond_module / "empty.safetensors"))
    with pytest.raises(ConfigError, match="'label' has no rows"):
        prepare_conditioning(model.field, {}, cond_module / "empty.safetensors")
    with pytest.raises(ConfigError, match="--uncond has no 'label'"):
        prepare_conditioning(
            model.field,
            {},
            cond_module / "labels.safetensors",
            cond_module / "bad.safetensors",
            2.0,
        )


def test_schedule_sample_with_cond_and_guidance(cond_module, capsys):
    common = ["--model", "condnet:make", "--cond", "labels.safetensors"]
    guided = [*common, "--uncond", "null.safetensors", "--guidance-scale", "3"]
    assert main(["schedule", *guided, "--nfe", "2", "--kmax", "10", "--samples", "9", "--quiet",
                 "--out", "sched"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "conditioning: cond labels.safetensors (label), guidance scale 3" in out
    assert (cond_module / "sched" / "schedule_nfe2.json").exists()
    # the same noise and labels through the library give the same samples as the command
    assert main(["sample", *guided, "--nfe", "2", "--n", "6", "--out", "s.png",
                 "--save-tensor", "s.pt"]) == 0  # fmt: skip
    from bossflow import NoiseSource, sample
    from bossflow.schedule import uniform

    model = load_model("condnet:make")
    null = {"label": torch.tensor([3])}
    expected = sample(Guided(model.field, 3.0, null), NoiseSource((4,), 0).take(6), uniform(2),
                      cond={"label": torch.tensor([0, 1, 2, 0, 1, 2])})  # fmt: skip
    saved = torch.load(cond_module / "s.pt", weights_only=True)["samples"]
    torch.testing.assert_close(saved, expected)
    # without --cond the model's own error is one line naming the call
    assert main(["sample", "--model", "condnet:make", "--nfe", "2", "--n", "2",
                 "--out", "u.png"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "raised TypeError" in err and "--cond" in err


def test_straighten_distill_then_evaluate(cond_module, capsys):
    guided = ["--model", "condnet:make", "--cond", "labels.safetensors", "--uncond",
              "null.safetensors", "--guidance-scale", "2", "--quiet"]  # fmt: skip
    assert main(["schedule", *guided, "--nfe", "2", "--kmax", "10", "--samples", "8",
                 "--out", "sched"]) == 0  # fmt: skip
    sched = str(cond_module / "sched" / "schedule_nfe2.json")
    assert main(["straighten", *guided, "--schedule", sched, "--pairs", "32", "--iterations", "20",
                 "--guidance-mode", "distill", "--out", "st", "--lr", "3e-3"]) == 0  # fmt: skip
    meta = json.loads((cond_module / "st" / "model.json").read_text())
    assert meta["config"]["guidance"] == "distill"
    assert meta["guidance"] == {"scale": 2.0, "mode": "distill"}
    # the file says which guidance it was trained under: another scale is refused
    other = [a if a != "2" else "3" for a in guided]
    assert main(["sample", *[a for a in other if a != "--quiet"], "--nfe", "2", "--n", "2",
                 "--finetuned", str(cond_module / "st" / "model.safetensors"),
                 "--out", "x.png"]) == 2  # fmt: skip
    assert "straightened under guidance scale 2" in capsys.readouterr().err
    finetuned = str(cond_module / "st" / "model.safetensors")
    assert main(["evaluate", *guided, "--schedule", sched, "--finetuned", finetuned,
                 "--samples", "16", "--reference-steps", "50", "--out", "ev"]) == 0  # fmt: skip
    results = json.loads((cond_module / "ev" / "results.json").read_text())
    assert results["conditioning"] == "cond labels.safetensors (label), guidance scale 2"
    (record,) = results["records"]
    assert record["nfe"] == 2  # distilled: no guidance, so 2 calls of B rows, not of 2B
    # it learned the guided velocity: closer to the guided reference than the unguided network
    from bossflow import NoiseSource, load_schedule, sample
    from bossflow.noise import STAGE_OFFSETS, OffsetNoise
    from bossflow.schedule import uniform
    from bossflow.spec import load_finetuned

    z = OffsetNoise(NoiseSource((4,), 0), STAGE_OFFSETS["eval"]).take(16)
    labels = {"label": torch.arange(16) % 3}
    base = load_model("condnet:make").field
    ref = sample(Guided(base, 2.0, {"label": torch.tensor([3])}), z, uniform(200), cond=labels)
    schedule = load_schedule(sched)
    student = load_finetuned(load_model("condnet:make"), finetuned).field
    mse_student = float((sample(student, z, schedule, cond=labels) - ref).pow(2).mean())
    mse_base = float((sample(base, z, schedule, cond=labels) - ref).pow(2).mean())
    assert mse_student < mse_base, (mse_student, mse_base)
    assert record["mse_to_reference"] == pytest.approx(mse_student, rel=0.05)
    # schedule and straighten on from the distilled file measure it as it samples: unguided
    tuned = [*guided, "--finetuned", finetuned]
    assert main(["schedule", *tuned, "--nfe", "2", "--kmax", "10", "--samples", "8",
                 "--out", "sched2"]) == 0  # fmt: skip
    from bossflow import cost_matrix

    first8 = {"label": torch.arange(8) % 3}
    again = cost_matrix(student, NoiseSource((4,), 0), 10, samples=8, cond=first8)
    saved = np.load(cond_module / "sched2" / "cost_matrix.npz")
    np.testing.assert_allclose(saved["sum"], again.sum, rtol=1e-6)  # the unguided student's
    assert main(["schedule", *[a if a != "2" else "3" for a in tuned], "--nfe", "2",
                 "--out", "sched3"]) == 2  # fmt: skip
    assert "straightened under guidance scale 2" in capsys.readouterr().err
    assert main(["straighten", *tuned, "--schedule", sched, "--pairs", "16", "--iterations", "2",
                 "--out", "st2"]) == 0  # fmt: skip
    meta2 = json.loads((cond_module / "st2" / "model.json").read_text())
    assert meta2["guidance"] == {"scale": 2.0, "mode": "distill"}  # still a distilled student
    st2 = str(cond_module / "st2" / "model.safetensors")
    unquiet = [a for a in guided if a != "--quiet"]
    assert main(["sample", *unquiet, "--finetuned", st2, "--nfe", "2", "--samples", "2",
                 "--out", "y.png"]) == 0  # fmt: skip


def test_diffusers_options_reach_the_adapter(tmp_path, monkeypatch):
    module = textwrap.dedent(
        """
        import torch
        from torch import nn

        class Tr(nn.Module):
            sample_shape = (4,)

            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 4)

            def forward(self, hidden_states, timestep):
                return self.lin(hidden_states) * timestep[:, None]

        def make():
            return Tr()
        """
    )
    (tmp_path / "trnet.py").write_text(module)
    monkeypatch.chdir(tmp_path)
    model = load_model("trnet:make", convention="diffusers", sample_keyword="hidden_states",
                       timestep_scale=1.0)  # fmt: skip
    x, t = torch.randn(3, 4), torch.tensor([0.0, 0.5, 1.0])
    expected = -model.field.network(hidden_states=x, timestep=1.0 * (1 - t))
    torch.testing.assert_close(model.field(x, t), expected)
    with pytest.raises(ConfigError, match="--sample-keyword is for --convention diffusers"):
        load_model("trnet:make", sample_keyword="hidden_states")
    with pytest.raises(ConfigError, match="--timestep-scale"):
        load_model("trnet:make", convention="torchcfm", timestep_scale=2.0)


def test_installed_command_imports_modules_from_the_current_folder(cond_module):
    script = "import sys; from bossflow.cli import main; sys.path.pop(0); sys.exit(main())"
    # a console script's sys.path[0] is its own folder, not the current one: mimic it
    proc = subprocess.run(
        [sys.executable, "-c", script, "schedule", "--model", "condnet:make", "--cond",
         "labels.safetensors", "--nfe", "2", "--kmax", "6", "--samples", "4", "--quiet",
         "--out", "o"],
        cwd=cond_module, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_conditional_quick_demo(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "digits-cond", "--quick", "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "digits-cond"
    assert results["conditioning"].startswith("class_labels = m mod 10, guidance scale")
    methods = {(r["method"], r["nfe"]) for r in results["records"]}
    assert {("bellman", 2), ("learned", 2), ("boss", 2), ("boss-learned", 2)} <= methods
    agreement = results["class_agreement"]
    assert agreement["reference"] > 0.8  # the guided samples are the digits asked for
    assert agreement["boss-nfe2"] > 0.8
