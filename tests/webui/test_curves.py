"""The interactive curves' tables (hover columns, x axes, smoothing, fixed colours), the run card's warnings,
the TensorBoard command of the Runs tab, and `workbench plot` writing PNG/SVG files."""

from __future__ import annotations

import json

import pytest

from engine.cli import main
from engine.run import rundir
from webui import curves
from webui.metrics import MetricSeries, smooth
from webui.plots import plot_words


def _run(tmp_path, name="run-a", steps=6):
    run_dir = tmp_path / name
    run_dir.mkdir()
    rows = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-3 * s, "tokens": 100 * s, "elapsed_s": 1.5 * s,
             "time": 1_800_000_000 + s} for s in range(1, steps + 1)]
    rows.append({"step": 4, "eval_loss": 0.9, "time": 1_800_000_010})
    (run_dir / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    series = MetricSeries(run_dir)
    series.update()
    return run_dir, series


def test_loss_table_has_hover_columns_axes_and_smoothing(tmp_path):
    _, series = _run(tmp_path)
    words = plot_words("en")
    rows = curves.loss_rows(series, words, smoothing=0.5)
    df = curves.frame(rows, "tokens")
    assert list(df.columns) == curves.COLUMNS
    raw = df[df.series == "raw"]
    assert list(raw.step) == [1, 2, 3, 4, 5, 6] and list(raw.tokens) == [100, 200, 300, 400, 500, 600]
    assert list(raw.y) == pytest.approx([2.0 / s for s in range(1, 7)])
    assert list(df[df.series == "smoothed"].y) == pytest.approx(smooth([2.0 / s for s in range(1, 7)], 0.5))
    ev = df[df.series == "eval"]
    assert list(ev.y) == [0.9] and list(ev.tokens) == [400]  # the eval point sits at its training row's x
    assert raw.time.iloc[0] and ":" in raw.time.iloc[0]
    assert set(curves.frame(curves.loss_rows(series, words, smoothing=0), "step").series) == {"raw", "eval"}
    assert set(curves.loss_colors(words)) == {"raw", "smoothed", "eval"}


def test_run_colours_stay_the_same_whatever_else_is_shown():
    both = curves.run_colors(["run-a", "run-b"])
    assert len(set(both.values())) == 2
    three = curves.run_colors(["run-c", "run-b", "run-a"])
    assert {k: three[k] for k in both} == both and len(set(three.values())) == 3  # a later run takes a free colour
    assert curves.run_colors(["run-b", "run-a"]) == both  # the order they were picked in does not matter


def test_run_card_shows_warnings(tmp_path):
    from webui.runs import RunInfo
    from webui.views import run_card

    info = RunInfo(id="r", path=tmp_path, state="running", warnings=("tracker WandB failed during on_log",))
    html = run_card("en", info, None)
    assert "The run goes on, with a warning" in html and "tracker WandB failed during on_log" in html


def test_tensorboard_command_lists_the_runs_that_logged(tmp_path):
    from webui.tabs.runs import tensorboard_command

    a, _ = _run(tmp_path, "run-a")
    b, _ = _run(tmp_path, "run-b")
    (a / rundir.TENSORBOARD).mkdir()

    class Manager:
        def run_dir(self, run_id):
            return tmp_path / run_id

    html = tensorboard_command(Manager(), ["run-a", "run-b"], "en")
    assert f"tensorboard --logdir_spec run-a:{a / rundir.TENSORBOARD}" in html
    assert "run-b" not in html
    assert tensorboard_command(Manager(), ["run-b"], "en") == ""


def test_workbench_plot_writes_png_and_svg(tmp_path, capsys):
    a, _ = _run(tmp_path, "run-a")
    b, _ = _run(tmp_path, "run-b")
    assert main(["plot", str(a), str(b)]) == 0
    for run in (a, b):
        for name in ("loss.png", "loss.svg", "learning_rate.png", "learning_rate.svg"):
            assert (run / "plots" / name).stat().st_size > 1000, name
    assert (a / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in (a / "plots" / "loss.svg").read_text()[:2000]
    assert (a / "plots" / "compare.svg").is_file()
    assert main(["plot", str(tmp_path)]) == 2
    assert "is not a run directory with metrics" in capsys.readouterr().err


def test_data_preview_shows_the_rows_a_mix_takes_per_dataset():
    from pathlib import Path

    from webui.tabs.data import preview_html

    registry = str(Path(__file__).resolve().parents[2] / "data" / "dataset_info.yaml")
    html = preview_html("en", "sft", ["identity", "instruct_demo"], registry, "interleave", "0.5, 0.5",
                        "first_exhausted", None, 42)
    assert 'id="data-mix"' in html and "Rows a run takes (interleave): identity 90" in html
    rows = [int(n) for n in html.split('data-rows="')[1].split('"')[0].split(",")]
    assert rows[0] == 90 and 60 <= rows[1] <= 120  # the mix stops when identity (90 rows, drawn half the time) runs out
    concat = preview_html("en", "sft", ["identity", "instruct_demo"], registry, "concat", "", "first_exhausted", None, 42)
    assert 'data-rows="90,314"' in concat
    assert 'id="data-mix"' not in preview_html("en", "sft", ["identity", "instruct_demo"], registry, "interleave",
                                               "0.5, 0.4", "first_exhausted", None, 42)


def test_every_plot_names_its_y_axis(tmp_path):
    """An empty y_title makes the chart print the table's column name ("y") beside the axis."""
    from webui.tabs import curveview

    _, series = _run(tmp_path)
    assert curveview.loss_update(series, "en", 0.6, "step")["y_title"] == "Loss"
    lr = curveview.metric_update(series, "en", "learning_rate", "step")
    assert lr["y_title"] == curveview.words("en")["lr"] and lr["y_title"] not in ("", "y")
    # its legend names the series in the page's language too, with the colour kept
    for lang in ("en", "zh"):
        update = curveview.metric_update(series, lang, "learning_rate", "step")
        assert set(update["value"]["series"]) == {curveview.words(lang)["lr"]} == set(update["color_map"])
    assert curveview.metric_update(None, "zh", "learning_rate", "step")["y_title"] == curveview.words("zh")["lr"]
    assert curveview.metric_update(series, "en", "rewards/chosen,rewards/rejected", "step")["y_title"] == \
        "rewards/chosen, rewards/rejected"
    # the legend's title too (the table's column name, "series", otherwise)
    assert curveview.loss_update(series, "zh", 0.6, "step")["color_title"] == "曲线"
    assert curveview.overlay_update([("run-a", series)], "en", 0.6, "step")["color_title"] == "Run"
