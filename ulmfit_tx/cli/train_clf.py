"`ulmfit-tx train-clf`: a classifier on top of an encoder, with ULMFiT's gradual unfreezing by default."

from ._options import (
    add_checkpoint,
    add_classifier_data,
    add_data,
    add_model,
    add_output,
    add_training,
    classifier_data,
    start_run,
)

HELP = "train a classifier on top of an encoder (ULMFiT schedule by default)"
DEFAULT_LR = {"ulmfit": 2e-3, "one-cycle": 1e-4}


def add_arguments(p):
    add_model(p)
    add_data(p, labels=True)
    add_output(p)
    add_checkpoint(p)
    add_training(
        p,
        lr_help="ulmfit: head learning rate of stage 1 (default 2e-3); one-cycle: 1e-4",
        epochs_help="one-cycle: epochs of the single fit; ulmfit: epochs of the last (all layers) stage",
    )
    add_classifier_data(p)
    p.add_argument("--schedule", default="ulmfit", choices=["ulmfit", "one-cycle"])
    p.add_argument(
        "--div",
        type=float,
        help="ulmfit: factor between the learning rates of consecutive layer groups "
        "(default 1.2, the library's LAYER_DIV; ULMFiT's AWD-LSTM used 2.6)",
    )
    p.add_argument(
        "--head",
        default="pooling",
        choices=["pooling", "native"],
        help="ULMFiT concat-pooling head, or the architecture's own (also saved as a HF folder)",
    )


def run(a) -> dict:
    from fastai.torch_core import num_distrib

    from ..learner import classifier_learner
    from ..plots import ConfusionCounts
    from ..schedule import LAYER_DIV, Stage, ulmfit_stages

    run = start_run(a)
    dls = classifier_data(a)
    cbs = [run.history, ConfusionCounts(), run.checkpoint]
    learn = classifier_learner(dls, a.model, head=a.head, precision=a.precision, cbs=cbs)
    lr = a.lr or DEFAULT_LR[a.schedule]
    div = (LAYER_DIV if a.div is None else a.div) if a.schedule == "ulmfit" else None  # ulmfit_lrs checks it
    stages = ulmfit_stages(lr, (1, 1, 1, a.epochs), div=div) if a.schedule == "ulmfit" else [Stage(None, a.epochs, lr)]
    epochs = [st.epochs for st in stages]
    valid_loss, acc = run.fit(learn, stages)
    metrics = dict(
        accuracy=acc,
        valid_loss=valid_loss,
        schedule=a.schedule,
        epochs_per_stage=list(epochs),
        passes=sum(epochs),
        lr=lr,
        div=div,
        head=a.head,
        max_len=a.max_len,
        bs=a.bs,
        n_train=len(dls.train_ds),
        n_valid=len(dls.valid_ds),
        labels=[str(v) for v in dls.vocab],
        processes=max(1, num_distrib()),
        **run.stats(learn, sum(epochs) * len(dls.train_ds)),
    )
    run.save_classifier(learn, metrics, hf=a.head == "native")
    run.say(
        f"classifier: validation accuracy {acc:.4f} ({len(dls.valid_ds)} rows), "
        f"{sum(epochs)} passes in {metrics['train_time_s']:.0f}s -> {a.out}"
    )
    return metrics
