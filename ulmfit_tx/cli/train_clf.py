"`ulmfit-tx train-clf`: a classifier on top of an encoder, with ULMFiT's gradual unfreezing by default."

from ._options import (
    add_checkpoint,
    add_classifier_data,
    add_data,
    add_model,
    add_output,
    add_self_training,
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
    add_self_training(p)


def run(a) -> dict:
    from fastai.torch_core import num_distrib

    from ..errors import UlmfitError
    from ..io import read_corpus
    from ..learner import classifier_learner
    from ..plots import ConfusionCounts
    from ..schedule import LAYER_DIV, Stage, ulmfit_stages

    if a.self_train_rounds and not a.unlabelled:
        raise UlmfitError("--self-train-rounds needs --unlabelled (the texts to pseudo-label)")
    if not 0 < a.self_train_threshold < 1:
        raise UlmfitError(f"--self-train-threshold must be between 0 and 1, not {a.self_train_threshold}")
    run = start_run(a)
    unlabelled = read_corpus(a.unlabelled, text_col=a.text_col) if a.unlabelled else None
    dls = classifier_data(a)
    cbs = [run.history, ConfusionCounts(), run.checkpoint]
    learn = classifier_learner(dls, a.model, head=a.head, precision=a.precision, cbs=cbs)
    lr = a.lr or DEFAULT_LR[a.schedule]
    div = (LAYER_DIV if a.div is None else a.div) if a.schedule == "ulmfit" else None  # ulmfit_lrs checks it
    stages = ulmfit_stages(lr, (1, 1, 1, a.epochs), div=div) if a.schedule == "ulmfit" else [Stage(None, a.epochs, lr)]
    epochs = [st.epochs for st in stages]
    valid_loss, acc = run.fit(learn, stages)
    rounds = []
    if unlabelled is not None:
        run.checkpoint.save_deferred()  # a resumed run self-trains again from the fitted weights
        with learn.removed_cbs(run.checkpoint):
            rounds = self_train_rounds(learn, unlabelled, a, stages[-1])
            valid_loss, acc = rounds[-1]["valid_loss"], rounds[-1]["accuracy"]
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
        chunks=a.chunks,
        bs=a.bs,
        n_train=len(dls.train_ds),
        n_valid=len(dls.valid_ds),
        labels=[str(v) for v in dls.vocab],
        processes=max(1, num_distrib()),
        self_training=rounds,
        **run.stats(learn, sum(epochs) * len(dls.train_ds)),
    )
    run.save_classifier(learn, metrics, hf=a.head == "native")
    run.say(
        f"classifier: validation accuracy {acc:.4f} ({len(dls.valid_ds)} rows), "
        f"{sum(epochs)} passes in {metrics['train_time_s']:.0f}s -> {a.out}"
    )
    return metrics


def self_train_rounds(learn, texts: list[str], a, last) -> list[dict]:
    "`self_train` after the fit, at the rate and discriminative factor of its `last` stage."
    from ..schedule import LAYER_DIV
    from ..selftrain import self_train

    return self_train(
        learn,
        texts,
        rounds=a.self_train_rounds or 1,
        threshold=a.self_train_threshold,
        per_class=a.self_train_per_class,
        epochs=a.self_train_epochs,
        lr=last.lr,
        div=LAYER_DIV if last.div is None else last.div,
    )
