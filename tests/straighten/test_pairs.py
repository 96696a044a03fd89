import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from bossflow.bellman import fine_trajectories
from bossflow.errors import BossflowError, CheckpointError, ConfigError
from bossflow.noise import NoiseSource
from bossflow.schedule import Schedule, uniform
from bossflow.straighten import PairStore, make_pairs

from . import TinyField, pretrained_field

GRID = uniform(20)


def on_grid(*indices: int) -> Schedule:
    return Schedule(GRID.times[list(indices)], method="custom")


# two budgets whose times overlap at 0, 0.5 and 1: the union has 5 times, not 3 + 4
SCHEDULES = [on_grid(0, 10, 20), on_grid(0, 4, 10, 16, 20)]
UNION = [0, 4, 10, 16, 20]


class Flaky(nn.Module):
    """A field that raises on its ``fail_at``-th call: a crash in the middle of a run."""

    def __init__(self, field: nn.Module, fail_at: int | None = None):
        super().__init__()
        self.field, self.fail_at, self.calls = field, fail_at, 0

    def forward(self, x, t):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated crash")
        return self.field(x, t)


@pytest.fixture(scope="module")
def field():
    return pretrained_field()


@pytest.fixture(scope="module")
def noise():
    return torch.randn(13, 2, generator=torch.Generator().manual_seed(3))


def test_stores_only_union_times_equal_to_the_fine_trajectory(field, noise, tmp_path):
    store = make_pairs(field, noise, SCHEDULES, tmp_path / "p", fine_grid=GRID, batch_size=4)
    assert len(store) == 13 and store.complete
    assert store.states.shape == (13, len(UNION), 2)
    np.testing.assert_array_equal(store.times, GRID.times[UNION])
    np.testing.assert_array_equal(store.grid_indices, UNION)
    # the same batches through bossflow.bellman's fine trajectories (BLAS results may depend on
    # the batch's size in the last bit; across batch sizes see the next tests)
    states = torch.cat([fine_trajectories(field, z, GRID)[0] for z in noise.split(4)])
    assert torch.equal(store.states[:], states[:, UNION])
    assert torch.equal(store.states[:, 0], noise)  # column 0 is the noise itself (t = 0)
    # each schedule finds its K + 1 columns among the union
    assert store.for_schedule(SCHEDULES[0]).tolist() == [0, 2, 4]
    assert store.for_schedule(SCHEDULES[1]).tolist() == [0, 1, 2, 3, 4]
    # indexing: rows in any order, one column per row, across shard boundaries
    rows, cols = np.array([12, 0, 5, 5]), np.array([4, 1, 0, 2])
    assert torch.equal(store.states[rows, cols], states[rows, np.array(UNION)[cols]])
    assert store.states[[], 1].shape == (0, 2) and store.states[3].shape == (5, 2)


def test_shards_are_memory_mappable_with_a_manifest(field, tmp_path):
    source = NoiseSource((2,), seed=7)
    store = make_pairs(
        field, source, SCHEDULES, tmp_path, fine_grid=GRID, samples=10, batch_size=4,
        meta={"model": "tiny", "seed": 7},
    )  # fmt: skip
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["count"] == 10 and manifest["samples"] == 10
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["times"] == GRID.times[UNION].tolist()
    assert manifest["fine_grid"] == GRID.tolist()
    assert manifest["schedules"] == [s.to_dict() for s in SCHEDULES]
    assert manifest["seed"] == 7 and manifest["meta"]["model"] == "tiny"
    assert manifest["sample_shape"] == [2] and manifest["dtype"] == "float32"
    shard = np.load(tmp_path / "shard-00001.npy", mmap_mode="r")
    assert isinstance(shard, np.memmap) and shard.shape == (4, 5, 2)
    # sample m depends only on (seed, m)
    np.testing.assert_array_equal(shard[:, 0], source(range(4, 8)).numpy())
    reopened = PairStore.open(tmp_path)
    assert torch.equal(reopened.states[:], store.states[:])


def test_values_do_not_depend_on_the_batch_size(field, noise, tmp_path):
    a = make_pairs(field, noise, SCHEDULES, tmp_path / "a", fine_grid=GRID, batch_size=13)
    b = make_pairs(field, noise, SCHEDULES, tmp_path / "b", fine_grid=GRID, batch_size=3)
    torch.testing.assert_close(a.states[:], b.states[:], rtol=0, atol=1e-6)


def test_resume_after_a_crash_reproduces_the_uninterrupted_store(field, noise, tmp_path):
    whole = make_pairs(
        Flaky(field), noise, SCHEDULES, tmp_path / "whole", fine_grid=GRID, batch_size=4
    )
    # 20 calls per batch of 4: the crash comes in the 3rd batch, after 2 complete shards
    with pytest.raises(KeyboardInterrupt):
        make_pairs(
            Flaky(field, fail_at=45), noise, SCHEDULES, tmp_path / "r", fine_grid=GRID, batch_size=4
        )
    assert PairStore.open(tmp_path / "r").manifest["count"] == 8
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "r").iterdir())
    counter = Flaky(field)
    resumed = make_pairs(counter, noise, SCHEDULES, tmp_path / "r", fine_grid=GRID, batch_size=4)
    assert counter.calls == 2 * 20  # only the 5 missing samples, in 2 batches
    assert torch.equal(resumed.states[:], whole.states[:])


def test_a_shard_without_manifest_entry_is_redone(field, noise, tmp_path):
    whole = make_pairs(field, noise, SCHEDULES, tmp_path, fine_grid=GRID, batch_size=5)
    expected = whole.states[:]  # read now: the shards are memory-mapped and rewritten below
    # a crash between writing shard 2 and listing it: the file exists, the manifest omits it
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"].pop()
    manifest["count"] = 10
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    np.save(tmp_path / "shard-00002.npy", np.full((3, 5, 2), 99.0, dtype=np.float32))
    assert len(PairStore.open(tmp_path)) == 10  # the unlisted shard is not complete
    redone = make_pairs(field, noise, SCHEDULES, tmp_path, fine_grid=GRID, batch_size=5)
    assert torch.equal(redone.states[:], expected)


def test_float16_storage(field, noise, tmp_path):
    full = make_pairs(field, noise, SCHEDULES, tmp_path / "32", fine_grid=GRID)
    half = make_pairs(field, noise, SCHEDULES, tmp_path / "16", fine_grid=GRID, dtype=torch.float16)
    assert half.dtype == torch.float16 and half.states[:].dtype == torch.float16
    assert np.load(tmp_path / "16" / "shard-00000.npy", mmap_mode="r").dtype == np.float16
    torch.testing.assert_close(half.states[:].float(), full.states[:], rtol=2e-3, atol=2e-3)


def test_pairs_made_with_another_schedule_grid_or_model_are_refused(field, noise, tmp_path):
    made = make_pairs(field, noise, SCHEDULES, tmp_path, fine_grid=GRID)
    # the same times from another cost-matrix run (another cost, other provenance): reused
    rerun = [replace(s, method="bellman", cost=1.5, provenance={"samples": 32}) for s in SCHEDULES]
    again = make_pairs(field, noise, rerun, tmp_path, fine_grid=GRID)
    assert np.array_equal(np.asarray(again.states), np.asarray(made.states))
    with pytest.raises(CheckpointError, match="another schedule"):
        make_pairs(field, noise, [on_grid(0, 6, 20)], tmp_path, fine_grid=GRID)
    with pytest.raises(CheckpointError, match="fine_grid"):
        make_pairs(field, noise, SCHEDULES, tmp_path, fine_grid=uniform(40))
    with pytest.raises(CheckpointError, match="model_fingerprint"):
        make_pairs(TinyField(), noise, SCHEDULES, tmp_path, fine_grid=GRID)
    with pytest.raises(CheckpointError, match="noise_fingerprint"):
        make_pairs(field, noise + 1, SCHEDULES, tmp_path, fine_grid=GRID)
    with pytest.raises(CheckpointError, match="pairs were made with another schedule"):
        PairStore.open(tmp_path).for_schedule(on_grid(0, 6, 20))


def test_bad_inputs_give_clear_errors(field, noise, tmp_path):
    with pytest.raises(ConfigError, match="not on the fine grid"):
        make_pairs(field, noise, Schedule([0.0, 0.33, 1.0]), tmp_path / "a", fine_grid=GRID)
    with pytest.raises(ConfigError, match="samples"):
        make_pairs(field, NoiseSource((2,)), SCHEDULES, tmp_path / "b", fine_grid=GRID)
    with pytest.raises(ConfigError, match="float16"):
        make_pairs(field, noise, SCHEDULES, tmp_path / "c", fine_grid=GRID, dtype=torch.int8)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BossflowError, match="not a directory"):
        make_pairs(field, noise, SCHEDULES, tmp_path / "file", fine_grid=GRID)
    with pytest.raises(CheckpointError, match="not a pair store"):
        PairStore.open(tmp_path)


def test_resume_checks_listed_shards_before_adding_more(tmp_path):
    import os

    from bossflow.field import SpiralField

    field, z = SpiralField(), torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    make_pairs(field, z[:4], [uniform(2)], tmp_path, fine_grid=4, batch_size=2)
    os.remove(tmp_path / "shard-00000.npy")
    with pytest.raises(CheckpointError, match="shard-00000.npy"):
        make_pairs(field, z, [uniform(2)], tmp_path, fine_grid=4, batch_size=2)
    assert not (tmp_path / "shard-00002.npy").exists()  # nothing integrated on a broken store


# Opens a 300-shard store and reads every sample with at most 100 open files, then exhausts the
# descriptors and opens it again. argv: store folder, expected .npy of all states.
_FEW_FILES = """
import resource, sys
import numpy as np
from bossflow.errors import BossflowError, CheckpointError
from bossflow.straighten import PairStore

resource.setrlimit(resource.RLIMIT_NOFILE, (100, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
expected = np.load(sys.argv[2])
store = PairStore.open(sys.argv[1])
one_by_one = np.stack([store.states[m].numpy() for m in range(len(store))])
np.testing.assert_array_equal(one_by_one, expected)
rows = np.random.default_rng(0).permutation(len(store))
np.testing.assert_array_equal(store.states[rows].numpy(), expected[rows])
np.testing.assert_array_equal(store.states[rows, rows % 5].numpy(), expected[rows, rows % 5])
fresh = PairStore.open(sys.argv[1])  # no shard mapped yet
held = []
try:
    while True:
        held.append(open("/dev/null"))
except OSError:
    pass
for attempt in (lambda: PairStore.open(sys.argv[1]), lambda: fresh.states[299]):
    try:
        attempt()
    except CheckpointError as err:
        sys.exit(f"blamed the pairs: {err}")
    except BossflowError as err:
        print(err)
    else:
        sys.exit("read a store with no file descriptor left")
"""


@pytest.mark.slow
def test_a_store_with_more_shards_than_open_files_reads(field, tmp_path):
    pytest.importorskip("resource")
    import subprocess
    import sys

    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(5))
    store = make_pairs(field, noise, SCHEDULES, tmp_path / "p", fine_grid=GRID, batch_size=1)
    shards = sorted((tmp_path / "p").glob("shard-*.npy"))
    assert len(shards) == 300 and len(store) == 300
    np.save(tmp_path / "all.npy", np.concatenate([np.load(s) for s in shards]))
    result = subprocess.run(
        [sys.executable, "-c", _FEW_FILES, str(tmp_path / "p"), str(tmp_path / "all.npy")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    messages = result.stdout.strip().splitlines()
    assert "cannot open manifest.json: Too many open files" in messages[0]
    assert "cannot open shard shard-00299.npy: Too many open files" in messages[1]
    for message in messages:
        assert "the pairs are not damaged; raise the open-file limit (e.g. ulimit -n" in message
        assert "delete" not in message


def test_truncated_or_missing_shards_are_reported_as_damage(field, noise, tmp_path):
    make_pairs(field, noise, SCHEDULES, tmp_path, fine_grid=GRID, batch_size=4)
    shard = tmp_path / "shard-00001.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match="shard-00001.npy.*truncated.*delete the folder"):
        PairStore.open(tmp_path)
    shard.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CheckpointError, match="shard-00001.npy.*cannot be read.*delete"):
        PairStore.open(tmp_path)
    shard.unlink()
    with pytest.raises(CheckpointError, match="shard-00001.npy.*missing.*delete the folder"):
        PairStore.open(tmp_path)


def test_open_store_pickles_without_its_open_maps(field, noise, tmp_path):
    import pickle

    store = make_pairs(field, noise, SCHEDULES, tmp_path, fine_grid=GRID, batch_size=4)
    before = store.states[:]
    copy = pickle.loads(pickle.dumps(store.states))
    assert torch.equal(copy[:], before)
