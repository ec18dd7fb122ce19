"""Masked-language-model data and metrics: texts cut into blocks (or kept per document), BERT's
dynamic masking vectorised over the batch, masked-token accuracy and perplexity, fill-mask."""
from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders, Datasets, TfmdDL
from fastai.data.transforms import RandomSplitter
from fastai.learner import Metric
from fasttransform import ItemTransform

from .data import PadTokens, TokenSortedDL
from .errors import UlmfitError, check_texts
from .io import read_data
from .memory import SegmentDL
from .tokenize import HFTokenizer, word_start_table

__all__ = ["lm_blocks", "whole_docs", "mask_tokens", "MaskTokens", "mlm_dataloaders", "mlm_loss", "MaskedAccuracy",
           "MaskedPerplexity", "fill_mask"]


def lm_blocks(tfm: HFTokenizer, texts) -> list[np.ndarray]:
    """Concatenate the tokens of all texts (a separator between documents) and cut them into blocks of
    `tfm.max_len` with the special tokens around each; the last, shorter block is dropped (no blocks if
    the texts are shorter than one)."""
    sep = tfm.tok.sep_token_id if tfm.tok.sep_token_id is not None else tfm.tok.eos_token_id
    docs = tfm.token_ids(texts)
    flat = np.fromiter((t for d in docs for t in (d + [sep] if sep is not None else d)), dtype=np.int32)
    n = tfm.max_len - len(tfm.prefix) - len(tfm.suffix)
    body = flat[: len(flat) // n * n].reshape(-1, n)
    if len(body) == 0: return []
    wrapped = np.concatenate([np.tile(tfm.prefix, (len(body), 1)), body, np.tile(tfm.suffix, (len(body), 1))], axis=1)
    return list(wrapped.astype(np.int32))


def whole_docs(tfm: HFTokenizer, texts) -> list[np.ndarray]:
    "The untruncated ids of each text with the special tokens around it."
    return [np.array(tfm.prefix + d + tfm.suffix, dtype=np.int32) for d in tfm.token_ids(texts)]


def mask_tokens(
    ids: torch.Tensor,           # (B, L) token ids, padded on either side
    special_ids: torch.Tensor,   # Ids never chosen: special tokens and padding
    mask_id: int,                # The [MASK] id
    random_ids: torch.Tensor,    # Ids a chosen token may be replaced with (the non-special vocabulary)
    mlm_prob: float = 0.15,      # Share of real tokens (or words) chosen
    mask_frac: float = 0.8,      # Of the chosen: share replaced by [MASK]
    random_frac: float = 0.1,    # Of the chosen: share replaced by a random token (the rest stay unchanged)
    word_starts: torch.Tensor | None = None,  # Bool per vocab id: starts a word. Given: whole words are chosen
) -> tuple[torch.Tensor, torch.Tensor]:
    "BERT's masking of a batch, with no Python loop over samples: returns (masked ids, labels with -100 where not chosen)."
    candidate = ~torch.isin(ids, special_ids)                            # (B, L) real, non-special tokens
    if word_starts is None: chosen = torch.rand(ids.shape, device=ids.device) < mlm_prob
    else:
        word = (word_starts[ids] & candidate).long().cumsum(1)           # (B, L) index of each token's word
        chosen = (torch.rand(ids.shape[0], ids.shape[1] + 1, device=ids.device) < mlm_prob).gather(1, word)
    chosen &= candidate
    # a sequence with real tokens but none chosen gets one, so every batch has a loss
    empty = ~chosen.any(1) & candidate.any(1)                            # (B,)
    if empty.any():
        pick = (torch.rand(ids.shape, device=ids.device) * candidate).argmax(1)  # (B,) a random candidate
        chosen[empty, pick[empty]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, device=ids.device)
    masked = torch.where(chosen & (r < mask_frac), torch.full_like(ids, mask_id), ids)
    to_random = chosen & (r >= mask_frac) & (r < mask_frac + random_frac)
    masked[to_random] = random_ids[torch.randint(len(random_ids), (int(to_random.sum()),), device=ids.device)]
    return masked, labels


class MaskTokens(ItemTransform):
    """`after_batch`: dynamic masking of each batch (on the batch's device). Turns `(ids, *rest)` into
    `(masked, labels, *rest, labels)`: the model reads the labels to run its head on chosen tokens only."""
    order = 100

    def __init__(self,
        tfm: HFTokenizer,          # The tokenizer transform (gives special, mask and vocabulary ids)
        mlm_prob: float = 0.15,    # Share of real tokens chosen
        mask_frac: float = 0.8,    # Of the chosen: share set to [MASK]
        random_frac: float = 0.1,  # Of the chosen: share set to a random token
        whole_word: bool = False,  # Choose whole words rather than single subword tokens
    ):
        super().__init__()
        tok = tfm.tok
        if tok.mask_token_id is None: raise UlmfitError("the tokenizer has no mask token; it cannot train an MLM")
        if not 0 <= mask_frac + random_frac <= 1: raise UlmfitError("mask_frac + random_frac must be between 0 and 1")
        self.mlm_prob, self.mask_frac, self.random_frac = mlm_prob, mask_frac, random_frac
        self.mask_id, self.pad_id = tok.mask_token_id, tok.pad_token_id
        self.special_ids = torch.tensor(sorted(set(tok.all_special_ids) | {tok.pad_token_id}))
        self.random_ids = torch.tensor([i for i in range(len(tok)) if i not in set(self.special_ids.tolist())])
        self.word_starts = word_start_table(tok) if whole_word else None

    def encodes(self, b):
        ids = b[0]
        dev = ids.device
        ws = None if self.word_starts is None else self.word_starts.to(dev)
        masked, labels = mask_tokens(ids, self.special_ids.to(dev), self.mask_id, self.random_ids.to(dev),
                                     self.mlm_prob, self.mask_frac, self.random_frac, ws)
        return (masked, labels, *b[1:], labels)

    def decodes(self, b):
        "Labels shown as the tokens to predict (padding elsewhere) so the tokenizer decodes them as text."
        if len(b) < 2: return b
        targets = b[1].masked_fill(b[1] == -100, self.pad_id)
        return (b[0], targets, *b[2:-1], targets)


def _texts(source, text_col: str) -> list[str]:
    "Texts from a list, Series, DataFrame or file, checked to be non-empty strings."
    if isinstance(source, (str, os.PathLike)): source = read_data(source)
    df = source if isinstance(source, pd.DataFrame) else pd.DataFrame({text_col: list(source)})
    check_texts(df, text_col)
    return df[text_col].tolist()


def mlm_dataloaders(
    source,                      # Texts: list, Series, DataFrame with `text_col`, or a CSV/parquet file
    tokenizer,                   # A fast tokenizer, or a model folder / hub name
    text_col: str = "text",      # Column with the texts (DataFrame or file)
    max_len: int = 128,          # Block length (or longest document; or, with "segments", tokens per row per batch)
    mode: str = "blocks",        # "blocks": concatenate and cut into blocks; "docs": one item per text;
                                 # "segments": whole texts read in order, `max_len` at a time (memory encoders)
    valid_pct: float = 0.1,      # Share of the texts held out (split by text, before blocking)
    valid_texts=None,            # Held-out texts (same forms as `source`) instead of a random split
    seed: int = 42,              # Seed of the split
    bs: int = 32,                # Batch size
    mlm_prob: float = 0.15,      # Share of real tokens chosen
    mask_frac: float = 0.8,      # Of the chosen: share set to [MASK]
    random_frac: float = 0.1,    # Of the chosen: share set to a random token
    whole_word: bool = False,    # Whole-word masking
    **kwargs,                    # Passed to `Datasets.dataloaders` (e.g. `device`)
) -> DataLoaders:
    """MLM `DataLoaders`: ids computed once; each batch is masked afresh (`MaskTokens`), so every epoch sees new masks.
    With mode "segments" the batches come from `SegmentDL` and carry a "starts a document" flag per row."""
    if mode not in ("blocks", "docs", "segments"):
        raise UlmfitError(f"mode must be 'blocks', 'docs' or 'segments', not {mode!r}")
    texts = _texts(source, text_col)
    tfm = HFTokenizer(tokenizer, max_len)
    if valid_texts is not None: parts = [texts, _texts(valid_texts, text_col)]
    else:
        if len(texts) < 2: raise UlmfitError("MLM fine-tuning needs at least 2 texts (one is held out)")
        train_idx, valid_idx = RandomSplitter(max(valid_pct, 1 / len(texts)), seed=seed)(texts)  # hold out >= 1 text
        parts = [[texts[i] for i in idx] for idx in (train_idx, valid_idx)]
    n_texts = [len(p) for p in parts]
    parts = [lm_blocks(tfm, p) if mode == "blocks" else whole_docs(tfm, p) if mode == "segments" else tfm.encode_batch(p)
             for p in parts]
    for part, n, what in zip(parts, n_texts, ("training", "held-out")):
        if not part: raise UlmfitError(f"the {n} {what} text(s) fill no block of {max_len} tokens: lower max_len, "
                                       "add texts or change valid_pct")
    splits = (list(range(len(parts[0]))), list(range(len(parts[0]), len(parts[0]) + len(parts[1]))))
    dsets = Datasets(parts[0] + parts[1], tfms=[[tfm]], splits=splits, n_inp=2)
    mask = MaskTokens(tfm, mlm_prob, mask_frac, random_frac, whole_word)
    if mode == "segments":
        dls = [SegmentDL(ds, max_len, tfm.pad_id, bs, seed, shuffle=train, after_batch=mask, **kwargs)
               for ds, train in ((dsets.train, True), (dsets.valid, False))]
        return DataLoaders(*dls, device=kwargs.get("device"))
    return dsets.dataloaders(bs=bs, num_workers=0, dl_type=TokenSortedDL if mode == "docs" else TfmdDL,
                             before_batch=PadTokens(tfm.pad_id, tfm.pad_first),
                             after_batch=mask, **kwargs)


def mlm_loss(pred: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
    "Cross-entropy of the logits at the chosen tokens (N, V) against the labels that are not -100."
    return F.cross_entropy(pred.float(), targ[targ != -100])


class MaskedAccuracy(Metric):
    "Share of chosen tokens predicted exactly, counted over tokens (not averaged over batches)."
    def reset(self): self.correct, self.total = 0, 0

    def accumulate(self, learn):
        targ = learn.yb[0][learn.yb[0] != -100]
        self.correct += (learn.pred.argmax(-1) == targ).sum().item()
        self.total += targ.numel()

    @property
    def value(self): return self.correct / self.total if self.total else None
    @property
    def name(self): return "masked_accuracy"


class MaskedPerplexity(Metric):
    "exp of the mean cross-entropy over all chosen tokens."
    def reset(self): self.loss, self.total = 0.0, 0

    def accumulate(self, learn):
        n = int((learn.yb[0] != -100).sum())
        self.loss += learn.loss.item() * n
        self.total += n

    @property
    def value(self): return math.exp(self.loss / self.total) if self.total else None
    @property
    def name(self): return "perplexity"


@torch.no_grad()
def fill_mask(model, tfm: HFTokenizer, text: str, k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-`k` (token, probability) for every mask in `text`; `[MASK]` and `<mask>` both stand for the
    tokenizer's mask token."""
    tok = tfm.tok
    for m in ("[MASK]", "<mask>"): text = text.replace(m, tok.mask_token)
    ids = torch.as_tensor(tfm.encode_batch([text])[0], dtype=torch.long)[None]
    where = (ids[0] == tok.mask_token_id).nonzero().flatten()
    if len(where) == 0: raise UlmfitError(f"no mask in the text: write [MASK] or <mask> where a word is missing")
    model.eval()
    device = next(model.parameters()).device
    logits = model(ids.to(device))[0, where].float().softmax(-1)         # (n_masks, V)
    top = logits.topk(k, dim=-1)
    return [[(tok.decode([i]).strip(), p) for i, p in zip(ix.tolist(), pr.tolist())]
            for ix, pr in zip(top.indices, top.values)]
