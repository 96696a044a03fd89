"""Fixtures shared by test modules."""

import pytest

_USER_MODULE = """\
import torch
class Net(torch.nn.Module):
    sample_shape = (4,)
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 4)
    def forward(self, x, t):
        return self.lin(torch.cat([x, t[:, None]], 1))
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a tiny user model module (``Net``: v(x, t) on 4 values) importable under ``name``."""

    def write(name: str) -> str:
        (tmp_path / f"{name}.py").write_text(_USER_MODULE)
        monkeypatch.syspath_prepend(str(tmp_path))
        return name

    return write
