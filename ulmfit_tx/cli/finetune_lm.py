"""`ulmfit-tx finetune-lm`: ULMFiT's stage 2, an encoder adapted to your texts: as a masked language model, or, for a
checkpoint without a masked-LM head (a sentence-embedding model), with SimCSE's contrastive objective."""

from ._options import add_checkpoint, add_data, add_docs, add_model, add_output, add_training, start_run

HELP = "adapt an encoder to your texts: masked-LM fine-tuning, or contrastive (SimCSE) for sentence encoders"
DEFAULT_LR = {"mlm": 2e-4, "simcse": 5e-5}
NEW_HEAD_NOTE = (
    "note: {model} has no masked-LM head (a sentence-embedding model, or an encoder saved without it); a new one "
    "starts from scratch (--warmup-epochs trains it first). For an encoder not pretrained as a masked LM this stage "
    "may not improve its classifier: docs/findings.md, 'Is stage 2 worth it?'"
)
OBJECTIVE_HELP = (
    "mlm: masked-LM fine-tuning; simcse: contrastive, two dropout views of each text; auto: simcse "
    "when the checkpoint has no masked-LM head, else mlm"
)
MLM_KEPT = ("div", "warmup_epochs", "mode")  # settings recorded in metrics.json besides the shared ones


def add_arguments(p):
    add_model(p)
    add_data(p)
    add_docs(p, former=("--max-rows",))
    add_output(p)
    add_checkpoint(p)
    add_training(p, lr_help="default 2e-4 (mlm), 5e-5 (simcse)", epochs_help="epochs training every layer")
    p.add_argument("--objective", default="auto", choices=["auto", "mlm", "simcse"], help=OBJECTIVE_HELP)
    p.add_argument("--max-len", type=int, help="tokens per block or text (default 128; memory encoders: 2 segments)")
    p.add_argument("--valid-pct", type=float, default=0.1, help="share of texts held out for the metrics")
    p.add_argument("--valid", help="held-out texts for the metrics instead (same forms as --data)")
    p.add_argument("--temperature", type=float, default=0.05, help="simcse: temperature of the contrastive loss")
    p.add_argument("--deletion", type=float, default=0.0, help="simcse: share of tokens the second view leaves out")
    p.add_argument("--no-halves", dest="halves", action="store_false", help="simcse: SimCSE's views, not halves")
    p.add_argument("--warmup-epochs", type=int, default=1, help="mlm: epochs of the MLM head alone first (0: none)")
    p.add_argument("--warmup-lr", type=float, help="mlm: learning rate of those epochs (default 10 x --lr)")
    p.add_argument("--div", type=float, help="mlm: then each layer this factor slower than the one above (e.g. 2.6)")
    p.add_argument("--mlm-prob", type=float, default=0.15, help="mlm: share of tokens chosen for prediction")
    p.add_argument(
        "--mode",
        choices=["blocks", "docs", "segments"],
        help="mlm: blocks, one item per text, or whole "
        "texts in order (default: segments for memory encoders, else blocks)",
    )
    p.add_argument("--whole-word", action="store_true", help="mlm: choose whole words")


def run(a) -> dict:
    from ..models import has_mlm_head
    from ..store import as_store
    from ..tokenize import HFTokenizer

    run = start_run(a)
    a.objective = a.objective if a.objective != "auto" else "mlm" if has_mlm_head(a.model) else "simcse"
    a.lr = a.lr or DEFAULT_LR[a.objective]
    tfm = HFTokenizer(a.model)
    opts = dict(text_col=a.text_col, docs=a.docs, unk=tfm.tok.unk_token)
    store = as_store(a.data, tfm, a.cache, **opts, max_docs=a.max_docs)
    valid = as_store(a.valid, tfm, a.cache, **opts) if a.valid else None
    learn, stages, msg, names = (simcse if a.objective == "simcse" else mlm)(a, run, tfm, store, valid)
    values = dict(zip(names, run.fit(learn, stages)))
    samples = sum(st.epochs for st in stages) * len(learn.dls.train_ds)
    keep = (
        "objective",
        "epochs",
        "lr",
        "max_len",
        *(("temperature", "deletion", "halves") if a.objective == "simcse" else MLM_KEPT),
    )
    metrics = {
        **values,
        **{k: getattr(a, k) for k in keep},
        "new_head": getattr(learn.model, "new_head", False),
        "warmup_lr": stages[0].lr if a.objective == "mlm" and a.warmup_epochs else None,
        "n_train_items": len(learn.dls.train_ds),
        "n_valid_items": len(learn.dls.valid_ds),
        **run.stats(learn, samples),
        "per_epoch": run.history.epochs,
    }
    run.save_pretrained(learn, metrics)
    run.say(msg.format(**values) + f" -> {a.out}")
    return metrics


def mlm(a, run, tfm, store, valid):
    "Masked-LM fine-tuning: the learner, its stages, the closing message and the names of its validation values."
    from ..encoders import MEMORY_MODEL_TYPES
    from ..learner import mlm_learner
    from ..mlm import mlm_dataloaders
    from ..models import load_config
    from ..schedule import mlm_stages

    config = load_config(a.model)
    memory = config.model_type in MEMORY_MODEL_TYPES
    a.mode = a.mode or ("segments" if memory else "blocks")
    a.max_len = a.max_len or (2 * config.segment_len if memory else 128)
    kw = dict(bs=a.bs, seed=a.seed, mlm_prob=a.mlm_prob, whole_word=a.whole_word)
    dls = mlm_dataloaders(store, tfm.tok, a.text_col, a.max_len, a.mode, a.valid_pct, valid, **kw)
    learn = mlm_learner(dls, a.model, precision=a.precision, cbs=run.cbs)
    if learn.model.new_head:
        run.say(NEW_HEAD_NOTE.format(model=a.model))
    msg = "MLM fine-tuned: loss {mlm_loss:.4f}, perplexity {perplexity:.2f}, masked accuracy {masked_accuracy:.4f}"
    stages = mlm_stages(a.lr, a.epochs, a.warmup_epochs, a.warmup_lr, a.div)
    return learn, stages, msg, ("mlm_loss", "masked_accuracy", "perplexity")


def simcse(a, run, tfm, store, valid):
    "Contrastive adaptation: every layer for --epochs at --lr, one cycle; returns what `mlm` returns."
    from ..adapt import contrastive_dataloaders
    from ..learner import contrastive_learner
    from ..schedule import Stage

    a.max_len = a.max_len or 128
    dls = contrastive_dataloaders(
        store, tfm.tok, max_len=a.max_len, valid_pct=a.valid_pct, valid_texts=valid, bs=a.bs, seed=a.seed
    )
    views = dict(temperature=a.temperature, deletion=a.deletion, halves=a.halves)
    learn = contrastive_learner(dls, a.model, **views, precision=a.precision, cbs=run.cbs)
    msg = "contrastive (SimCSE) adaptation: held-out loss {contrastive_loss:.4f}, view accuracy {view_accuracy:.4f}"
    return learn, [Stage(None, a.epochs, a.lr)], msg, ("contrastive_loss", "view_accuracy")
