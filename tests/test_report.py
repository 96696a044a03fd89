import json
import math

import numpy as np
import pytest
import torch

from bossflow.errors import BossflowError
from bossflow.metrics import EvalRecord
from bossflow.report import (
    markdown_table,
    plot_error_vs_nfe,
    plot_schedules,
    read_results,
    save_comparison_grid,
    save_grid,
    write_report,
    write_results,
)
from bossflow.schedule import edm, uniform

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

REQUIRED = {"method", "nfe", "mse_to_reference", "psnr", "frechet", "wall_s", "iterations"}


def records():
    out = []
    for i, method in enumerate(["boss", "uniform", "bellman"]):
        for nfe in (8, 2, 4):
            iters = 300 if method == "boss" else None
            out.append(EvalRecord(method, nfe, 0.01 * (i + 1) / nfe, 1e-4, 25.0, 3.0, 0.2, iters))
    out.append(EvalRecord("reference", 1000, 0.0, 0.0, math.inf, 1.5, 9.0))
    return out


def read_png(path):
    with Image.open(path) as im:
        return im.mode, np.asarray(im)


# -- grids --------------------------------------------------------------------------------------
def test_grid_size_values_and_upscaling(tmp_path):
    images = torch.stack([torch.full((1, 8, 8), -1.0), torch.full((1, 8, 8), 1.0)] * 3)  # 6 images
    images[5, 0, 0, 0] = 0.0  # one mid-grey pixel
    path = save_grid(images, tmp_path / "g.png", nrow=3, scale=8, padding=1)
    mode, px = read_png(path)
    assert mode == "L"
    assert px.shape == (8 * (2 * 9 + 1), 8 * (3 * 9 + 1))  # rows=2, nrow=3, 8x8 images, padding 1
    # image k sits at grid cell (k // 3, k % 3); its pixels start at 8 * (1 + 9 * cell).
    first = px[8 : 8 + 64, 8 : 8 + 64]
    assert (first == 0).all()  # -1 -> black, over the whole 64x64 upscaled block
    second = px[8 : 8 + 64, 8 * 10 : 8 * 10 + 64]
    assert (second == 255).all()  # +1 -> white
    last = px[8 * 10 : 8 * 10 + 8, 8 * 19 : 8 * 19 + 8]
    assert (last == 128).all()  # 0 -> 127.5 rounded, a full 8x8 block (nearest neighbour)
    assert (px[:8] == 128).all()  # padding


def test_grid_rgb_default_nrow_and_clamping(tmp_path):
    images = torch.full((5, 3, 4, 4), 3.0)  # above the range: clamped to white
    images[:, 0] = -7.0
    images[0, 1] = math.nan  # drawn as the low value, not an error
    mode, px = read_png(save_grid(images, tmp_path / "rgb.png", scale=2, padding=0))
    assert mode == "RGB"
    assert px.shape == (2 * 2 * 4, 2 * 3 * 4, 3)  # ceil(sqrt(5)) = 3 per row, 2 rows
    assert tuple(px[0, 0]) == (0, 0, 255)
    assert tuple(px[0, 8]) == (0, 255, 255)


def test_grid_rejects_bad_shape(tmp_path):
    with pytest.raises(BossflowError, match="C = 1 or 3"):
        save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "x.png")


def test_comparison_grid_one_row_per_method(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = {
        m: torch.rand(5, 1, 8, 8, generator=g) * 2 - 1 for m in ["reference", "bellman", "boss"]
    }
    rows["bellman"] = torch.ones(6, 1, 8, 8)  # longer row: only the first 5 are drawn
    scale = 4
    path = save_comparison_grid(rows, tmp_path / "cmp.png", scale=scale)
    mode, px = read_png(path)
    assert px.shape[0] == scale * (3 * 9 + 1)  # three rows of 8x8 images, padding 1
    grid_w = scale * (5 * 9 + 1)
    label_w = px.shape[1] - grid_w
    assert label_w > 0
    images = px[:, label_w:]
    # the bellman row (second) is white in every image cell
    y0 = scale * (1 + 9)
    for j in range(5):
        x0 = scale * (1 + 9 * j)
        assert (images[y0 : y0 + 8 * scale, x0 : x0 + 8 * scale] == 255).all()
    labels = px[:, :label_w]
    assert (labels < 128).any() and (labels == 255).any()  # dark text on white
    for r in range(3):  # each row band has some label ink
        band = labels[scale * (1 + 9 * r) : scale * (9 + 9 * r)]
        assert (band < 128).any()


def test_comparison_grid_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(BossflowError, match="same"):
        save_comparison_grid(
            {"a": torch.zeros(2, 1, 8, 8), "b": torch.zeros(2, 1, 4, 4)}, tmp_path / "x.png"
        )


# -- plots --------------------------------------------------------------------------------------
def test_plots_are_nonempty_pngs(tmp_path):
    p1 = plot_schedules({"uniform": uniform(4), "edm": edm(6)}, tmp_path / "s.png")
    p2 = plot_error_vs_nfe(records(), tmp_path / "e.png")
    p3 = plot_error_vs_nfe([r.to_dict() for r in records()], tmp_path / "p.png", metric="psnr")
    for p in (p1, p2, p3):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
            assert len(np.unique(np.asarray(im.convert("L")))) > 2  # something was drawn
    with pytest.raises(BossflowError, match="unknown metric"):
        plot_error_vs_nfe(records(), tmp_path / "x.png", metric="fid")


# -- table and results.json ---------------------------------------------------------------------
def test_markdown_table_sorted_and_formatted():
    table = markdown_table(records())
    lines = table.strip().splitlines()
    assert lines[0].startswith("| method | NFE | MSE to reference (± s.e.) | PSNR")
    rows = [line.split(" | ")[0].strip("| ") + ":" + line.split(" | ")[1] for line in lines[2:]]
    assert rows == [
        "uniform:2",
        "uniform:4",
        "uniform:8",
        "bellman:2",
        "bellman:4",
        "bellman:8",
        "boss:2",
        "boss:4",
        "boss:8",
        "reference:1000",
    ]
    assert "| uniform | 2 | 0.01 ± 0.0001 | 25.00 | 3 | 0.2 | — |" in table
    assert "| boss | 8 | 0.00125 ± 0.0001 | 25.00 | 3 | 0.2 | 300 |" in table
    assert "| ∞ |" in lines[-1]


def test_results_round_trip_with_non_finite(tmp_path):
    recs = records() + [EvalRecord("edm", 4, math.nan, math.nan, math.nan, None, 0.1)]
    extra = {"model": "digits", "seeds": np.arange(3), "loss": float("-inf"), "t": torch.ones(2)}
    path = write_results(recs, tmp_path / "results.json", extra)
    text = path.read_text()
    data = json.loads(text)  # strict JSON: no NaN / Infinity literals
    json.dumps(data, allow_nan=False)
    assert "NaN" not in text and "Infinity" not in text
    for rec in data["records"]:
        assert REQUIRED <= set(rec) <= REQUIRED | {"mse_stderr"}
    assert data["model"] == "digits" and data["seeds"] == [0, 1, 2] and data["loss"] == "-inf"
    back, extra_back = read_results(path)
    assert len(back) == len(recs)
    by_key = {(r.method, r.nfe): r for r in back}
    assert by_key[("reference", 1000)].psnr == math.inf
    assert math.isnan(by_key[("edm", 4)].mse_to_reference) and by_key[("edm", 4)].frechet is None
    assert by_key[("boss", 2)] == next(r for r in recs if (r.method, r.nfe) == ("boss", 2))
    assert extra_back["t"] == [1.0, 1.0] and "format" not in extra_back


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not readable JSON"),
        ("[1, 2]", "'records' list"),
        ('{"records": {}}', "'records' list"),
        ('{"records": [{"method": "uniform", "nfe": 2}]}', "record 0 is malformed"),
        (
            '{"records": [{"method": "a|b", "nfe": 2, "mse_to_reference": 0, "psnr": 0,'
            ' "frechet": null, "wall_s": 0, "iterations": null}]}',
            "method label",
        ),
    ],
)
def test_read_results_malformed(tmp_path, content, match):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(BossflowError, match=match):
        read_results(path)


def test_read_results_missing_file(tmp_path):
    with pytest.raises(BossflowError, match="does not exist"):
        read_results(tmp_path / "nope.json")


def test_write_results_rejects_reserved_and_unserialisable(tmp_path):
    with pytest.raises(BossflowError, match="reserved"):
        write_results(records(), tmp_path / "r.json", {"records": 1})
    with pytest.raises(BossflowError, match="cannot store"):
        write_results(records(), tmp_path / "r.json", {"model": object()})
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# -- the report ---------------------------------------------------------------------------------
def test_write_report(tmp_path):
    g = torch.Generator().manual_seed(1)
    samples = {m: torch.rand(4, 1, 8, 8, generator=g) * 2 - 1 for m in ["reference", "uniform"]}
    path = write_report(
        tmp_path / "out",
        records(),
        schedules={"uniform": uniform(4), "bellman": edm(4)},
        samples=samples,
        extra={"model": "digits-unet", "seed": 0},
    )
    out = tmp_path / "out"
    assert path == out / "report.md"
    names = {p.name for p in out.iterdir()}
    assert names == {
        "report.md",
        "results.json",
        "error_vs_nfe.png",
        "frechet_vs_nfe.png",
        "schedules.png",
        "samples.png",
    }
    text = path.read_text()
    assert markdown_table(records()) in text
    for name in ("error_vs_nfe.png", "schedules.png", "samples.png"):
        assert f"]({name})" in text
    assert "- model: digits-unet" in text and "[results.json](results.json)" in text
    assert "| bellman | 4 |" in text  # schedule times table
    assert read_results(out / "results.json")[1] == {"model": "digits-unet", "seed": 0}
    # every image is linked, and results.json (the completion mark) is the last file written
    for png in out.glob("*.png"):
        assert f"]({png.name})" in text
    last = max(out.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert last.name == "results.json"


def test_failure_while_writing_the_report_leaves_no_results_json(tmp_path, monkeypatch):
    import bossflow.report as report

    out = tmp_path / "out"
    write_report(out, records())  # an earlier, complete run
    assert (out / "results.json").exists()
    real = report.atomic_write_text

    def killed(path, text):
        if str(path).endswith("report.md"):
            raise BossflowError("disk full (simulated)")
        return real(path, text)

    monkeypatch.setattr(report, "atomic_write_text", killed)
    with pytest.raises(BossflowError, match="disk full"):
        write_report(out, records()[:3])
    assert not (out / "results.json").exists()


def test_other_ranks_leave_the_report_to_rank_zero(tmp_path, monkeypatch):
    """Under torchrun a rank > 0 reaching write_report after rank 0 finished must not remove the
    finished results.json (it did: every rank unlinked it first)."""
    import bossflow.distributed as dist

    out = tmp_path / "out"
    write_report(out, records())  # rank 0's complete report
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    monkeypatch.setattr(dist, "is_rank_zero", lambda: False)
    assert write_report(out, records()[:3]) == out / "report.md"
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before


def test_reference_is_a_horizontal_line_and_plots_have_titles(tmp_path, monkeypatch):
    import bossflow.report as report

    figures = []
    real = report._save_figure
    monkeypatch.setattr(
        report, "_save_figure", lambda fig, p: (figures.append(fig), real(fig, p))[1]
    )
    plot_error_vs_nfe(records(), tmp_path / "f.png", metric="frechet")
    plot_schedules({"uniform": uniform(4)}, tmp_path / "s.png")
    ax = figures[0].axes[0]
    assert ax.get_xlim()[1] < 20  # NFE 1000 of the reference does not stretch the x axis
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "reference (1000 steps)" in labels and "boss" in labels
    assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == [1.5]
    assert "Fréchet" in ax.get_title() and figures[1].axes[0].get_title()


def test_report_on_points_and_on_shapes_it_cannot_draw(tmp_path):
    g = torch.Generator().manual_seed(0)
    points = {m: torch.randn(20, 2, generator=g) for m in ("uniform", "reference")}
    path = write_report(tmp_path / "pts", records(), samples=points)
    assert "](samples.png)" in path.read_text()
    with Image.open(tmp_path / "pts" / "samples.png") as im:
        assert im.width > 100
    volumes = {m: torch.randn(4, 2, 4, 4, generator=g) for m in ("uniform", "reference")}
    path = write_report(tmp_path / "vol", records(), samples=volumes)
    assert not (tmp_path / "vol" / "samples.png").exists()
    assert "samples.png not drawn" in path.read_text()
    assert (tmp_path / "vol" / "results.json").exists()


def test_output_path_that_is_a_file(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    with pytest.raises(BossflowError, match="not a directory"):
        write_report(blocker, records())
    with pytest.raises(BossflowError, match="not a directory"):
        save_grid(torch.zeros(1, 1, 2, 2), blocker / "g.png")
    with pytest.raises(BossflowError, match="not a directory"):
        write_results(records(), blocker / "results.json")
    assert blocker.read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(BossflowError, match="could not write"):
        save_grid(torch.zeros(1, 1, 2, 2), tmp_path / "dir.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "taken"]


def test_text_grid_maps_dark_to_space_and_bright_to_at():
    from bossflow.report import text_grid

    images = torch.stack([torch.full((1, 2, 3), -1.0), torch.full((1, 2, 3), 1.0)])
    text = text_grid({"row": images})
    lines = text.splitlines()
    assert lines[0] == "row"
    assert lines[1] == " " * 6 + "  " + "@" * 6
    assert lines[2] == lines[1] and len(lines) == 3  # two pixel rows, then the trailing blank
