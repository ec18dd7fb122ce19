"`ulmfit-tx predict`: labels and class probabilities from a classifier bundle (or its ONNX graph)."

from pathlib import Path

from ._options import add_model

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
    p.add_argument("--text-col", default="text", help="column with the texts (default: text)")
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


def run(a):
    learn = load(a.model, a.trust_pickle, a.backend, a.int8)
    if a.text is not None:
        res = learn.predict_texts(a.text)
        res.insert(0, "text", [t if len(t) <= 60 else t[:57] + "..." for t in a.text])
        print(res.to_string(index=False))
        return res
    from ..errors import check_texts
    from ..io import read_data
    from ..store import TokenStore, is_store

    if is_store(a.data):  # a token store made with the model's tokenizer: one row per document, in order
        res = learn.predict_texts(TokenStore(a.data), bs=a.bs)
        first = ("doc", range(len(res)))
    else:
        df = read_data(a.data)
        check_texts(df, a.text_col, a.data)
        res = learn.predict_texts(df[a.text_col], bs=a.bs)
        first = (a.text_col, df[a.text_col].values)
    if not a.out:
        print(res.to_string())
        return res
    import csv

    from ..io import atomic_file

    res.insert(0, *first)
    with atomic_file(a.out) as tmp:
        # every text quoted: pandas leaves a field ending in a lone \r unquoted, which readers split into two rows
        res.to_csv(tmp, index=False, quoting=csv.QUOTE_NONNUMERIC)
    print(f"{len(res)} predictions -> {a.out}")
    return res
