"""What a run reports (core/report.py, the tensorboard logger): report.md without matplotlib keeps the tables
and says how to get the plots; learning rates are plotted as such; the logger writes the scalars."""
import json
import sys

from core.report import write_report


def test_report_without_matplotlib(tmp_path, monkeypatch):
    events = [{"event": "stage_start", "stage": "a", "parameters": [["encoder.sam", 0, 10], ["decoder", 5, 0]]},
              {"event": "train", "stage": "a", "step": 0, "loss": 3.0, "lr": 0.1},
              {"event": "stage_end", "stage": "a", "steps": 1, "seconds": 1.0, "samples_per_s": 4.0, "loss": 3.0}]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    report = open(write_report(str(tmp_path))).read()
    assert 'pip install matplotlib' in report
    assert "| encoder.sam | 0 | 10 |" in report and "| a | 1 | 1.0000 | 4.0000 | 3.0000 |" in report
    assert not list(tmp_path.glob("*.png"))


def test_the_logged_learning_rates_are_plotted_as_such_not_as_losses():
    from core import report
    events = [{"event": "train", "stage": "a", "step": 0, "loss": 1.0, "cells": 2.0, "lr": 0.1, "muon_lr": 0.02}]
    assert set(report._series(events, "train", None)["a"]) == {"loss", "cells"}
    assert set(report._series(events, "train", report.PLOTS["lr.png"][2])["a"]) == {"lr", "muon_lr"}


def test_tensorboard_logger_writes_scalars(tmp_path):
    import pytest
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from plugins.loggers.tensorboard import TensorBoardLogger
    logger = TensorBoardLogger(str(tmp_path))
    for step, loss in enumerate([3.0, 2.5, 2.0]):
        logger.vlmkit_log(record={"event": "train", "stage": "vis_tok", "step": step, "loss": loss, "time": 1.0})
    logger.vlmkit_log(record={"event": "eval", "precision": 0.9, "samples": 8})
    logger.writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [s.value for s in events.Scalars("vis_tok/train/loss")] == [3.0, 2.5, 2.0]
    assert events.Scalars("eval/precision")[0].value == pytest.approx(0.9)
    assert "vis_tok/train/time" not in events.Tags()["scalars"]
