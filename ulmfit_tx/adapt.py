"""Stage 2 for sentence-embedding encoders: unsupervised contrastive adaptation to the target texts (SimCSE, Gao et
al. 2021). Each text is encoded twice with different dropout masks (`ContrastiveEncoder` in models.py); the two
views of a text are pulled together and the other texts of the batch pushed apart (InfoNCE). An encoder trained
contrastively on sentence pairs, such as all-MiniLM-L6-v2, has no masked-LM head; this is the objective it knows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders
from fastai.metrics import Metric

from .batching import PadTokens, TokenSortedDL
from .errors import UlmfitError
from .mlm import DocView, store_parts
from .tokenize import HFTokenizer

__all__ = ["TextView", "contrastive_dataloaders", "SimCSELoss", "ViewAccuracy"]


class TextView(DocView):
    """Documents of a token store as items `(TensorText, document index)`: one input, and the index as the target,
    which the contrastive loss does not need but fastai's `Learner` does (it skips the loss of a batch without one)."""

    n_inp = 1

    def __getitem__(self, i: int):
        (ids,) = super().__getitem__(i)
        return ids, torch.tensor(int(self.idx[i]))


def contrastive_dataloaders(
    source,  # DataFrame, list of texts, CSV/TSV/parquet/.txt file, folder, or token store
    tokenizer,  # A fast tokenizer, or a model folder / hub name
    text_col: str = "text",  # Column with the texts
    max_len: int = 128,  # Tokens per text, special tokens included (longer texts are cut)
    valid_pct: float = 0.1,  # Share of the texts held out for the metrics (when `valid_texts` is None)
    valid_texts=None,  # Held-out texts instead (same forms as `source`)
    bs: int = 32,  # Texts per batch: each is contrasted with the other texts of its batch
    seed: int = 42,  # Seed of the held-out split and the shuffles
    docs: str = "lines",  # For a .txt corpus: a document is a line, a file, or a WikiText article
    cache=None,  # Token store cache for a file source (None: the default cache; False: none)
    **kwargs,  # Passed to the DataLoaders (e.g. `device`)
) -> DataLoaders:
    """Contrastive `DataLoaders` over a token store: one text per item, cut to `max_len`, in length-sorted batches
    (texts of similar length contrast with each other, as they would in any batch of a length-sorted corpus)."""
    tfm = HFTokenizer(tokenizer, max_len)
    parts = store_parts(source, tfm, text_col, docs, cache, valid_texts, valid_pct, seed, "contrastive adaptation", 4)
    if min(len(idx) for _, idx in parts) < 2:
        raise UlmfitError("contrastive adaptation needs at least 2 held-out texts: raise valid_pct or add texts")
    pad = PadTokens(tfm.pad_id, tfm.pad_first)
    dls = [
        TokenSortedDL(
            TextView(st, idx, tfm),
            bs=bs,
            shuffle=train,
            drop_last=train and len(idx) > bs,
            num_workers=0,
            before_batch=pad,
            **kwargs,
        )
        for (st, idx), train in zip(parts, (True, False))
    ]
    return DataLoaders(*dls, device=kwargs.get("device"))


class SimCSELoss:
    """InfoNCE over the two views of each text: embeddings (2B, D), rows i and B + i views of one text (`doc`, the
    texts' indices, is not needed). Each first view's positive is its own second view; the other texts' second views
    are its negatives."""

    def __init__(self, temperature: float = 0.05):
        if temperature <= 0:
            raise UlmfitError(f"temperature must be positive, not {temperature}")
        self.temperature = temperature

    def __call__(self, z: torch.Tensor, doc: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(similarities(z) / self.temperature, torch.arange(len(z) // 2, device=z.device))


def similarities(z: torch.Tensor) -> torch.Tensor:
    "Cosine similarities (B, B) of the first views (rows :B of z (2B, D)) with the second views (rows B:)."
    a, b = F.normalize(z.float(), dim=-1).chunk(2)  # (B, D) each
    return a @ b.T  # (B, B)


class ViewAccuracy(Metric):
    "Share of texts whose nearest second view among the batch's is their own (the task the loss trains)."

    sum_attrs = ("correct", "total")  # summed over the processes of a distributed run

    def reset(self):
        self.correct, self.total = 0, 0

    def accumulate(self, learn):
        sim = similarities(learn.pred)
        self.correct += (sim.argmax(1) == torch.arange(len(sim), device=sim.device)).sum().item()
        self.total += len(sim)

    @property
    def value(self):
        return self.correct / self.total if self.total else None

    @property
    def name(self):
        return "view_accuracy"
