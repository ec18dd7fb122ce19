"""The classifier's training loop, ours against the Trainer's, in one process, one batch of each in turn.

`speed.py` times each side in its own process; on a busy or noisy machine two processes a minute apart can differ by
a quarter. Here both loops share the process, the threads and every slow spell of the machine: our `fit_one_cycle`
runs, and after each of its batches a callback runs one step of the Trainer's loop (its `group_by_length` batches
from `get_train_dataloader` with `DataCollatorWithPadding`, `training_step` on the accelerate-prepared model,
gradient clipping at its default 1.0, its fused AdamW and linear schedule). Each side's step is timed from fetching
its batch to its zeroed gradients, over one epoch of `--texts` texts (all but the first `--warmup` steps: the
longest batches come first on both sides). Same MiniLM-L6 weights, texts (`speed.py`'s length sets), batch size and
learning rate; precision float32 or bf16 mixed precision on both sides.

    python bench/loop_ab.py                                # 32, 64, 128 tokens, float32 and bf16 (about 10 minutes)

Writes bench/results/loop_ab/<tag>.json and .md (tag: the device unless --tag).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import median

from _common import IMDB, WORK, device, length_data, minilm, out_dir, trainer_args, trainer_examples, write_results


def trainer_stepper(a, df, precision: str):
    "The Trainer's loop over `df`'s training rows, as `step() -> (seconds, padded slots, real tokens)`."
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        set_seed,
    )

    set_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(minilm())
    classes = sorted(df.label.unique())
    ds = trainer_examples(tok, df[~df.is_valid], classes, a.max_len)
    model = AutoModelForSequenceClassification.from_pretrained(minilm(), num_labels=len(classes))
    args = trainer_args(
        a, str(Path(a.work) / "loop_ab_trainer"), a.lr, precision == "bf16", train_sampling_strategy="group_by_length"
    )
    tr = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok))
    batches = iter(tr.get_train_dataloader())
    tr.create_optimizer_and_scheduler(num_training_steps=len(ds) // a.bs + 1)
    model, tr.optimizer = tr.accelerator.prepare(tr.model, tr.optimizer)  # as `Trainer.train` does: autocast in bf16
    model.train()
    tr.current_gradient_accumulation_steps = 1  # set by `Trainer.train` before each step

    def step():
        t0 = time.perf_counter()
        b = next(batches)
        tr.training_step(model, b)
        tr.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        tr.optimizer.step()
        tr.lr_scheduler.step()
        model.zero_grad()
        return time.perf_counter() - t0, b["input_ids"].numel(), int(b["attention_mask"].sum())

    return step


def measure(a, precision: str) -> dict:
    "Our `fit_one_cycle` with the Trainer's steps interleaved; per-step seconds, padded slots and real tokens of both."
    import pandas as pd
    from fastai.callback.core import Callback, CancelFitException

    from ulmfit_tx import clas_dataloaders, classifier_learner

    df = pd.read_csv(length_data(a, a.max_len) / "train.csv", keep_default_na=False)
    df = pd.concat([df[~df.is_valid][: a.texts], df[df.is_valid][: a.bs]])  # the fit is stopped before validating
    if (~df.is_valid).sum() < a.texts:
        raise SystemExit(f"the length set has fewer than {a.texts} texts: raise --tokens")
    theirs_step, ours, theirs = trainer_stepper(a, df, precision), [], []

    class Interleave(Callback):
        order = 100  # after every other callback's after_batch

        def before_fit(self):
            self.t = time.perf_counter()

        def after_batch(self):
            ids = self.xb[0]
            ours.append((time.perf_counter() - self.t, ids.numel(), int((ids != self.model.pad_id).sum())))
            theirs.append(theirs_step())
            if len(ours) == len(self.dls.train):
                raise CancelFitException()
            self.t = time.perf_counter()

    dls = clas_dataloaders(df, minilm(), max_len=a.max_len, bs=a.bs, cache=False)
    learn = classifier_learner(dls, minilm(), precision=precision, cbs=Interleave())
    learn.unfreeze()
    learn.fit_one_cycle(1, a.lr)
    side = lambda rows: {
        "step_ms": 1000 * median(r[0] for r in rows),
        "total_s": sum(r[0] for r in rows),
        "real_token_share": sum(r[2] for r in rows) / sum(r[1] for r in rows),
    }
    o, t = side(ours[a.warmup :]), side(theirs[a.warmup :])
    return {
        "max_len": a.max_len,
        "precision": precision,
        "steps": len(ours) - a.warmup,
        "ours": o,
        "trainer": t,
        "ratio": t["total_s"] / o["total_s"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="32,64,128", help="max_len values, comma-separated")
    ap.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (both sides alike)")
    ap.add_argument(
        "--texts", type=int, default=1536, help="training texts: one epoch, `texts / bs` steps of each side"
    )
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps of each side")
    ap.add_argument(
        "--tokens", type=int, default=196608, help="as speed.py: texts come from its set of `tokens / max_len`"
    )
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=str(IMDB))
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--out", default=out_dir("loop_ab"), help="folder for the results files")
    ap.add_argument("--tag", help="name of the result files (default: the device, cpu or cuda)")
    a = ap.parse_args()
    rows = []
    for L in map(int, a.lengths.split(",")):
        for p in a.precisions.split(","):
            r = measure(argparse.Namespace(**{**vars(a), "max_len": L}), p)
            rows.append(r)
            print(
                f"max_len {L:4d} {p}: ours {r['ours']['step_ms']:7.1f} ms/step, Trainer {r['trainer']['step_ms']:7.1f}"
                f" ms/step, ratio {r['ratio']:.2f}",
                flush=True,
            )
    md = [
        "| max_len | precision | ours ms/step (median) | Trainer ms/step (median) | speed ratio (total time) "
        "| real tokens per padded slot: ours / Trainer |",
        "|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['max_len']} | {r['precision']} | {r['ours']['step_ms']:.1f} | {r['trainer']['step_ms']:.1f} | "
        f"**{r['ratio']:.2f}×** | {r['ours']['real_token_share']:.1%} / {r['trainer']['real_token_share']:.1%} |"
        for r in rows
    ]
    write_results(a, rows, "\n".join(md), a.tag or device())
    print("\n".join(md))


if __name__ == "__main__":
    main()
