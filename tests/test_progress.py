import io

import pytest

from bossflow.progress import progress_bar, progress_wanted


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty", [False, True])
def test_bar_draws_only_on_a_terminal(monkeypatch, tty):
    monkeypatch.delenv("BOSSFLOW_PROGRESS", raising=False)
    stream = FakeTTY() if tty else io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    bar = progress_bar(total=10, desc="work", unit="traj")
    bar.update(10)
    bar.close()
    assert ("work" in stream.getvalue()) is tty
    assert progress_wanted() is tty


def test_disabled_bar_never_draws_and_env_overrides(monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr("sys.stderr", tty)
    monkeypatch.setenv("BOSSFLOW_PROGRESS", "0")
    assert not progress_wanted()
    bar = progress_bar(total=3, desc="hidden")
    bar.update(3)
    bar.close()
    assert tty.getvalue() == ""
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    monkeypatch.setenv("BOSSFLOW_PROGRESS", "1")
    assert progress_wanted() and not progress_wanted(enabled=False)
    bar = progress_bar(total=3, desc="forced", initial=1)
    bar.update(2)
    bar.close()
    assert "forced" in log.getvalue() and "3/3" in log.getvalue()
