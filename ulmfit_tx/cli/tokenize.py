"`ulmfit-tx tokenize`: a corpus as a token store (memory-mapped ids, offsets, labels) that every verb reads."

from ._options import add_data, add_docs, add_labels, add_model, add_output, check_args, label_options

HELP = "tokenize a corpus into a token store (memory-mapped ids, offsets, labels)"


def add_arguments(p):
    add_model(p, "model folder or hub name whose tokenizer to use")
    add_data(p, cache=False)
    p.add_argument(
        "--label-col",
        help="column(s) with the labels, stored by task (default: 'label' when the data has that column, as train-clf "
        "reads; several comma-separated: 0/1 columns of a multi_label task)",
    )
    p.add_argument("--no-labels", action="store_true", help="store the texts only, even if there is a label column")
    add_labels(p)
    p.add_argument("--valid-col", default="is_valid", help="boolean column of validation rows, stored if present")
    add_docs(p)
    add_output(p)


def run(a):
    from ..io import has_column
    from ..store import build_store
    from ..tokenize import HFTokenizer

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
