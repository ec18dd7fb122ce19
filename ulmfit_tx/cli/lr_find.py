"`ulmfit-tx lr-find`: fastai's learning-rate finder on a classifier or MLM learner, with its plot."

from ._options import (
    add_classifier_data,
    add_data,
    add_labels,
    add_model,
    add_output,
    add_training,
    check_args,
    classifier_data,
)

HELP = "fastai's learning-rate finder: suggestions and a PNG plot"


def add_arguments(p):
    add_model(p)
    add_data(p, labels=True)
    add_labels(p)
    add_output(p)
    add_classifier_data(p)
    add_training(p, fit=False)
    p.add_argument("--learner", default="clf", choices=["clf", "mlm"], help="a classifier, or a masked LM")


def run(a) -> dict:
    from fastai.torch_core import set_seed

    from ..files import atomic_dir, check_out_dir
    from ..plots import plot_lr_find
    from ..run import write_json

    check_args(a)
    check_out_dir(a.out, a.force)
    set_seed(a.seed, reproducible=True)
    if a.learner == "mlm":
        from ..learner import mlm_learner
        from ..mlm import mlm_dataloaders

        dls = mlm_dataloaders(a.data, a.model, a.text_col, a.max_len or 128, bs=a.bs, seed=a.seed, cache=a.cache)
        learn = mlm_learner(dls, a.model, precision=a.precision)
    else:
        from ..learner import classifier_learner

        learn = classifier_learner(classifier_data(a), a.model, precision=a.precision)
    with atomic_dir(a.out, a.force) as tmp:
        sugg = plot_lr_find(learn, tmp / "lr_find.png")
        write_json(tmp / "lr_find.json", sugg)
    print("suggested learning rates: " + ", ".join(f"{k} {v:.2e}" for k, v in sugg.items()) + f" -> {a.out}")
    return sugg
