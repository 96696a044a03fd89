"""bossflow.io: atomic writes that fail cleanly, and the lock on an output folder."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from bossflow.cli import main
from bossflow.errors import BossflowError
from bossflow.io import LOCK_FILE, atomic_write, atomic_write_text, output_lock

SPIRAL = [
    "schedule",
    "--model",
    "spiral",
    "--nfe",
    "2",
    "--kmax",
    "8",
    "--samples",
    "4",
    "--quiet",
    "--out",
]


def test_full_disk_in_torch_save_is_one_clear_error(tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
            "file data/0: file write failed: No space left on device\nmore torch details"
        )

    monkeypatch.setattr(torch, "save", full)
    target = tmp_path / "model.pt"
    with pytest.raises(BossflowError) as info:
        atomic_write(target, lambda p: torch.save({"x": torch.zeros(2)}, p))
    message = str(info.value)
    assert message.startswith(f"could not write {target}: [enforce fail")
    assert "No space left on device (is the disk full?" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file


def test_os_errors_of_the_writer_are_one_clear_error(tmp_path):
    def no_space(p):
        p.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(BossflowError, match=r"could not write .*a.bin: No space left on device "):
        atomic_write(tmp_path / "a.bin", no_space)

    def denied(p):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    with pytest.raises(BossflowError, match=r"a.bin: Permission denied$"):
        atomic_write(tmp_path / "a.bin", denied)
    assert list(tmp_path.iterdir()) == []


def test_interrupts_and_bossflow_errors_pass_through(tmp_path):
    def interrupted(p):
        p.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "a.bin", interrupted)
    own = BossflowError("the writer's own message")

    def refuses(p):
        raise own

    with pytest.raises(BossflowError) as info:
        atomic_write(tmp_path / "a.bin", refuses)
    assert info.value is own
    assert list(tmp_path.iterdir()) == []


HOLDER = textwrap.dedent(
    """
    import sys
    from bossflow.io import output_lock

    with output_lock(sys.argv[1], "bossflow schedule --out held"):
        print("locked", flush=True)
        sys.stdin.read()  # hold until killed or stdin closes
    """
)


def _hold(folder):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(tmp_path, capsys):
    holder = _hold(tmp_path)
    try:
        assert main([*SPIRAL, str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"bossflow schedule: error: {tmp_path} is in use by another run (PID {holder.pid}: "
            "bossflow schedule --out held); wait for it to finish, or choose another --out"
        )
        assert not (tmp_path / "cost_matrix.npz").exists()
        with pytest.raises(BossflowError, match=f"PID {holder.pid}"), output_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_run_does_not_block_the_next(tmp_path, capsys):
    holder = _hold(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_FILE).read_text().startswith(f"{holder.pid} ")  # stale note stays
    assert main([*SPIRAL, str(tmp_path)]) == 0
    assert (tmp_path / "cost_matrix.npz").exists()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released at the end of the run


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    with output_lock(tmp_path, "outer"), output_lock(tmp_path, "inner"):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()} outer\n"
    with output_lock(tmp_path, "again"):  # released by the outer block
        pass


def test_leftover_temporary_files_are_removed_on_taking_the_lock(tmp_path):
    # what a killed atomic_write leaves: ".NAME.XXXXXXXX.tmp"
    sub = tmp_path / "pairs"
    sub.mkdir()
    stale = [tmp_path / ".cost_matrix.npz.k2j_9xq0.tmp", sub / ".shard-00003.npy.abcdefgh.tmp"]
    other_run = tmp_path / "nested"  # another run's output folder: left alone
    other_run.mkdir()
    (other_run / LOCK_FILE).write_text("")
    kept = [
        tmp_path / "keep.tmp",
        tmp_path / ".notes.tmp",
        tmp_path / ".x.abc.tmp",  # not a name mkstemp makes (8 random characters)
        tmp_path / "cost_matrix.npz",
        tmp_path / ".model.safetensors.abcdefgh.tmp.bak",
        other_run / ".cost_matrix.npz.abcdefgh.tmp",
    ]
    fresh = tmp_path / ".samples.pt.abcdefgh.tmp"  # a live write of a command without the lock
    for path in stale + kept + [fresh]:
        path.write_bytes(b"x")
    for path in stale + kept:
        os.utime(path, (time.time() - 7200,) * 2)  # untouched for two hours
    kept.append(fresh)
    with output_lock(tmp_path):
        assert [p for p in stale if p.exists()] == []
        assert [p for p in kept if not p.exists()] == []
        # files written while the lock is held are complete ones
        atomic_write_text(tmp_path / "fresh.json", "{}")
        assert (tmp_path / "fresh.json").read_text() == "{}"


def test_run_demo_takes_the_lock_before_any_work(tmp_path):
    from bossflow.pipeline import DemoConfig, run_demo

    holder = _hold(tmp_path)
    try:
        with pytest.raises(BossflowError, match=f"in use by another run \\(PID {holder.pid}"):
            run_demo(tmp_path, DemoConfig.quick(), progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()


def test_a_run_refused_the_lock_leaves_the_holders_lock_in_place(tmp_path):
    """Both runs saw the folder missing; the refused one removed the holder's lock file and the
    folder, so a third run could lock a new file while the first was still running."""
    from bossflow.cli import _output_dir

    new = tmp_path / "new"
    holder = None
    try:
        refused = pytest.raises(BossflowError, match="in use by another run")
        with refused, _output_dir(new) as out:  # this run "created" the folder
            holder = _hold(out)  # ... and another took the lock first
            with output_lock(out):
                pass
        assert (new / LOCK_FILE).exists()
        with pytest.raises(BossflowError, match=f"PID {holder.pid}"), output_lock(new):
            pass  # still the holder's lock
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()


def test_a_failed_run_removes_its_own_lock_and_empty_folder(tmp_path):
    from bossflow.cli import _output_dir

    new = tmp_path / "new"
    with pytest.raises(RuntimeError), _output_dir(new) as out, output_lock(out):
        raise RuntimeError("bad model")
    assert not new.exists()


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "state.json"
    atomic_write_text(target, "{}")
    assert len(synced) == 2 and synced[1] == str(tmp_path)  # the file, then its folder
    assert synced[0].startswith(str(tmp_path / ".state.json."))


def test_a_checkpoint_that_cannot_be_opened_is_not_called_damaged(tmp_path, monkeypatch):
    import bossflow.checkpoint as checkpoint
    from bossflow.errors import CheckpointError
    from bossflow.training import load_state, save_state

    path = tmp_path / "checkpoint.pt"
    save_state(path, {"format": "test/1"})

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint, "load_torch_weights", denied)
    with pytest.raises(CheckpointError, match="Permission denied; the file is not necessarily"):
        load_state(path, "test/1")


def test_a_failed_rank_zero_write_is_published_to_the_other_ranks(tmp_path, monkeypatch):
    """Only rank 0 writes shared files; the others wait for it at the next collective, so its
    failure must reach them (as a library caller's run has no CLI to publish it)."""
    from bossflow import distributed as dist

    published = []
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "is_rank_zero", lambda: True)
    monkeypatch.setattr(dist, "report_failure", lambda err: published.append(err) or True)

    def full_disk(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(BossflowError, match="could not write") as err:
        atomic_write(tmp_path / "cost_matrix.npz", full_disk)
    assert published == [err.value]


def test_a_lock_file_removed_while_being_locked_is_locked_again(tmp_path, monkeypatch):
    """The holder removes an unused lock file as it ends (while still holding it): a run that
    opened the old file then locks a file no path names, and must lock the one there now."""
    import bossflow.io as io

    answers = iter([False, True])  # the first file was replaced, the second is the one there
    real = io._same_file
    monkeypatch.setattr(io, "_same_file", lambda fd, path: next(answers) and real(fd, path))
    with output_lock(tmp_path, "second try"):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()} second try\n"
    monkeypatch.setattr(io, "_same_file", lambda fd, path: False)
    with pytest.raises(BossflowError, match="kept being replaced"), output_lock(tmp_path):
        pass
