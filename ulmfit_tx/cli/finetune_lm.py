"`ulmfit-tx finetune-lm`: fine-tune an encoder as a masked language model on your texts (ULMFiT's stage 2)."

from ._options import add_checkpoint, add_data, add_docs, add_model, add_output, add_training, start_run

HELP = "fine-tune an encoder as a masked language model on your texts"
NEW_HEAD_NOTE = (
    "note: {model} has no masked-LM head (a sentence-embedding model, or an encoder saved without it); "
    "a new one starts from scratch (--warmup-epochs trains it first). If the encoder was not pretrained as "
    "a masked LM (all-MiniLM-L6-v2 was trained on sentence pairs), this stage may not improve its "
    "classifier: docs/findings.md, 'Is stage 2 worth it?'"
)


def add_arguments(p):
    add_model(p)
    add_data(p)
    add_docs(p, former=("--max-rows",))
    add_output(p)
    add_checkpoint(p)
    add_training(p, lr=2e-4, epochs_help="epochs training every layer")
    p.add_argument(
        "--max-len",
        type=int,
        help="tokens per block (default 128); memory encoders: per row and batch (default: 2 segments)",
    )
    p.add_argument(
        "--warmup-epochs",
        type=int,
        default=1,
        help="epochs training the MLM head (and the word embeddings "
        "tied to it) alone first, on the frozen encoder layers, as fastai's language-model recipe does (0: "
        "every layer from the first step)",
    )
    p.add_argument("--warmup-lr", type=float, help="learning rate of those epochs (default 10 x --lr)")
    p.add_argument(
        "--div",
        type=float,
        help="discriminative rates after the warm-up: --lr for the head and embeddings, "
        "each encoder layer below this factor lower (default: one rate; ULMFiT's AWD-LSTM used 2.6)",
    )
    p.add_argument(
        "--mode",
        choices=["blocks", "docs", "segments"],
        help="concatenate into blocks, one item per text, "
        "or whole texts in order (default: segments for memory encoders, else blocks)",
    )
    p.add_argument("--mlm-prob", type=float, default=0.15, help="share of tokens chosen for prediction")
    p.add_argument("--whole-word", action="store_true", help="choose whole words")
    p.add_argument("--valid-pct", type=float, default=0.1, help="share of texts held out for the metrics")
    p.add_argument("--valid", help="held-out texts for the metrics instead (same forms as --data)")


def run(a) -> dict:
    from ..encoders import MEMORY_MODEL_TYPES
    from ..learner import mlm_learner
    from ..mlm import mlm_dataloaders
    from ..models import load_config
    from ..schedule import mlm_stages
    from ..store import as_store
    from ..tokenize import HFTokenizer

    run = start_run(a)
    config, tfm = load_config(a.model), HFTokenizer(a.model)
    opts = dict(text_col=a.text_col, docs=a.docs, unk=tfm.tok.unk_token)
    store = as_store(a.data, tfm, a.cache, **opts, max_docs=a.max_docs)
    valid = as_store(a.valid, tfm, a.cache, **opts) if a.valid else None
    memory = config.model_type in MEMORY_MODEL_TYPES
    mode = a.mode or ("segments" if memory else "blocks")
    max_len = a.max_len or (2 * config.segment_len if memory else 128)
    dls = mlm_dataloaders(
        store,
        tfm.tok,
        a.text_col,
        max_len,
        mode,
        a.valid_pct,
        valid,
        bs=a.bs,
        seed=a.seed,
        mlm_prob=a.mlm_prob,
        whole_word=a.whole_word,
    )
    learn = mlm_learner(dls, a.model, precision=a.precision, cbs=run.cbs)
    if learn.model.new_head:
        run.say(NEW_HEAD_NOTE.format(model=a.model))
    stages = mlm_stages(a.lr, a.epochs, a.warmup_epochs, a.warmup_lr, a.div)
    loss, acc, ppl = run.fit(learn, stages)
    metrics = dict(
        mlm_loss=loss,
        perplexity=ppl,
        masked_accuracy=acc,
        new_head=learn.model.new_head,
        epochs=a.epochs,
        lr=a.lr,
        div=a.div,
        warmup_epochs=a.warmup_epochs,
        warmup_lr=stages[0].lr if a.warmup_epochs else None,
        max_len=max_len,
        mode=mode,
        n_train_items=len(dls.train_ds),
        n_valid_items=len(dls.valid_ds),
        **run.stats(learn, (a.epochs + a.warmup_epochs) * len(dls.train_ds)),
        per_epoch=run.history.epochs,
    )
    run.save_pretrained(learn, metrics)
    run.say(f"MLM fine-tuned: loss {loss:.4f}, perplexity {ppl:.2f}, masked-token accuracy {acc:.4f} -> {a.out}")
    return metrics
