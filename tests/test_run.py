"`Run`: the command line's resumable, atomically written runs, from Python."

import json

import pytest
import torch
from fastai.callback.core import Callback

from tests.test_checkpoint import Crash, CrashAfter
from ulmfit_tx import Run, UlmfitError, clas_dataloaders, classifier_learner, load_classifier, ulmfit_stages
from ulmfit_tx.plots import ConfusionCounts
from ulmfit_tx.run import checkpoint_folder

STAGES = ulmfit_stages(1e-3, epochs=(1, 1, 1, 1))


class CountSteps(Callback):
    def __init__(self):
        self.n = 0

    def after_batch(self):
        self.n += self.training


def _fit(run, bert_dir, df, *cbs):
    "A classifier learner on `run`'s callbacks, fitted with `STAGES` (float32: the weights are compared to 1e-5)."
    dls = clas_dataloaders(df, bert_dir, max_len=32, bs=4, seed=0)
    learn = classifier_learner(dls, bert_dir, precision="fp32", cbs=[*run.cbs, ConfusionCounts(), *cbs])
    with learn.no_bar(), learn.no_logging():
        values = run.fit(learn, STAGES)
    return learn, values


def test_an_interrupted_run_resumes_to_the_uninterrupted_weights_and_writes_its_folder(bert_dir, small_df, tmp_path):
    full, (loss, acc) = _fit(Run(tmp_path / "full", seed=0), bert_dir, small_df, all_steps := CountSteps())

    out = tmp_path / "clf"
    with pytest.raises(Crash):
        _fit(Run(out, checkpoint_steps=3, seed=0), bert_dir, small_df, CrashAfter(20))
    assert not out.exists() and (checkpoint_folder(out) / "state.json").is_file()
    with pytest.raises(UlmfitError, match="pass --resume"):
        Run(out)  # an interrupted run's checkpoint is never started over silently

    run = Run(out, resume=True, checkpoint_steps=3, seed=0)
    learn, (loss2, acc2) = _fit(run, bert_dir, small_df, steps := CountSteps())
    # the crash came at step 20 of 32; the last checkpoint was step 3 of the third stage (the 19th): resume from there
    assert steps.n == all_steps.n - 19, "a resumed run continues after its last checkpoint, not from the start"
    a, b = full.model.state_dict(), learn.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), "resumed weights differ"
    assert loss2 == pytest.approx(loss, abs=1e-5) and acc2 == pytest.approx(acc)

    stats = run.stats(learn, 4 * len(learn.dls.train_ds))
    assert stats["train_samples_per_s"] > 0 and stats["precision"] == "fp32"
    run.save_classifier(learn, {"accuracy": acc2, **stats})
    assert {"export.pkl", "metrics.json", "loss.png", "confusion_matrix.png", "ulmfit_tx.json"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == pytest.approx(acc)
    assert not checkpoint_folder(out).exists(), "a finished run removes its checkpoint"
    assert learn.path.exists() and load_classifier(out).predict_texts(["fine"]).shape == (1, 3)
    with pytest.raises(UlmfitError, match="already exists"):
        Run(out)
