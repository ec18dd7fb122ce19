"`ulmfit-tx train-clf`: a classifier on top of an encoder, with ULMFiT's gradual unfreezing by default."

from ._options import (
    add_checkpoint,
    add_classifier_data,
    add_data,
    add_labels,
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
    add_labels(p)
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
    g = p.add_argument_group("loss, monitoring and decisions")
    g.add_argument(
        "--class-weights",
        help="'balanced' (scikit-learn's compute_class_weight; multi_label: negatives/positives per class), or a "
        "JSON or CSV file of class, weight",
    )
    g.add_argument(
        "--metric",
        default="valid_loss",
        help="the validation value --keep best watches: valid_loss, or a metric of the task (single_label: "
        "accuracy, f1_macro; multi_label: accuracy_multi, f1_micro, f1_macro; regression: rmse, mae, pearson, "
        "spearman)",
    )
    g.add_argument(
        "--keep",
        default="last",
        choices=["last", "best"],
        help="the weights of the final stage's last epoch, or of its best by --metric",
    )
    g.add_argument(
        "--threshold",
        type=float,
        help="multi_label: probability at which a class is predicted (default: the best micro F1 on validation)",
    )
    add_self_training(p)


def run(a) -> dict:
    import numpy as np
    from fastai.torch_core import num_distrib

    from ..checkpoint import KeepBest
    from ..errors import UlmfitError
    from ..io import read_corpus
    from ..learner import classifier_learner
    from ..schedule import LAYER_DIV, Stage, ulmfit_stages
    from ..tasks import LOWER_IS_BETTER, MULTI, SINGLE, ValidationOutputs

    if a.self_train_rounds and not a.unlabelled:
        raise UlmfitError("--self-train-rounds needs --unlabelled (the texts to pseudo-label)")
    if not 0 < a.self_train_threshold < 1:
        raise UlmfitError(f"--self-train-threshold must be between 0 and 1, not {a.self_train_threshold}")
    if a.unlabelled and not isinstance(a.text_col, str):
        raise UlmfitError("self-training (--unlabelled) pseudo-labels single texts, not pairs of texts")
    if a.threshold is not None and not 0 < a.threshold < 1:
        raise UlmfitError(f"--threshold must be between 0 and 1, not {a.threshold}")
    run = start_run(a)
    unlabelled = read_corpus(a.unlabelled, text_col=a.text_col) if a.unlabelled else None
    dls = classifier_data(a)
    learn = classifier_learner(
        dls,
        a.model,
        head=a.head,
        precision=a.precision,
        cbs=[*run.cbs, outputs := ValidationOutputs()],
        class_weights=a.class_weights,
        threshold=a.threshold or 0.5,
    )
    task = learn.task
    learn.metrics = task.metrics()  # (single-label: f1_macro too, shown and monitorable)
    names = ["valid_loss", *(m.name for m in learn.metrics)]
    if a.metric not in names:
        raise UlmfitError(f"--metric {a.metric!r} is not one of a {task.kind} task's: {', '.join(names)}")
    if a.threshold is not None and task.kind != MULTI:
        raise UlmfitError(f"--threshold is the decision threshold of a multi_label task, not of {task.kind}")
    if unlabelled is not None and task.kind != SINGLE:
        raise UlmfitError(f"self-training (--unlabelled) is for single_label tasks, not {task.kind}")
    keep = KeepBest(a.metric, np.less if a.metric in LOWER_IS_BETTER else np.greater) if a.keep == "best" else None
    lr = a.lr or DEFAULT_LR[a.schedule]
    div = (LAYER_DIV if a.div is None else a.div) if a.schedule == "ulmfit" else None  # ulmfit_lrs checks it
    stages = ulmfit_stages(lr, (1, 1, 1, a.epochs), div=div) if a.schedule == "ulmfit" else [Stage(None, a.epochs, lr)]
    epochs = [st.epochs for st in stages]
    values = dict(zip(names, map(float, run.fit(learn, stages, keep))))
    rounds = []
    if unlabelled is not None:
        run.checkpoint.save_deferred()  # a resumed run self-trains again from the fitted weights
        with learn.removed_cbs(run.checkpoint):
            rounds = self_train_rounds(learn, unlabelled, a, stages[-1])
            values = {k: rounds[-1][k] for k in names}
    fresh = not (keep is not None and keep.restored and not rounds)  # else the outputs are of a later epoch
    with learn.removed_cbs(run.cbs):  # (a prediction pass only if keep-best went back to an earlier epoch)
        report = learn.validation_report(
            tune_threshold=task.kind == MULTI and a.threshold is None,
            outputs=(outputs.outputs, outputs.targets) if fresh else None,
        )
    if task.kind == MULTI:  # the epochs' values are at 0.5; the model decides at its threshold
        values |= {k: report[k] for k in ("accuracy_multi", "f1_micro", "f1_macro")}
    metrics = dict(
        **values,
        task=task.kind,
        data=str(a.data),
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
        labels=[str(v) for v in task.classes],
        **({"threshold": learn.threshold} if task.kind == MULTI else {}),
        keep=a.keep,
        best_epoch=None if keep is None else keep.best_epoch,
        processes=max(1, num_distrib()),
        self_training=rounds,
        report=report,
        **run.stats(learn, sum(epochs) * len(dls.train_ds)),
    )
    run.save_classifier(learn, metrics, hf=a.head == "native")
    shown = {k: v for k, v in values.items() if k != "valid_loss"}
    run.say(
        f"classifier{'' if task.kind == SINGLE else f' ({task.kind})'}: validation "
        + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
        + (f" at threshold {learn.threshold:.2f}" if task.kind == MULTI else "")
        + f" ({len(dls.valid_ds)} rows), {sum(epochs)} passes in {metrics['train_time_s']:.0f}s -> {a.out}"
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
