"`ulmfit-tx pretrain-marge`: adapt an encoder to your texts with Marge (retrieval and reconstruction)."

from ._options import add_checkpoint, add_data, add_docs, add_model, add_output, add_training, start_run

HELP = (
    "adapt an encoder to your texts with Marge (retrieval and reconstruction) instead of MLM; the encoder folder "
    "it writes is a --model for train-clf and finetune-lm"
)


def add_arguments(p):
    add_model(
        p,
        "encoder folder or hub name (BERT, RoBERTa, ALBERT, DistilBERT, scratch): a new decoder is added; "
        "or a Marge folder (OUT/marge) to continue",
    )
    p.add_argument("--from-config", action="store_true", help="build the encoder from --model's config, fresh weights")
    add_data(p)
    add_docs(p)
    add_output(p)
    add_checkpoint(p)
    add_training(
        p,
        bs=8,
        lr=3e-3,
        lr_help="warm-up learning rate; then the decoder trains at lr/3",
        epochs_help="epochs training everything, after the warm-up",
    )
    p.add_argument("--max-len", type=int, default=128, help="tokens per chunk: long documents are cut into chunks")
    p.add_argument("--evidence", type=int, default=4, help="evidence chunks per target")
    p.add_argument("--reindex-every", type=int, help="steps between neighbour-table rebuilds (default: each stage)")
    p.add_argument("--retrieval-layer", type=int, help="encoder layers before the document embedding (default: half)")
    p.add_argument("--self-layers", type=int, help="decoder layers with self-attention only (default 2)")
    p.add_argument("--cross-layers", type=int, help="then decoder layers with cross-attention (default 2)")
    p.add_argument("--same-doc", action="store_true", help="allow evidence from other chunks of the target's document")
    p.add_argument(
        "--index",
        default="torch",
        choices=["torch", "faiss"],
        help="exact nearest-neighbour search: blocked matrix products in torch, or faiss (when installed)",
    )
    p.add_argument("--warmup-epochs", type=int, default=1, help="epochs training the new decoder alone")
    p.add_argument(
        "--encoder-div",
        type=float,
        help="after the warm-up the encoder trains this many times slower than "
        "the decoder (default 10; 1 with --from-config)",
    )
    p.add_argument("--valid-pct", type=float, default=0.05, help="share of documents held out as targets")


def run(a) -> dict:
    from pathlib import Path

    from ..learner import marge_learner
    from ..retrieval import marge_dataloaders
    from ..schedule import marge_stages
    from ..store import as_store
    from ..tokenize import HFTokenizer

    run = start_run(a)
    tfm = HFTokenizer(a.model, a.max_len)
    store = as_store(
        a.data, tfm, a.cache, text_col=a.text_col, docs=a.docs, unk=tfm.tok.unk_token, max_docs=a.max_docs
    )
    dls = marge_dataloaders(
        store,
        tfm.tok,
        a.max_len,
        a.evidence,
        a.valid_pct,
        a.bs,
        a.seed,
        exclude_same_doc=not a.same_doc,
        backend=a.index,
    )
    decoder = {
        k: getattr(a, k) for k in ("self_layers", "cross_layers", "retrieval_layer") if getattr(a, k) is not None
    }
    learn = marge_learner(dls, a.model, a.from_config, a.reindex_every, a.precision, cbs=run.cbs, **decoder)
    encoder_div = a.encoder_div or (1.0 if a.from_config else 10.0)
    loss, beta = run.fit(learn, marge_stages(a.lr, a.warmup_epochs, a.epochs, encoder_div=encoder_div))
    n_train = len(dls.train_ds)
    metrics = dict(
        valid_loss=loss,
        beta=beta,
        retrieval_layer=learn.model.hf.config.retrieval_layer,
        evidence=a.evidence,
        n_chunks=len(dls.train.retriever.chunks),
        n_train_targets=n_train,
        n_valid_targets=len(dls.valid_ds),
        warmup_epochs=a.warmup_epochs,
        epochs=a.epochs,
        lr=a.lr,
        encoder_div=encoder_div,
        max_len=a.max_len,
        per_epoch=run.history.epochs,
        reindex=learn.reindexer.history,
        **run.stats(learn, (a.warmup_epochs + a.epochs) * n_train),
    )
    run.save_pretrained(
        learn, metrics, extra={"marge": learn.model.hf}
    )  # OUT: the encoder; OUT/marge: the whole model
    run.say(
        f"Marge: held-out reconstruction loss {loss:.4f}, beta {beta:.2f}, {metrics['train_time_s']:.0f}s -> "
        f"{a.out} (the encoder; the whole model in {Path(a.out) / 'marge'})"
    )
    return metrics
