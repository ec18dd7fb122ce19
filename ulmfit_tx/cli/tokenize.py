"`ulmfit-tx tokenize`: a corpus as a token store (memory-mapped ids, offsets, labels) that every verb reads."

from ._options import add_data, add_docs, add_model, add_output, check_args

HELP = "tokenize a corpus into a token store (memory-mapped ids, offsets, labels)"


def add_arguments(p):
    add_model(p, "model folder or hub name whose tokenizer to use")
    add_data(p, cache=False)
    p.add_argument("--label-col", help="column with the labels, stored as class ids (default: none)")
    p.add_argument("--valid-col", default="is_valid", help="boolean column of validation rows, stored if present")
    add_docs(p)
    add_output(p)


def run(a):
    from ..store import build_store
    from ..tokenize import HFTokenizer

    check_args(a)
    tfm = HFTokenizer(a.model)
    store = build_store(
        a.data,
        tfm,
        a.out,
        a.text_col,
        a.label_col,
        a.valid_col,
        a.docs,
        tfm.tok.unk_token,
        max_docs=a.max_docs,
        force=a.force,
    )
    m = store.meta
    print(
        f"token store: {m['n_docs']:,} documents, {m['n_tokens']:,} tokens ({m['dtype']})"
        + (f", classes {m['classes']}" if m["classes"] else "")
        + f" in {m['seconds']:.1f}s -> {a.out}"
    )
    return store
