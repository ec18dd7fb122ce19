"""Two processes (torchrun, gloo, one thread each, dropout 0) against one: the same parameters after stepping on the
same batches, the same validation metrics, one complete output folder from the CLI, memory encoders per rank."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from fastai.learner import load_learner
from fastai.torch_core import set_seed
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

from tests.conftest import reviews_csv
from ulmfit_tx import Stage, clas_dataloaders, classifier_learner, mlm_dataloaders, mlm_learner

WORKER = Path(__file__).parent / "ddp_worker.py"
pytestmark = pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun not installed",
)


def torchrun(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--standalone", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def no_dropout(tmp_path_factory, tiny_models, own_models):
    "The tiny BERT and memxl folders with every dropout at 0 (the ranks' dropout masks cannot be replayed)."
    out = {}
    for name, src in (("bert", tiny_models["bert"]), ("memxl", own_models["memxl"])):
        config = AutoConfig.from_pretrained(src)
        config.update({k: 0.0 for k in config.to_dict() if "dropout" in k and isinstance(getattr(config, k), float)})
        d = tmp_path_factory.mktemp(f"nodrop_{name}")
        AutoModelForMaskedLM.from_pretrained(src, config=config).save_pretrained(d)
        AutoTokenizer.from_pretrained(src).save_pretrained(d)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory, sample_df):
    "36 training and 10 validation reviews: 9 batches of 4, so the ranks get 5 and 4 (padded to 5 each)."
    return reviews_csv(tmp_path_factory.mktemp("dist_data"), sample_df, 36, 10)


class PerRank(torch.nn.Module):
    "The replayed step: each rank's part of the batch through the model on its own (as each process did)."

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, parts):
        return [self.model(*x) for x in parts]


def _replay(learn, stages, batches):
    """One process stepping on the union of the ranks' batches: the loss is the mean of the ranks' losses, which is
    what DistributedDataParallel averages the gradients of."""
    steps = list(zip(*batches))  # step -> (rank 0's batch, rank 1's batch)
    loss_func, model = learn.loss_func, learn.model

    class Replay:
        def __init__(self, part):
            self.part = part

        def __len__(self):
            return len(self.part)

        def __iter__(self):
            return iter(([x for x, _ in s], [y for _, y in s]) for s in self.part)

    learn.loss_func = lambda preds, ys: sum(loss_func(p, *y) for p, y in zip(preds, ys)) / len(preds)
    train, valid = learn.dls.train, learn.dls.valid
    learn.dls.valid = Replay([])  # only the steps are replayed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: sums over another thread count round differently, and Adam makes
    done = 0  # full-size steps of near-zero gradients (the last LayerNorm bias), noise included
    for st in stages:
        learn.model = model
        learn.unfreeze() if st.depth is None else learn.freeze_to(-st.depth)
        learn.model = PerRank(model)
        n = len(train) // 2 + len(train) % 2  # steps per epoch on each rank
        learn.dls.train = Replay(steps[done : done + n * st.epochs])
        lr = st.lr if st.div is None else __import__("ulmfit_tx").ulmfit_lrs(learn, st.lr, st.div)
        with learn.no_bar(), learn.no_logging(), learn.removed_cbs(learn.recorder):
            learn.fit_one_cycle(st.epochs, lr)
        done += n * st.epochs
    learn.model, learn.loss_func, learn.dls.train, learn.dls.valid = model, loss_func, train, valid
    torch.set_num_threads(threads)
    assert done == len(steps)


@pytest.mark.parametrize("task", ["clf", "mlm"])
def test_two_processes_step_as_one_process_on_the_union_and_validate_over_all_rows(no_dropout, data, tmp_path, task):
    torchrun(WORKER, task, no_dropout["bert"], data, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0  # the ranks stepped together
    batches = [torch.load(tmp_path / f"batches_rank{r}.pt") for r in (0, 1)]
    set_seed(0, reproducible=True)
    df = pd.read_csv(data, keep_default_na=False)
    if task == "clf":
        learn = classifier_learner(
            clas_dataloaders(df, no_dropout["bert"], max_len=48, bs=4, seed=0),
            no_dropout["bert"],
            ps=[0.0],
            output_p=0.0,
            precision="fp32",
        )  # float32 as the worker: bf16 products
        # round differently on 4 rows than on 8
        stages = [Stage(1, 1, 1e-3), Stage(None, 1, 5e-4, 1.2)]
        sizes = [len(x[0]) for x, _ in batches[0] + batches[1]]
        assert set(sizes) == {4}  # whole batches, none split between ranks
    else:
        learn = mlm_learner(
            mlm_dataloaders(df, no_dropout["bert"], max_len=32, bs=4, seed=0, mode="docs"),
            no_dropout["bert"],
            precision="fp32",
        )
        stages = [Stage(None, 1, 1e-3)]
    _replay(learn, stages, batches)
    final = torch.load(tmp_path / "final.pt")
    got = dict(learn.model.named_parameters())  # parameters (buffers: BatchNorm counts differ)
    worst = max((final[k].float() - got[k].float()).abs().max().item() for k in got)
    assert worst < 1e-5, f"parameters differ by {worst}"
    learn.model.load_state_dict(final)
    single = [float(v) for v in learn.validate()]
    for r in ranks:
        assert r["metrics"] == pytest.approx(single, abs=1e-5)  # every rank: metrics over all rows


def test_memory_encoder_keeps_each_document_on_one_rank(no_dropout, data, tmp_path):
    torchrun(WORKER, "memxl", no_dropout["memxl"], data, tmp_path)
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text())["rows"] for r in (0, 1)]
    docs = [{d for row in r for d in row} for r in rows]
    assert docs[0] and docs[1] and not docs[0] & docs[1]  # no document read by both ranks
    assert len(docs[0] | docs[1]) == 46 - 4  # every training text (10% of the 46 held out)


def test_train_clf_under_torchrun_writes_one_complete_output_folder(tiny_models, data, tmp_path):
    out = tmp_path / "clf"
    res = torchrun(
        "-m",
        "ulmfit_tx.cli",
        "train-clf",
        "--model",
        tiny_models["bert"],
        "--data",
        data,
        "--out",
        out,
        "--max-len",
        "32",
        "--bs",
        "4",
        "--cache",
        tmp_path / "cache",
    )
    assert res.stdout.count("classifier: validation accuracy") == 1  # printed by rank 0 only
    m = json.loads((out / "metrics.json").read_text())
    assert m["processes"] == 2 and m["n_valid"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "clf"]  # no temporary or checkpoint folders left
    assert load_learner(out / "export.pkl").predict("A fine film.")[0] in ("neg", "pos")
