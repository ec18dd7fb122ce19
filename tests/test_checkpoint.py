"Checkpoints and resume: an interrupted run, resumed, ends exactly where the uninterrupted one does."

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from fastai.callback.core import Callback
from fastai.learner import load_learner
from fastai.torch_core import set_seed
from safetensors.torch import load_file

from tests.conftest import reviews_csv
from ulmfit_tx import (
    CheckpointCallback,
    Interrupted,
    Stage,
    UlmfitError,
    clas_dataloaders,
    classifier_learner,
    fit_stages,
    fit_ulmfit,
)
from ulmfit_tx.cli import main
from ulmfit_tx.plots import LossHistory


class Crash(Exception):
    pass


class CrashAfter(Callback):
    "Raises after `n` training steps (after the checkpoint of that step is written)."

    order = 101

    def __init__(self, n):
        self.n = n

    def after_batch(self):
        if self.training:
            self.n -= 1
            if self.n == 0:
                raise Crash("crash")


def _learner(bert_dir, df, *cbs):
    set_seed(0, reproducible=True)  # python, numpy and torch, as the CLI does
    dls = clas_dataloaders(df, bert_dir, max_len=32, bs=4, seed=0)
    return classifier_learner(dls, bert_dir, cbs=list(cbs))


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


class SignalAfterFirstFit(Callback):
    "Sends this process SIGINT when the first stage's fit has ended (after the checkpoint callback's `after_fit`)."

    order = 101

    def __init__(self):
        self.sent = False

    def after_fit(self):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


class Escaped(Exception):
    pass


def test_a_signal_between_stages_is_caught_checkpointed_and_handlers_are_given_back(bert_dir, small_df, tmp_path):
    "Between two stages (no fit running) a signal must still stop the run with the checkpoint, not kill it."

    def escaped(s, f):
        raise Escaped("the signal reached the handler from before the fit")

    learn = _learner(bert_dir, small_df, CheckpointCallback(tmp_path / "ck"), SignalAfterFirstFit())
    before = signal.signal(signal.SIGINT, escaped)
    try:
        with learn.no_bar(), learn.no_logging(), pytest.raises(Interrupted):
            fit_stages(learn, [Stage(1, 1, 1e-3), Stage(None, 1, 1e-4)])
        assert signal.getsignal(signal.SIGINT) is escaped  # given back after the interruption
    finally:
        signal.signal(signal.SIGINT, before)
    state = json.loads((tmp_path / "ck" / "state.json").read_text())["position"]
    assert state == {"stage": 1, "epoch": 0, "step": 0}  # resume starts the second stage


def test_python_api_resume_matches_the_uninterrupted_run(bert_dir, small_df, tmp_path):
    full = _learner(bert_dir, small_df, hist_full := LossHistory())
    with full.no_bar(), full.no_logging():
        fit_ulmfit(full, 1e-3, epochs=(1, 1, 2, 1))
    learn = _learner(
        bert_dir, small_df, CheckpointCallback(tmp_path / "ck", every_steps=3), CrashAfter(28), LossHistory()
    )
    with learn.no_bar(), learn.no_logging(), pytest.raises(Crash):
        fit_ulmfit(learn, 1e-3, epochs=(1, 1, 2, 1))
    state = json.loads((tmp_path / "ck" / "state.json").read_text())["position"]
    assert state == {"stage": 2, "epoch": 1, "step": 3}  # 8 steps an epoch: crashed at 8 + 8 + 8 + 4, saved at step 3
    again = _learner(bert_dir, small_df, CheckpointCallback(tmp_path / "ck", resume=True), hist := LossHistory())
    with again.no_bar(), again.no_logging():
        fit_ulmfit(again, 1e-3, epochs=(1, 1, 2, 1))
    a, b = _weights(full.model), _weights(again.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), "resumed weights differ"
    assert len(hist.train) == len(hist_full.train) and hist.train[-1] == pytest.approx(hist_full.train[-1], abs=1e-5)


def _run(args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "ulmfit_tx.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _kill_when(proc, state_file, reached, timeout=300):
    "SIGKILL `proc` as soon as its checkpoint state satisfies `reached`."
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            pos = json.loads(state_file.read_text())["position"]
        except (OSError, ValueError):
            pos = None
        if pos is not None and reached(pos):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return pos
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()[-2000:]}"
        time.sleep(0.005)
    raise AssertionError("no checkpoint in time")


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory, sample_df):
    return reviews_csv(tmp_path_factory.mktemp("ckdata"), sample_df, 120, 20)


def _model_weights(out, kind):
    if kind == "clf":
        return load_learner(out / "export.pkl").model.state_dict()
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize(
    "cmd,extra,reached",
    [
        ("train-clf", ["--epochs", "1", "--checkpoint-steps", "2"], lambda p: p["stage"] == 2 and p["step"] > 0),
        (
            "finetune-lm",
            ["--epochs", "2", "--checkpoint-steps", "3", "--mode", "docs"],
            lambda p: p["epoch"] == 1 and p["step"] > 0,
        ),
    ],
)
def test_cli_killed_with_sigkill_then_resumed_ends_as_the_uninterrupted_run(
    tiny_models, data_csv, tmp_path, cmd, extra, reached
):
    common = ["--model", tiny_models["bert"], "--data", data_csv, "--max-len", "48", "--bs", "4", *extra]
    full = _run([cmd, *common, "--out", tmp_path / "full"])
    assert full.wait() == 0, full.stderr.read()
    out = tmp_path / "run"
    killed = _run([cmd, *common, "--out", out])
    _kill_when(killed, tmp_path / "run.checkpoint" / "state.json", reached)
    assert not out.exists()
    assert main([cmd, *map(str, common), "--out", str(out)]) == 2  # a checkpoint is there: --resume or delete it
    resumed = _run([cmd, *common, "--out", out, "--resume"])
    assert resumed.wait() == 0, resumed.stderr.read()
    assert not (tmp_path / "run.checkpoint").exists()  # removed once the run finished
    kind = "clf" if cmd == "train-clf" else "lm"
    a, b = _model_weights(tmp_path / "full", kind), _model_weights(out, kind)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a), "resumed weights differ"
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "full", out))
    for k in ("accuracy", "valid_loss", "mlm_loss", "perplexity"):
        if k in ma:
            assert mb[k] == pytest.approx(ma[k], abs=1e-5), k


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tiny_models, data_csv, tmp_path):
    """The signal lands mid-epoch (after a periodic checkpoint inside an epoch: signalling right after the first
    epoch's checkpoint would hit the boundary between two stages, where no newer checkpoint is due); the run writes
    a newer one."""
    args = [
        "finetune-lm",
        "--model",
        tiny_models["bert"],
        "--data",
        data_csv,
        "--max-len",
        "48",
        "--bs",
        "4",
        "--epochs",
        "50",
        "--checkpoint-steps",
        "2",
        "--out",
        tmp_path / "o",
    ]
    proc = _run(args)
    state = tmp_path / "o.checkpoint" / "state.json"
    position = lambda: tuple(json.loads(state.read_text())["position"][k] for k in ("stage", "epoch", "step"))
    t0, seen = time.time(), (0, 0, 0)
    while seen[2] == 0 and time.time() - t0 < 300:
        time.sleep(0.02)
        if state.exists():
            seen = position()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err
    assert position() > seen and not (tmp_path / "o").exists()


def test_resume_errors_are_one_line_and_change_nothing(tiny_models, data_csv, tmp_path, capsys):
    args = [
        "train-clf",
        "--model",
        str(tiny_models["bert"]),
        "--data",
        str(data_csv),
        "--max-len",
        "32",
        "--bs",
        "8",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--resume"]) == 2 and "no checkpoint" in capsys.readouterr().err
    ck = tmp_path / "o.checkpoint"
    CheckpointCallback(ck, settings={"lr": 1.0}).folder.mkdir()
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch; torch.save({'position': {}, 'settings': {'lr': 1.0}}, "
            f"{str(ck / 'checkpoint.pt')!r})",
        ]
    )
    assert other.returncode == 0
    assert main([*args, "--resume"]) == 2 and "other settings" in capsys.readouterr().err
    data = (ck / "checkpoint.pt").read_bytes()
    (ck / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unreadable checkpoint" in err and len(err.splitlines()) == 1
    assert (ck / "checkpoint.pt").read_bytes() == data[: len(data) // 2] and not (tmp_path / "o").exists()
    with pytest.raises(UlmfitError, match="positive"):
        CheckpointCallback(ck, every_steps=0)
