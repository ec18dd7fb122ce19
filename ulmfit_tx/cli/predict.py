"`ulmfit-tx predict`: labels and class probabilities from a classifier bundle (or its ONNX graph)."

from pathlib import Path

from ._options import add_model, text_col_arg

HELP = "labels and probabilities from an exported classifier"


def add_arguments(p):
    add_model(
        p,
        "folder written by train-clf (a bundle: config, safetensors, tokenizer, ulmfit_tx.json), or "
        "learn.export_bundle",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a folder's export.pkl when it has no bundle: a "
        "pickle runs any code its author put in it, so only for files you made or trust",
    )
    p.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "onnx"],
        help="torch: the bundle's weights; onnx: its ONNX graph on ONNX Runtime (written by export-onnx)",
    )
    p.add_argument("--int8", action="store_true", help="onnx: the int8 graph (model.int8.onnx, export-onnx --int8)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="CSV/parquet file of texts, or a token store made with the model's tokenizer")
    src.add_argument("--text", action="append", help="a text (repeat for several)")
    p.add_argument("--text-pair", action="append", help="a pair model: the second text of each --text, in order")
    p.add_argument(
        "--text-col",
        default="text",
        type=text_col_arg,
        help="column with the texts (default: text); a pair model: FIRST,SECOND",
    )
    p.add_argument("--out", help="CSV file to write (default: print)")
    p.add_argument("--bs", type=int, default=64, help="batch size")


def load(folder, trust_pickle: bool = False, backend: str = "torch", int8: bool = False):
    """The bundle in `folder` (nothing unpickled); only with `trust_pickle`, and only when there is no bundle, its
    export.pkl through fastai's `load_learner`."""
    from ..export import is_bundle
    from ..learner import load_classifier

    pkl = Path(folder) / "export.pkl"
    if is_bundle(folder) or backend != "torch" or not (trust_pickle and pkl.is_file()):
        return load_classifier(folder, backend=backend, int8=int8)
    import warnings

    from fastai.learner import load_learner

    from ..errors import UlmfitError

    try:
        with warnings.catch_warnings():  # fastai warns that pickles run code: the user said they trust this one
            warnings.simplefilter("ignore")
            return load_learner(pkl)
    except Exception as e:
        raise UlmfitError(f"{pkl}: cannot be loaded ({type(e).__name__}: {e})") from None


def _short(texts) -> list[str]:
    return [t if len(t) <= 60 else t[:57] + "..." for t in texts]


def run(a):
    from ..errors import UlmfitError, check_texts

    learn = load(a.model, a.trust_pickle, a.backend, a.int8)
    pair, cols = learn.tokenizer.pair, [a.text_col] if isinstance(a.text_col, str) else a.text_col
    if a.text is not None:
        if pair != (a.text_pair is not None) or (pair and len(a.text_pair) != len(a.text)):
            raise UlmfitError(
                "this model reads pairs of texts: give a --text-pair for each --text"
                if pair
                else "--text-pair is for models that read pairs of texts; this one reads one text"
            )
        res = learn.predict_texts(list(zip(a.text, a.text_pair)) if pair else a.text)
        for i, (name, texts) in enumerate([("text", a.text)] + ([("text_pair", a.text_pair)] if pair else [])):
            res.insert(i, name, _short(texts))
        print(res.to_string(index=False))
        return res
    from ..io import read_data
    from ..store import TokenStore, is_store

    if is_store(a.data):  # a token store made with the model's tokenizer: one row per document, in order
        res = learn.predict_texts(TokenStore(a.data), bs=a.bs)
        firsts = [("doc", range(len(res)))]
    else:
        if len(cols) != 1 + pair:
            raise UlmfitError(
                f"this model reads {'pairs of texts: give --text-col FIRST,SECOND' if pair else 'one text a row'}, "
                f"not --text-col {','.join(cols)}"
            )
        df = read_data(a.data)
        for c in cols:
            check_texts(df, c, a.data)
        res = learn.predict_texts(df[cols] if pair else df[cols[0]], bs=a.bs)
        firsts = [(c, df[c].values) for c in cols]
    if not a.out:
        print(res.to_string())
        return res
    import csv

    from ..files import atomic_file

    for i, (name, values) in enumerate(firsts):
        res.insert(i, name, values)
    with atomic_file(a.out) as tmp:
        # every text quoted: pandas leaves a field ending in a lone \r unquoted, which readers split into two rows
        res.to_csv(tmp, index=False, quoting=csv.QUOTE_NONNUMERIC)
    print(f"{len(res)} predictions -> {a.out}")
    return res
