"""Faults of long runs: a disk that fills up (a real tmpfs), a damaged or foreign token store, a killed tokenize, a
bundle whose files were swapped. Each gives one line and exit code 2, and what the user had is kept."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT, reviews_csv
from ulmfit_tx.checkpoint import CKPT, CheckpointCallback
from ulmfit_tx.cli import main
from ulmfit_tx.errors import UlmfitError
from ulmfit_tx.files import atomic_file, is_disk_full, remove_stale
from ulmfit_tx.learner import load_classifier
from ulmfit_tx.run import Run
from ulmfit_tx.store import TokenStore, tokenizer_fingerprint
from ulmfit_tx.tokenize import HFTokenizer
from ulmfit_tx.train_tokenizer import train_tokenizer

SHORT = ["--max-len", "32", "--bs", "8", "--epochs", "1"]


class Disk:
    "A small tmpfs mounted at `path`, which `fill` fills up (a ballast file) and `free_up` empties again."

    def __init__(self, path: Path):
        self.path, self.ballast = path, path / "ballast"

    def fill(self):
        with open(self.ballast, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC

    def free_up(self):
        self.ballast.unlink(missing_ok=True)

    def leftovers(self) -> list[str]:
        "Names on the disk that start with a dot: temporary files and folders left behind."
        return sorted(p.name for p in self.path.rglob(".*"))


@pytest.fixture()
def disk(tmp_path):
    "A real 8 MB filesystem to fill (mounting needs root: skipped where the tests cannot mount one)."
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield Disk(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def csv(tmp_path_factory, sample_df):
    return reviews_csv(tmp_path_factory.mktemp("data"), sample_df, 40, 10)


@pytest.fixture(scope="module")
def bundle(tiny_models, csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "clf"
    assert main(["train-clf", "--model", str(tiny_models["bert"]), "--data", str(csv), "--out", str(out), *SHORT]) == 0
    return out


def _one_line(capsys, *words) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err
    line = err[-1].split("\r")[-1]  # (after the progress bar's last redraw)
    assert line.startswith("ulmfit-tx ") and ": error: " in line, line
    for w in words:
        assert w in line, line
    return line


def test_full_disk_errors_are_recognised_however_the_writer_reports_them(tmp_path):
    e = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    e.__context__ = OSError(errno.ENOSPC, "No space left on device")  # torch.save through a Python file
    assert is_disk_full(e)
    assert is_disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(RuntimeError("unexpected pos"), tmp_path)  # (this disk has room)
    assert not is_disk_full(ValueError("bad value"))


def test_train_clf_on_a_disk_that_fills_mid_run_resumes_from_the_last_checkpoint(
    tiny_models, csv, disk, capsys, monkeypatch
):
    out = disk.path / "clf"
    args = ["train-clf", "--model", str(tiny_models["bert"]), "--data", str(csv), "--out", str(out), *SHORT]
    save, saved = CheckpointCallback.save, []

    def save_then_fill(self, pos, epoch_end=False):
        save(self, pos, epoch_end)
        saved.append(pos)
        if len(saved) == 2:
            disk.fill()  # the third checkpoint finds no room

    monkeypatch.setattr(CheckpointCallback, "save", save_then_fill)
    assert main([*args, "--checkpoint-steps", "2"]) == 2
    _one_line(capsys, f"{out}.checkpoint/{CKPT}: no space left on device", "intact", "--resume")
    assert not out.exists() and disk.leftovers() == []
    kept = torch.load(out.parent / f"{out.name}.checkpoint" / CKPT, weights_only=True)["position"]
    assert kept == saved[1].__dict__  # the last one written before the disk filled

    monkeypatch.undo()
    disk.free_up()
    assert main([*args, "--checkpoint-steps", "2", "--resume"]) == 0
    assert (out / "model.safetensors").is_file() and not (disk.path / "clf.checkpoint").exists()


def test_train_clf_whose_outputs_do_not_fit_keeps_its_checkpoint(tiny_models, csv, disk, capsys, monkeypatch):
    out = disk.path / "clf"
    args = ["train-clf", "--model", str(tiny_models["bert"]), "--data", str(csv), "--out", str(out), *SHORT]
    write = Run._write_classifier

    def fill_then_write(self, *a, **k):
        disk.fill()
        return write(self, *a, **k)

    monkeypatch.setattr(Run, "_write_classifier", fill_then_write)
    assert main(args) == 2
    _one_line(capsys, f"{out}: no space left on device", "nothing was written", "--resume")
    assert not out.exists() and disk.leftovers() == []
    assert (disk.path / "clf.checkpoint" / CKPT).is_file()
    monkeypatch.undo()
    disk.free_up()
    assert main([*args, "--resume"]) == 0
    assert (out / "ulmfit_tx.json").is_file()


def test_finetune_lm_whose_outputs_do_not_fit(tiny_models, csv, disk, capsys, monkeypatch):
    out = disk.path / "lm"
    write = Run._write_pretrained

    def fill_then_write(self, *a, **k):
        disk.fill()
        return write(self, *a, **k)

    monkeypatch.setattr(Run, "_write_pretrained", fill_then_write)
    args = ["finetune-lm", "--model", str(tiny_models["bert"]), "--data", str(csv), "--out", str(out), *SHORT]
    assert main(args) == 2
    _one_line(capsys, f"{out}: no space left on device")
    assert not out.exists() and disk.leftovers() == []


def test_predict_tokenize_and_export_onnx_on_a_full_disk_keep_what_was_there(bundle, tiny_models, csv, disk, capsys):
    preds = disk.path / "preds.csv"
    preds.write_text("earlier predictions\n")
    onnx_bundle = disk.path / "bundle"
    shutil.copytree(bundle, onnx_bundle)
    before = {p.name: p.read_bytes() for p in onnx_bundle.iterdir()}
    disk.fill()

    assert main(["predict", "--model", str(bundle), "--data", str(csv), "--out", str(preds)]) == 2
    _one_line(capsys, f"{preds}: no space left on device", "what was there is unchanged")
    assert preds.read_text() == "earlier predictions\n"

    store = disk.path / "store"
    assert main(["tokenize", "--model", str(tiny_models["bert"]), "--data", str(csv), "--out", str(store)]) == 2
    _one_line(capsys, f"{store}: no space left on device", "nothing was written")
    assert not store.exists()

    assert main(["export-onnx", "--model", str(onnx_bundle)]) == 2
    _one_line(capsys, "model.onnx: no space left on device")
    assert {p.name: p.read_bytes() for p in onnx_bundle.iterdir()} == before
    assert disk.leftovers() == []


def test_a_store_with_ids_beyond_the_tokenizer_is_refused_and_verify_finds_damage(
    tiny_models, sample_df, csv, tmp_path, capsys
):
    store = tmp_path / "store"
    assert main(["tokenize", "--model", str(tiny_models["bert"]), "--data", str(csv), "--out", str(store)]) == 0
    assert main(["tokenize", "--verify", str(store), "--model", str(tiny_models["bert"])]) == 0
    said = capsys.readouterr().out
    assert "OK" in said and "checksums match" in said
    meta = json.loads((store / "meta.json").read_text())
    assert meta["max_id"] == int(np.fromfile(store / "ids.bin", np.uint16).max())

    # another tokenizer whose fingerprint matched: the store's largest id is beyond its vocabulary
    small = train_tokenizer(sample_df.text.tolist()[:100], "wordpiece", 200)
    foreign = tmp_path / "foreign"
    shutil.copytree(store, foreign)
    meta["tokenizer"]["fingerprint"] = tokenizer_fingerprint(HFTokenizer(small))
    (foreign / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UlmfitError, match=f"ids up to {meta['max_id']}"):
        TokenStore(foreign).check_tokenizer(HFTokenizer(small))

    # damaged ids: the checksum says so, and training stops at the first such document with one line
    ids = np.memmap(store / "ids.bin", np.uint16, "r+")
    ids[3] = 5000
    ids.flush()
    del ids
    capsys.readouterr()
    assert main(["tokenize", "--verify", str(store)]) == 2
    _one_line(capsys, "ids.bin does not match its checksum")
    args = ["train-clf", "--model", str(tiny_models["bert"]), "--data", str(store), "--out", str(tmp_path / "c")]
    assert main([*args, *SHORT]) == 2
    _one_line(capsys, "document 0 has the token id 5000", "--verify")
    assert not (tmp_path / "c").exists()


def test_a_killed_tokenize_leaves_a_temporary_folder_that_the_next_run_removes(tiny_models, csv, tmp_path, capsys):
    out = tmp_path / "store"
    code = (
        "import sys, time\n"
        "from ulmfit_tx.cli import main\n"
        "import ulmfit_tx.tokenize as t\n"
        "t.HFTokenizer.token_ids = lambda *a, **k: time.sleep(600)\n"  # (stuck while tokenizing)
        f"main(['tokenize', '--model', {str(tiny_models['bert'])!r}, '--data', {str(csv)!r}, '--out', {str(out)!r}])\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    t0 = time.time()
    while not list(tmp_path.glob(".store.tmp-*")) and time.time() - t0 < 120:
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    left = list(tmp_path.glob(".store.tmp-*"))
    assert len(left) == 1 and not out.exists()
    assert main(["tokenize", "--model", str(tiny_models["bert"]), "--data", str(csv), "--out", str(out)]) == 0
    assert "removed 1 temporary file(s) left by an interrupted run" in capsys.readouterr().err
    assert not left[0].exists() and TokenStore(out).verify()["documents"] == 50

    # kept: a live process's temporary file, and another host's (its process cannot be looked up from here)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = tmp_path / f".x.csv.tmp-{socket.gethostname()}-{sleeper.pid}-abc123"
    elsewhere = tmp_path / f".x.csv.tmp-another-host-{p.pid}-abc123"
    for f in (live, elsewhere):
        f.write_text("")
    with atomic_file(tmp_path / "x.csv") as mine:
        assert mine.exists() and live.exists() and elsewhere.exists()
    sleeper.kill()
    sleeper.wait()
    assert remove_stale(tmp_path, "x.csv", say=False) == [live] and elsewhere.exists()


def test_a_bundle_whose_weights_or_graph_were_swapped_is_refused(bundle, tmp_path, capsys):
    swapped = tmp_path / "swapped"
    shutil.copytree(bundle, swapped)
    assert main(["export-onnx", "--model", str(swapped)]) == 0
    ok_graph = (swapped / "model.onnx").read_bytes()
    w = load_file(swapped / "model.safetensors")
    name = next(k for k in w if w[k].dtype == torch.float32)
    w[name] = w[name] + 0.01  # the same names and shapes: another model's weights
    save_file(w, swapped / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UlmfitError, match="model.safetensors holds other weights"):
        load_classifier(swapped)
    capsys.readouterr()
    assert main(["predict", "--model", str(swapped), "--text", "a fine film"]) == 2
    _one_line(capsys, "holds other weights than those ulmfit_tx.json was written with")

    shutil.copy(bundle / "model.safetensors", swapped / "model.safetensors")
    graph = bytearray(ok_graph)
    graph[-10] ^= 1
    (swapped / "model.onnx").write_bytes(bytes(graph))
    assert main(["predict", "--model", str(swapped), "--text", "a fine film", "--backend", "onnx"]) == 2
    _one_line(capsys, "model.onnx: not an ONNX graph exported from this folder's model")
    (swapped / "model.onnx").write_bytes(ok_graph)
    assert main(["predict", "--model", str(swapped), "--text", "a fine film", "--backend", "onnx"]) == 0
