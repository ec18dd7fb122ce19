"`ulmfit-tx fill-mask`: the top-k tokens for every mask token in a sentence."

from ._options import add_model

HELP = "top-k tokens for every [MASK] or <mask> in a sentence"


def add_arguments(p):
    add_model(p, "MLM model folder (e.g. from finetune-lm) or hub name")
    p.add_argument("text")
    p.add_argument("--top-k", type=int, default=5)


def run(a) -> list:
    from ..mlm import fill_mask
    from ..models import masked_lm_model
    from ..tokenize import HFTokenizer

    tfm = HFTokenizer(a.model)
    res = fill_mask(masked_lm_model(a.model, tfm.tok), tfm, a.text, a.top_k)
    for i, cands in enumerate(res, 1):
        print(f"mask {i}: " + ", ".join(f"{t} ({p:.3f})" for t, p in cands))
    return res
