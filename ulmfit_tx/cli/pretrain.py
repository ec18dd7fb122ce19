"`ulmfit-tx pretrain`: a tokenizer and a new encoder trained from nothing with the MLM objective (stage 1)."

from ._options import add_checkpoint, add_data, add_docs, add_output, add_training, start_run

HELP = "train a tokenizer and a new encoder from scratch with the MLM objective"


def add_arguments(p):
    add_data(p, former=("--corpus",))
    add_docs(p)
    p.add_argument(
        "--arch", default="scratch", choices=["bert", "roberta", "albert", "scratch", "memxl", "compressive"]
    )
    add_output(p)
    add_checkpoint(p)
    add_training(p, bs=32, lr=1e-3)
    p.add_argument("--valid", help="held-out corpus for the metrics (default: 5%% of the documents)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--max-len", type=int, default=128, help="block length; memory encoders: segment length")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="dropout while pretraining (default 0: faster learning); the saved config keeps the default",
    )


def run(a) -> dict:
    import itertools

    from ..io import iter_corpus
    from ..pretrain import pretrain_learner
    from ..schedule import Stage

    run = start_run(a)
    texts = list(itertools.islice(iter_corpus(a.data, a.docs, a.text_col), a.max_docs)) if a.max_docs else a.data
    learn = pretrain_learner(
        texts,
        a.arch,
        a.valid,
        a.vocab_size,
        a.max_len,
        a.layers,
        a.hidden,
        a.heads,
        a.bs,
        a.seed,
        a.dropout,
        docs=a.docs,
        text_col=a.text_col,
        cache=a.cache,
        precision=a.precision,
        cbs=run.cbs,
    )
    loss, acc, ppl = run.fit(learn, [Stage(None, a.epochs, a.lr)])
    n_params = sum(p.numel() for p in learn.model.parameters())
    metrics = dict(
        arch=a.arch,
        mlm_loss=loss,
        perplexity=ppl,
        masked_accuracy=acc,
        epochs=a.epochs,
        lr=a.lr,
        dropout=a.dropout,
        max_len=a.max_len,
        vocab_size=len(learn.tokenizer.tok),
        parameters=n_params,
        n_train_items=len(learn.dls.train_ds),
        n_valid_items=len(learn.dls.valid_ds),
        **run.stats(learn, a.epochs * len(learn.dls.train_ds)),
        per_epoch=run.history.epochs,
    )
    run.save_pretrained(learn, metrics)
    run.say(
        f"pretrained {a.arch} ({n_params / 1e6:.1f}M parameters): held-out perplexity {ppl:.2f}, "
        f"masked-token accuracy {acc:.4f}, {metrics['train_time_s']:.0f}s -> {a.out}"
    )
    return metrics
