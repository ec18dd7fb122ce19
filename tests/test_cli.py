import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from tests.conftest import reviews_csv
from ulmfit_tx.cli import main
from ulmfit_tx.io import iter_chunks
from ulmfit_tx.precision import default_precision


@pytest.fixture(scope="module")
def csv(tmp_path_factory, sample_df):
    "40 training and 10 validation reviews as CSV, and the same as gzipped CSV and parquet."
    d = tmp_path_factory.mktemp("data")
    df = pd.read_csv(reviews_csv(d, sample_df, 40, 10), keep_default_na=False)
    df.to_csv(d / "train.csv", index=False)
    df.to_csv(d / "train.csv.gz", index=False)
    df.to_parquet(d / "train.parquet")
    return d / "train.csv"


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tiny_models, csv):
    out = tmp_path_factory.mktemp("runs") / "lm"
    assert (
        main(
            [
                "finetune-lm",
                "--model",
                str(tiny_models["bert"]),
                "--data",
                str(csv),
                "--out",
                str(out),
                "--max-len",
                "32",
                "--bs",
                "8",
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def clf_dir(lm_dir, csv):
    out = lm_dir.parent / "clf"
    assert (
        main(
            [
                "train-clf",
                "--model",
                str(lm_dir),
                "--data",
                str(csv),
                "--out",
                str(out),
                "--max-len",
                "32",
                "--bs",
                "8",
                "--epochs",
                "1",
                "--div",
                "1.5",
            ]
        )
        == 0
    )
    return out


def test_finetune_lm_head_warmup(tiny_models, csv, tmp_path):
    out = tmp_path / "lm"
    assert (
        main(
            [
                "finetune-lm",
                "--model",
                str(tiny_models["bert"]),
                "--data",
                str(csv),
                "--out",
                str(out),
                "--max-len",
                "32",
                "--bs",
                "8",
                "--epochs",
                "1",
                "--warmup-epochs",
                "1",
                "--lr",
                "1e-4",
                "--div",
                "2.6",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert (m["warmup_epochs"], m["warmup_lr"], m["epochs"], m["div"]) == (1, 1e-3, 1, 2.6) and len(
        m["per_epoch"]
    ) == 2
    assert m["precision"] == default_precision("cpu")  # --precision auto, resolved


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on a CPU-only machine")
def test_train_clf_precision_is_recorded_and_fp16_refused_on_cpu(tiny_models, csv, tmp_path, capsys):
    args = [
        "train-clf",
        "--model",
        str(tiny_models["bert"]),
        "--data",
        str(csv),
        "--max-len",
        "32",
        "--bs",
        "8",
        "--epochs",
        "1",
        "--schedule",
        "one-cycle",
    ]
    assert main([*args, "--out", str(tmp_path / "a"), "--precision", "fp32"]) == 0
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["precision"] == "fp32"
    assert main([*args, "--out", str(tmp_path / "b"), "--precision", "fp16"]) == 2
    assert "precision fp16 needs a CUDA GPU, not cpu: use bf16 or fp32" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_finetune_lm_writes_a_hugging_face_folder_and_metrics(lm_dir):
    for f in ["config.json", "model.safetensors", "tokenizer.json", "metrics.json", "loss.png"]:
        assert (lm_dir / f).exists(), f
    m = json.loads((lm_dir / "metrics.json").read_text())
    assert m["perplexity"] > 1 and 0 <= m["masked_accuracy"] <= 1 and m["mlm_loss"] > 0


def test_finetune_lm_reads_a_text_corpus_by_article_with_its_own_held_out_file(tiny_models, sample_df, tmp_path):
    "Continued pretraining on a WikiText-style .txt.gz corpus: ' = Title = ' articles, `<unk>`, a --valid file."
    import gzip

    texts = [" ".join(t.split()) for t in sample_df.text]  # one line each
    article = lambda i: f" = Title {i} = \n\n {texts[i]} an <unk> word \n {texts[i + 20]} \n"
    with gzip.open(tmp_path / "train.txt.gz", "wt") as f:
        f.write("".join(article(i) for i in range(12)))
    (tmp_path / "valid.txt").write_text("".join(article(i) for i in range(12, 15)))
    assert next(iter_chunks(tmp_path / "valid.txt", docs="articles", unk="[UNK]")).text.tolist() == [
        f"= Title {i} = {texts[i]} an [UNK] word {texts[i + 20]}" for i in range(12, 15)
    ]
    out = tmp_path / "lm"
    assert (
        main(
            [
                "finetune-lm",
                "--model",
                str(tiny_models["bert"]),
                "--data",
                str(tmp_path / "train.txt.gz"),
                "--docs",
                "articles",
                "--valid",
                str(tmp_path / "valid.txt"),
                "--mode",
                "docs",
                "--out",
                str(out),
                "--max-len",
                "32",
                "--bs",
                "4",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n_train_items"], m["n_valid_items"]) == (12, 3), "one item per article, all 12 trained on"


def test_train_clf_ulmfit_writes_export_metrics_and_plots(clf_dir):
    for f in ["export.pkl", "metrics.json", "loss.png", "confusion_matrix.png"]:
        assert (clf_dir / f).exists(), f
    m = json.loads((clf_dir / "metrics.json").read_text())
    assert m["schedule"] == "ulmfit" and m["passes"] == 4 and m["epochs_per_stage"] == [1, 1, 1, 1] and m["div"] == 1.5
    assert 0 <= m["accuracy"] <= 1 and m["n_valid"] == 10 and m["train_time_s"] > 0 and m["valid_time_s"] > 0
    assert not [p for p in clf_dir.parent.iterdir() if ".tmp-" in p.name]


def test_train_clf_passes_over_the_validation_rows_once(tiny_models, csv, tmp_path, monkeypatch):
    "Metrics and the confusion matrix come from the fit's own validation: no second pass after training."
    from fastai.learner import Learner

    passes, validate = [], Learner._do_epoch_validate
    monkeypatch.setattr(
        Learner, "_do_epoch_validate", lambda self, *a, **k: passes.append(1) or validate(self, *a, **k)
    )
    out = tmp_path / "clf"
    assert (
        main(
            [
                "train-clf",
                "--model",
                str(tiny_models["bert"]),
                "--data",
                str(csv),
                "--out",
                str(out),
                "--max-len",
                "32",
                "--bs",
                "8",
                "--schedule",
                "one-cycle",
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    assert len(passes) == 1
    m = json.loads((out / "metrics.json").read_text())
    assert (
        m["train_time_s"] > 0
        and m["valid_time_s"] > 0
        and m["train_samples_per_s"] == pytest.approx(40 / m["train_time_s"])
    )


@pytest.mark.parametrize("ext", ["csv.gz", "parquet"])
def test_train_clf_one_cycle_native_head_on_other_formats(tiny_models, csv, tmp_path, ext):
    out = tmp_path / "clf"
    assert (
        main(
            [
                "train-clf",
                "--model",
                str(tiny_models["distilbert"]),
                "--data",
                str(csv.with_suffix("." + ext)),
                "--out",
                str(out),
                "--max-len",
                "32",
                "--bs",
                "8",
                "--epochs",
                "2",
                "--schedule",
                "one-cycle",
                "--head",
                "native",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["schedule"] == "one-cycle" and m["passes"] == 2
    assert (out / "hf" / "config.json").exists()


def test_train_clf_reads_an_imdb_style_folder(tiny_models, tmp_path, sample_df):
    for i, row in sample_df.head(24).iterrows():
        split = "test" if i % 4 == 0 else "train"
        (tmp_path / "imdb" / split / row.label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "imdb" / split / row.label / f"{i}_1.txt").write_text(row.text)
    out = tmp_path / "clf"
    assert (
        main(
            [
                "train-clf",
                "--model",
                str(tiny_models["albert"]),
                "--data",
                str(tmp_path / "imdb"),
                "--out",
                str(out),
                "--max-len",
                "32",
                "--bs",
                "4",
                "--schedule",
                "one-cycle",
            ]
        )
        == 0
    )
    assert json.loads((out / "metrics.json").read_text())["n_valid"] == 6


def test_predict_text_and_file(clf_dir, csv, tmp_path, capsys):
    assert main(["predict", "--model", str(clf_dir), "--text", "a wonderful film"]) == 0
    out = capsys.readouterr().out
    assert "prob_neg" in out and "prob_pos" in out
    assert main(["predict", "--model", str(clf_dir), "--data", str(csv), "--out", str(tmp_path / "p.csv")]) == 0
    res = pd.read_csv(tmp_path / "p.csv")
    assert len(res) == 50 and set(res.label) <= {"neg", "pos"}
    assert ((res.prob_neg + res.prob_pos - 1).abs() < 1e-5).all()


def test_fill_mask_and_lr_find(lm_dir, csv, tmp_path, capsys):
    assert main(["fill-mask", "--model", str(lm_dir), "the movie was [MASK] and [MASK]", "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [l.split(":")[0] for l in lines[-2:]] == ["mask 1", "mask 2"]
    for task in ["clf", "mlm"]:
        out = tmp_path / task
        assert (
            main(
                [
                    "lr-find",
                    "--model",
                    str(lm_dir),
                    "--data",
                    str(csv),
                    "--out",
                    str(out),
                    "--learner",
                    task,
                    "--max-len",
                    "32",
                    "--bs",
                    "4",
                ]
            )
            == 0
        )
        sugg = json.loads((out / "lr_find.json").read_text())
        assert (out / "lr_find.png").exists() and set(sugg) == {"valley", "steep", "minimum"}


def _parquet(tmp_path, name, columns):
    "A typed parquet file (a CSV has no types: `1` in a CSV is the text '1')."
    pd.DataFrame(columns).to_parquet(tmp_path / name)
    return tmp_path / name


def _bad(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    return p


@pytest.mark.parametrize(
    "make_data,message",
    [
        (lambda t, c: t / "missing.csv", "no such file"),
        (lambda t, c: _bad(t, "empty.csv", ""), "file is empty"),
        (lambda t, c: _bad(t, "header.csv", "text,label\n"), "header but no rows"),
        (lambda t, c: _bad(t, "bad.csv.gz", b"not gzip at all"), "cannot be read"),
        (lambda t, c: _bad(t, "data.xlsx", "x"), "unknown file type"),
        (lambda t, c: _bad(t, "notext.csv", "review,label\nok,pos\nbad,neg\n"), "missing column 'text'"),
        (lambda t, c: _bad(t, "nolabel.csv", "text,y\nok,pos\nbad,neg\n"), "missing column 'label'"),
        (lambda t, c: _bad(t, "blank.csv", "text,label\nok,pos\n  ,neg\nfine,neg\n"), "1 row.*empty"),
        (lambda t, c: _parquet(t, "numbers.parquet", {"text": [1, 2], "label": ["pos", "neg"]}), "2 row.*not text"),
        (lambda t, c: _bad(t, "one.csv", "text,label\nok,pos\nfine,pos\n"), "single class"),
        # pandas would make an extra leading field an index without a word: "dull" would be the text, "neg" lost
        (
            lambda t, c: _bad(t, "comma.csv", "text,label\nA dull, slow film,neg\nfine,pos\n"),
            "first row has more fields.*comma",
        ),
        (
            lambda t, c: _bad(t, "tab.tsv", "text\tlabel\nA dull\tslow film\tneg\nfine\tpos\n"),
            "first row has more fields.*tab",
        ),
    ],
)
def test_bad_data_gives_one_line_errors(tiny_models, tmp_path, capsys, make_data, message, csv):
    out = tmp_path / "out"
    rc = main(
        [
            "train-clf",
            "--model",
            str(tiny_models["bert"]),
            "--data",
            str(make_data(tmp_path, csv)),
            "--out",
            str(out),
            "--max-len",
            "32",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "error:" in err
    import re

    assert re.search(message, err), err
    assert not out.exists()


def test_bad_model_and_options(tiny_models, csv, tmp_path, capsys):
    def run(*args):
        rc = main(list(map(str, args)))
        return rc, capsys.readouterr().err

    rc, err = run("train-clf", "--model", tmp_path, "--data", csv, "--out", tmp_path / "o")
    assert rc == 2 and "not a Hugging Face model folder" in err
    rc, err = run(
        "train-clf", "--model", tiny_models["bert"], "--data", csv, "--out", tmp_path / "o", "--max-len", 600
    )
    assert rc == 2 and "max_len 600 is larger" in err
    rc, err = run(
        "train-clf", "--model", tiny_models["bert"], "--data", csv, "--out", tmp_path / "o", "--valid-col", "split"
    )
    assert rc == 2 and "missing column 'split'" in err
    rc, err = run("predict", "--model", tmp_path, "--text", "hi")
    assert rc == 2 and "not a ulmfit_tx bundle" in err
    rc, err = run("predict", "--model", tmp_path / "nope", "--text", "hi")
    assert rc == 2 and "no such model folder" in err
    rc, err = run("fill-mask", "--model", tiny_models["bert"], "no mask here")
    assert rc == 2 and "no mask" in err


def test_existing_output_is_refused_then_replaced_with_force_and_kept_on_failure(
    clf_dir, lm_dir, csv, capsys, monkeypatch
):
    before = (clf_dir / "export.pkl").read_bytes()
    args = [
        "train-clf",
        "--model",
        str(lm_dir),
        "--data",
        str(csv),
        "--out",
        str(clf_dir),
        "--max-len",
        "32",
        "--bs",
        "8",
        "--schedule",
        "one-cycle",
    ]
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    import ulmfit_tx.plots

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ulmfit_tx.plots, "plot_confusion_matrix", boom)
    with pytest.raises(RuntimeError):
        main(args + ["--force"])
    assert (clf_dir / "export.pkl").read_bytes() == before  # the old export is untouched
    assert not [p for p in clf_dir.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    ckpt = clf_dir.parent / "clf.checkpoint" / "checkpoint.pt"
    assert ckpt.exists(), "the trained weights were not checkpointed when writing the outputs failed"
    monkeypatch.undo()
    from fastai.learner import Learner

    trained = []
    monkeypatch.setattr(Learner, "_do_epoch_train", lambda self: trained.append(1))
    assert main(args + ["--force", "--resume"]) == 0 and not trained  # the outputs, without training again
    assert json.loads((clf_dir / "metrics.json").read_text())["schedule"] == "one-cycle" and not ckpt.exists()
    monkeypatch.undo()
    assert main(args + ["--force"]) == 0 and not ckpt.parent.exists()  # a run that finishes writes no checkpoint


def test_cli_exit_code_and_no_traceback_in_a_real_process(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "ulmfit_tx.cli",
            "train-clf",
            "--model",
            "m",
            "--data",
            str(tmp_path / "nope.csv"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr and "no such file" in res.stderr


def test_the_program_flushes_its_output_and_runs_exit_handlers_before_its_fast_exit(clf_dir, tmp_path):
    "`run` skips the interpreter's teardown: piped output (block-buffered) and exit handlers must still happen."
    hook = tmp_path / "sitecustomize.py"  # an exit handler registered in the process, as a library would
    hook.write_text(f"import atexit\natexit.register(lambda: open({str(tmp_path / 'ran')!r}, 'w').close())\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "ulmfit_tx.cli",
            "predict",
            "--model",
            str(clf_dir),
            "--text",
            "a wonderful film",
            "--text",
            "a dull film",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("prob_pos") == 1 and len(res.stdout.strip().splitlines()) == 3, res.stdout
    assert (tmp_path / "ran").exists()


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(clf_dir):
    "`ulmfit-tx predict ... | head -1`: no BrokenPipeError traceback, the shell's code for SIGPIPE."
    texts = [a for _ in range(3000) for a in ("--text", "a wonderful film")]  # ~100 KB: more than the pipe's 64 KB
    proc = subprocess.Popen(
        [sys.executable, "-m", "ulmfit_tx.cli", "predict", "--model", str(clf_dir), *texts],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert "prob_pos" in proc.stdout.readline()
    proc.stdout.close()  # the reader goes away
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err


def test_finetune_lm_mlm_says_when_the_checkpoint_has_no_mlm_head(tiny_models, lm_dir, csv, tmp_path, capsys):
    "Asked for the MLM objective (auto would pick the contrastive one for such a checkpoint: test_adapt.py)."
    from transformers import AutoModel, AutoTokenizer

    enc = tmp_path / "encoder_only"  # an encoder saved without its MLM head, as sentence-embedding models are
    AutoModel.from_pretrained(tiny_models["bert"]).save_pretrained(enc)
    AutoTokenizer.from_pretrained(tiny_models["bert"]).save_pretrained(enc)
    capsys.readouterr()
    assert (
        main(
            [
                "finetune-lm",
                "--objective",
                "mlm",
                "--model",
                str(enc),
                "--data",
                str(csv),
                "--out",
                str(tmp_path / "lm"),
                "--max-len",
                "32",
                "--bs",
                "8",
                "--epochs",
                "1",
                "--warmup-epochs",
                "0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"note: {enc} has no masked-LM head" in out and "Is stage 2 worth it?" in out
    assert json.loads((tmp_path / "lm" / "metrics.json").read_text())["new_head"] is True
    assert json.loads((lm_dir / "metrics.json").read_text())["new_head"] is False  # a full MLM checkpoint: no note
