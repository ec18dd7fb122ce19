"`ulmfit-tx tokenize`: a corpus as a token store (memory-mapped ids, offsets, labels) that every verb reads."

from ._options import add_data, add_docs, add_labels, add_model, add_output, check_args, label_options

HELP = "tokenize a corpus into a token store (memory-mapped ids, offsets, labels), or check one (--verify)"


def add_arguments(p):
    add_model(p, "model folder or hub name whose tokenizer to use", required=False)
    add_data(p, required=False, cache=False)
    p.add_argument(
        "--label-col",
        help="column(s) with the labels, stored by task (default: 'label' when the data has that column, as train-clf "
        "reads; several comma-separated: 0/1 columns of a multi_label task)",
    )
    p.add_argument("--no-labels", action="store_true", help="store the texts only, even if there is a label column")
    add_labels(p)
    p.add_argument("--valid-col", default="is_valid", help="boolean column of validation rows, stored if present")
    add_docs(p)
    add_output(p, required=False)
    p.add_argument(
        "--verify",
        metavar="STORE",
        help="instead of building: read the store back and check its checksums, offsets, ids and labels (with "
        "--model: its ids are that tokenizer's)",
    )


def verify(a):
    "`--verify STORE`: every file read back and checked; one line says what was found."
    from ..store import TokenStore
    from ..tokenize import HFTokenizer

    store = TokenStore(a.verify)
    if a.model:
        store.check_tokenizer(HFTokenizer(a.model))
    res = store.verify()
    print(
        f"token store {a.verify}: OK, {res['documents']:,} documents, {res['tokens']:,} tokens, largest id "
        f"{res['max_id']}"
        + (f" (within {a.model}'s {store.limit} ids)" if a.model else "")
        + ("; checksums match" if res["checksums"] else "; no checksums recorded (built by an older ulmfit_tx)")
    )
    return res


def run(a):
    from ..errors import UlmfitError
    from ..io import has_column
    from ..store import build_store
    from ..tokenize import HFTokenizer

    if a.verify:
        return verify(a)
    missing = [f"--{n}" for n in ("model", "data", "out") if getattr(a, n) is None]
    if missing:
        raise UlmfitError(f"tokenize needs {', '.join(missing)} (or --verify STORE to check a store)")
    check_args(a)
    if a.no_labels:
        a.label_col = None
    elif a.label_col is None and has_column(a.data, "label"):
        a.label_col = "label"
    tfm = HFTokenizer(a.model)
    labels = label_options(a)
    store = build_store(
        a.data,
        tfm,
        a.out,
        a.text_col,
        labels.pop("label_col"),
        a.valid_col,
        **labels,
        docs=a.docs,
        unk=tfm.tok.unk_token,
        max_docs=a.max_docs,
        force=a.force,
    )
    m = store.meta
    print(
        f"token store: {m['n_docs']:,} documents, {m['n_tokens']:,} tokens ({m['dtype']})"
        + (f", {m['task']} labels" if m.get("task") else ", no labels")
        + (f", classes {m['classes']}" if m["classes"] else "")
        + f" in {m['seconds']:.1f}s -> {a.out}"
    )
    return store
