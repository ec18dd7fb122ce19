"""`show_results` for text batches. fastai 2.8.12's own version for `TensorText` calls
`show_results[object]`, which plum's dispatch does not support; this more specific method replaces it.
Importing fastai's text learner also registers its `plot_top_losses` for text."""

from __future__ import annotations

import fastai.text.learner  # noqa: F401 (registers plot_top_losses for TensorText)
import pandas as pd
from fastai.data.core import show_results
from fastai.text.data import TensorText
from fastai.torch_core import TensorCategory, display_df, get_empty_df
from fastcore.foundation import L
from plum import dispatch

__all__ = ["show_results"]

_generic_show_results = show_results._resolve_method_with_cache((object, object, object, object))[0]


@dispatch
def show_results(x: TensorText, y: TensorCategory, samples, outs, ctxs=None, max_n=10, trunc_at=150, **kwargs):
    "Texts (cut at `trunc_at` characters), targets and predictions as a table."
    if ctxs is None:
        ctxs = get_empty_df(min(len(samples), max_n))
    samples = L((s[0].truncate(trunc_at), *s[1:]) for s in samples)
    ctxs = _generic_show_results(x, y, samples, outs, ctxs=ctxs, max_n=max_n, **kwargs)
    display_df(pd.DataFrame(ctxs))
    return ctxs
