"""MetricSeries reads metrics.jsonl incrementally and merges a resumed run's rows."""

from __future__ import annotations

import json

import pytest

from webui.metrics import MetricSeries, smooth


def _append(path, *rows, raw: str = ""):
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write(raw)


def test_reads_only_new_lines_from_its_offset(tmp_path):
    path = tmp_path / "metrics.jsonl"
    s = MetricSeries(tmp_path)
    assert s.update() == 0 and s.points == 0  # no file yet
    _append(path, {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5})
    assert s.update() == 2 and s.version == 1
    offset = s.tail.offset
    assert offset == path.stat().st_size
    assert s.update() == 0 and s.version == 1  # nothing new: nothing read, nothing to redraw
    _append(path, {"step": 3, "loss": 2.0})
    assert s.update() == 1
    assert s.tail.offset > offset
    assert s.steps() == [1, 2, 3]


def test_does_not_reread_the_file(tmp_path):
    """Bytes before the offset are never read again: changing them in place changes nothing."""
    path = tmp_path / "metrics.jsonl"
    _append(path, *({"step": i, "loss": 1.0} for i in range(1, 501)))
    s = MetricSeries(tmp_path)
    s.update()
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"loss": 1.0', b'"loss": 7.0'))  # same length, every old row
    _append(path, {"step": 501, "loss": 0.5})
    assert s.update() == 1
    assert s.loss_at(1) == 1.0 and s.loss_at(501) == 0.5
    assert MetricSeries(tmp_path).update() == 501  # a fresh reader does see the rewritten rows


def test_half_written_line_waits(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _append(path, {"step": 1, "loss": 3.0}, raw='{"step": 2, "lo')
    s = MetricSeries(tmp_path)
    assert s.update() == 1 and s.steps() == [1]
    _append(path, raw='ss": 2.5}\n')
    assert s.update() == 1 and s.column("loss") == ([1, 2], [3.0, 2.5])


def test_resume_later_rows_win_and_replace_the_abandoned_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    s = MetricSeries(tmp_path)
    _append(path, *({"step": i, "loss": 10.0 - i, "learning_rate": 1e-4} for i in range(1, 9)))
    _append(path, {"step": 5, "eval_loss": 4.4}, {"step": 8, "eval_loss": 3.3})
    s.update()
    assert s.steps()[-1] == 8
    # stopped after step 8, resumed from checkpoint-5: step 6 is logged again
    _append(path, {"step": 6, "loss": 1.5}, {"step": 7, "loss": 1.4})
    s.update()
    assert s.column("loss") == ([1, 2, 3, 4, 5, 6, 7], [9.0, 8.0, 7.0, 6.0, 5.0, 1.5, 1.4])
    assert s.column("eval_loss", "eval") == ([5], [4.4])  # the abandoned step-8 eval is gone
    # a step logged twice in a row: the later row wins
    _append(path, {"step": 7, "loss": 1.3})
    s.update()
    assert s.loss_at(7) == 1.3 and s.points == 7
    assert s.loss_at(100) == 1.3 and s.loss_at(0) is None


def test_rows_without_loss_update_progress_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _append(path, {"step": 3, "loss": 2.0, "tokens_per_s": 50.0}, {"step": 3, "total_steps": 9, "eta_s": 12.0},
            {"step": "x"})
    s = MetricSeries(tmp_path)
    s.update()
    assert s.points == 1
    assert s.latest["eta_s"] == 12.0 and s.latest["tokens_per_s"] == 50.0  # same step: merged
    _append(path, {"loss": float("nan"), "step": 4})
    s.update()
    assert s.points == 1 and s.latest["step"] == 4


def test_smoothing_is_debiased_and_flat_on_constant_input():
    assert smooth([]) == []
    assert smooth([2.0] * 5) == pytest.approx([2.0] * 5)
    out = smooth([10.0, 0.0, 0.0, 0.0], weight=0.5)
    assert out[0] == pytest.approx(10.0)  # no pull towards zero at the start
    assert out == sorted(out, reverse=True)


def test_stage_metrics_are_drawn_under_the_loss(tmp_path):
    from webui.plots import loss_figure, stage_panels
    from webui.tabs.train import plot_words

    rows = [{"step": s, "loss": 0.69 - 0.01 * s, "rewards/chosen": 0.01 * s, "rewards/rejected": -0.01 * s,
             "rewards/margins": 0.02 * s, "rewards/accuracies": 0.5 + 0.05 * s} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    series = MetricSeries(tmp_path)
    series.update()
    words = plot_words("en")
    dpo = loss_figure(series, words, "dpo")
    assert len(dpo.axes) == 1 + len(stage_panels("dpo")) == 4
    drawn = {line.get_label() for ax in dpo.axes[1:] for line in ax.get_lines()}
    assert drawn == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert len(loss_figure(series, words, "sft").axes) == 1
    # a stage whose metrics have not been logged yet draws the loss alone
    assert len(loss_figure(series, words, "rl").axes) == 1
