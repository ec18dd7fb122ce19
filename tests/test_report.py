"""`--report-to csv,tensorboard,wandb`: fastai's loggers over every stage of a run, kept in OUT/logs."""

import pandas as pd
import pytest

from ulmfit_tx import clas_dataloaders, classifier_learner
from ulmfit_tx.cli import main
from ulmfit_tx.report import report_callbacks

from .test_training import keyword_task


def test_train_clf_reports_every_stage_to_csv_tensorboard_and_wandb(bert_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    csv = tmp_path / "d.csv"
    keyword_task(48).to_csv(csv, index=False)
    out = tmp_path / "clf"
    argv = ["train-clf", "--model", str(bert_dir), "--data", str(csv), "--out", str(out), "--max-len", "32"]
    assert main([*argv, "--bs", "8", "--epochs", "2", "--report-to", "csv,tensorboard,wandb"]) == 0
    hist = pd.read_csv(out / "logs" / "history.csv")  # one header; the four ULMFiT stages numbered
    assert list(hist.columns[:4]) == ["fit", "epoch", "train_loss", "valid_loss"] and "accuracy" in hist
    assert hist.fit.tolist() == [0, 1, 2, 3, 3] and hist.epoch.tolist() == [0, 0, 0, 0, 1]
    events = EventAccumulator(str(out / "logs" / "tensorboard")).Reload()
    steps = [e.step for e in events.Scalars("train_loss")]
    assert steps == list(range(1, 5 * 4 + 1)), "a step a training batch (4 an epoch), on from stage to stage"
    assert len(events.Scalars("valid_loss")) == 5
    assert list((out / "logs" / "wandb").glob("offline-run-*/run-*.wandb")), "the offline W&B run is kept"
    assert not (tmp_path / "clf.checkpoint").exists()

    capsys.readouterr()
    assert main([*argv[:-4], "--out", str(tmp_path / "x"), "--report-to", "csv,mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown 'mlflow'; choose from csv, tensorboard, wandb" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.checkpoint").exists()


def test_report_callbacks_log_a_notebook_fit(bert_dir, tmp_path):
    dls = clas_dataloaders(keyword_task(32), bert_dir, max_len=32, bs=8)
    learn = classifier_learner(dls, bert_dir, precision="fp32")
    with learn.no_bar():
        learn.fit_one_cycle(1, 1e-3, cbs=report_callbacks("csv", tmp_path / "logs"))
        learn.fit_one_cycle(1, 1e-3, cbs=report_callbacks(["csv"], tmp_path / "logs"))  # appended, one header
    hist = pd.read_csv(tmp_path / "logs" / "history.csv")
    assert len(hist) == 2 and hist.valid_loss.notna().all()
