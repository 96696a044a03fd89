import json

import numpy as np
import pytest

from bossflow import Schedule, edm, quadratic, uniform
from bossflow.errors import ScheduleError
from bossflow.schedule import make_schedule


@pytest.mark.parametrize("make", [uniform, edm, quadratic])
@pytest.mark.parametrize("k", [1, 2, 3, 8, 50])
def test_constructors_give_valid_grids(make, k):
    s = make(k)
    assert s.steps == k and len(s.times) == k + 1
    assert s.times[0] == 0.0 and s.times[-1] == 1.0
    assert (np.diff(s.times) > 0).all() and s.times.dtype == np.float64


def test_known_values():
    np.testing.assert_allclose(uniform(4).times, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(quadratic(2).times, [0, 0.75, 1])
    # EDM: sigma at k/K = 1/2 with rho = 1 is the mean of sigma_min and sigma_max.
    s = edm(2, rho=1.0, sigma_min=1.0, sigma_max=3.0)
    np.testing.assert_allclose(s.times, [0, 1 / 3, 1])
    # larger rho concentrates steps near the data (t = 1)
    assert edm(8, rho=7).times[-2] > edm(8, rho=2).times[-2]


@pytest.mark.parametrize(
    "times, message",
    [
        ([0.0, 0.5, 0.5, 1.0], "strictly increasing"),
        ([0.0, 0.7, 0.3, 1.0], "strictly increasing"),
        ([0.1, 1.0], "from 0"),
        ([0.0, 0.9], "from 0"),
        ([0.0, float("nan"), 1.0], "NaN"),
        ([0.0], "at least 2"),
        ([[0.0, 1.0]], "one-dimensional"),
        (["a", "b"], "list of numbers"),
    ],
)
def test_validation_errors(times, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule(times)


def test_json_round_trip(tmp_path):
    s = Schedule(
        [0.0, 0.2, 1.0],
        method="bellman",
        indices=(0, 20, 100),
        cost=1.5,
        provenance={"k_max": 100, "model": "digits"},
    )
    path = s.save(tmp_path / "s.json")
    assert json.loads(path.read_text())["times"] == [0.0, 0.2, 1.0]
    assert Schedule.load(path) == s
    (tmp_path / "plain.json").write_text("[0, 0.5, 1]")
    assert Schedule.load(tmp_path / "plain.json").steps == 2
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        Schedule.load(tmp_path / "bad.json")
    with pytest.raises(ScheduleError, match="does not exist"):
        Schedule.load(tmp_path / "missing.json")


def test_exporters():
    s = Schedule([0.0, 0.25, 0.6, 1.0])
    assert s.to_diffusers_sigmas() == [1.0, 0.75, 0.4]
    assert Schedule.from_diffusers_sigmas([1.0, 0.75, 0.4, 0.0]) == s
    grid = s.to_time_grid()
    assert grid.tolist() == pytest.approx([0.0, 0.25, 0.6, 1.0])
    assert s.tolist() == [0.0, 0.25, 0.6, 1.0]
    assert s.steps == 3


def test_registry_lists_names():
    with pytest.raises(ScheduleError, match="uniform"):
        make_schedule("cosine", 4)
    with pytest.raises(ScheduleError, match="positive integer"):
        uniform(0)


def test_unreadable_or_malformed_files_are_schedule_errors(tmp_path):
    with pytest.raises(ScheduleError, match="cannot read"):
        Schedule.load(tmp_path)  # a directory
    bad = {"times": [0.0, 0.5, 1.0], "indices": ["a", "b", "c"]}
    with pytest.raises(ScheduleError, match="not a valid"):
        Schedule.from_dict(bad)


def test_messages_print_numbers_plainly():
    with pytest.raises(ScheduleError) as err:
        Schedule([0.0, 0.5, 0.4, 1.0])
    assert "times[1] = 0.5 >= times[2] = 0.4" in str(err.value) and "np." not in str(err.value)
    with pytest.raises(ScheduleError) as err:
        Schedule([0.1, 1.0])
    assert "got first 0.1 and last 1.0" in str(err.value)


def test_foreign_formats_and_impossible_edm_settings_are_refused():
    """A file of another format was read as a schedule if its name ended in /1; edm(rho=0)
    divided by zero."""
    with pytest.raises(ScheduleError, match="unknown format 'other.thing/1'"):
        Schedule.from_dict({"format": "other.thing/1", "times": [0.0, 1.0]})
    assert Schedule.from_dict({"times": [0.0, 0.5, 1.0]}).steps == 2  # no format: ours
    for kwargs in ({"rho": 0.0}, {"sigma_min": 0.0}, {"sigma_min": 90.0}):
        with pytest.raises(ScheduleError, match="edm needs rho > 0"):
            edm(4, **kwargs)
