"""Checkpoints holding pickled code are refused on every loading path, naming the global.

The payloads only ever reduce to harmless calls (``builtins.print``, a recorder); none may run.
"""

import builtins
import os

import pytest
import torch

from bossflow.checkpoint import load_torch_weights
from bossflow.cli import main
from bossflow.errors import CheckpointError
from bossflow.models import load_rectified_flow
from bossflow.spec import load_state_dict_file
from bossflow.training import load_state

REFUSED = r"was refused: it holds pickled Python code/objects \(blocked global: {}\) that bossflow"
REDO = "re-save the weights as a plain state dict or .safetensors"


class PrintsWhenLoaded:
    """Unpickling this calls ``print``: stands in for arbitrary code."""

    def __reduce__(self):
        return (builtins.print, ("pickled code ran",))


class CallsABlockedModule:
    """Unpickling this calls ``os.getcwd``, whose module torch blocks outright."""

    def __reduce__(self):
        return (os.getcwd, ())


class PlainObject:
    pass


@pytest.fixture
def payloads(tmp_path):
    weights = {"lin.weight": torch.zeros(4, 5), "lin.bias": torch.zeros(4)}
    files = {}
    for name, obj, blocked in [
        ("print", PrintsWhenLoaded(), "builtins.print"),
        ("blocked", CallsABlockedModule(), f"{os.getcwd.__module__}.getcwd"),
        ("object", PlainObject(), f"{__name__}.PlainObject"),
    ]:
        path = tmp_path / f"{name}.pt"
        torch.save({**weights, "extra": obj}, path)
        files[name] = (path, blocked)
        # the same object inside a Rectified Flow checkpoint's layout
        torch.save(
            {"model": {}, "ema": {"shadow_params": []}, "x": obj}, tmp_path / f"rf-{name}.pth"
        )
    return files


def _refused(blocked: str) -> str:
    return REFUSED.format(blocked.replace(".", r"\."))


def test_the_helper_names_the_blocked_global(payloads, capsys):
    for path, blocked in payloads.values():
        with pytest.raises(CheckpointError, match=_refused(blocked)) as info:
            load_torch_weights(path)
        assert str(info.value).startswith(f"{path} was refused") and REDO in str(info.value)
        assert "corrupt" not in str(info.value)
    assert "pickled code ran" not in capsys.readouterr().out


def test_state_dict_files_refuse_pickled_code(payloads, tmp_path, capsys):
    for path, blocked in payloads.values():
        with pytest.raises(CheckpointError, match=_refused(blocked)):
            load_state_dict_file(path)
    pth = tmp_path / "weights.pth"
    pth.write_bytes(payloads["print"][0].read_bytes())
    with pytest.raises(CheckpointError, match=_refused("builtins.print")):
        load_state_dict_file(pth)
    assert "pickled code ran" not in capsys.readouterr().out


def test_cli_checkpoint_with_pickled_code_is_one_line(payloads, tmp_path, user_module, capsys):
    user_module("mymodel_pickled")
    path, blocked = payloads["print"]
    args = ["schedule", "--model", "mymodel_pickled:Net", "--checkpoint", str(path), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "pickled code ran" not in captured.out
    assert f"blocked global: {blocked}" in captured.err and REDO in captured.err


def test_rectified_flow_checkpoints_refuse_pickled_code(payloads, tmp_path, capsys):
    for name, (_, blocked) in payloads.items():
        checkpoint = tmp_path / f"rf-{name}.pth"
        with pytest.raises(CheckpointError, match=_refused(blocked)):
            load_rectified_flow(checkpoint, "cifar10")
        assert "pickled code ran" not in capsys.readouterr().out


def test_training_checkpoints_refuse_pickled_code(payloads, capsys):
    for path, blocked in payloads.values():
        with pytest.raises(CheckpointError, match=_refused(blocked)):
            load_state(path, "bossflow.straighten/1")
    assert "pickled code ran" not in capsys.readouterr().out
