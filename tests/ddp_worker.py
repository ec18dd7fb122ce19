"""Run under `torchrun --nproc_per_node 2`: train a tiny learner with fastai's `distrib_ctx`, recording every batch
each rank steps on; rank 0 saves the final weights and the validation metrics. Read by tests/test_distributed.py."""

import json
import sys
from pathlib import Path

import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.torch_core import rank_distrib, set_seed

from ulmfit_tx import Stage, clas_dataloaders, classifier_learner, fit_stages, mlm_dataloaders, mlm_learner
from ulmfit_tx.distributed import init_distributed


class RecordBatches(Callback):
    "Keeps the training batches this rank steps on (inputs and targets, as the model reads them)."

    order = 100

    def before_fit(self):
        self.batches = getattr(self, "batches", [])

    def before_train(self):
        self.rows = [list(r) for r in self.dl.rows] if hasattr(self.dl, "rows") else None

    def before_batch(self):
        if self.training:
            self.batches.append(([x.clone() for x in self.xb], [y.clone() for y in self.yb]))


def main(task: str, model: str, data: str, out: str):
    init_distributed()
    set_seed(0, reproducible=True)
    df = pd.read_csv(data, keep_default_na=False)
    rec = RecordBatches()
    if task == "clf":
        dls = clas_dataloaders(df, model, max_len=48, bs=4, seed=0)
        learn = classifier_learner(dls, model, ps=[0.0], output_p=0.0, cbs=rec, precision="fp32")  # (compared to 1e-5)
        stages = [Stage(1, 1, 1e-3), Stage(None, 1, 5e-4, 1.2)]  # a frozen stage, then all layers
    elif task == "mlm":
        dls = mlm_dataloaders(df, model, max_len=32, bs=4, seed=0, mode="docs")
        learn = mlm_learner(dls, model, cbs=rec, precision="fp32")
        stages = [Stage(None, 1, 1e-3)]
    else:  # a memory encoder read in segments
        dls = mlm_dataloaders(df, model, max_len=32, bs=4, seed=0, mode="segments")
        learn = mlm_learner(dls, model, cbs=rec)
        stages = [Stage(None, 1, 1e-3)]
    with learn.no_bar(), learn.distrib_ctx():
        fit_stages(learn, stages)
        metrics = [float(v) for v in learn.validate()]
    r = rank_distrib()
    torch.save(rec.batches, Path(out) / f"batches_rank{r}.pt")
    (Path(out) / f"rank{r}.json").write_text(
        json.dumps(
            {"metrics": metrics, "n_valid": len(learn.dls.valid_ds), "rows": rec.rows, "steps": len(rec.batches)}
        )
    )
    if r == 0:
        torch.save(learn.model.state_dict(), Path(out) / "final.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
