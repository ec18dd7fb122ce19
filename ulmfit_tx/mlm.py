"""Masked-language-model data and metrics: a token store read as blocks (or per document), BERT's
dynamic masking vectorised over the batch, masked-token accuracy and perplexity, fill-mask."""

from __future__ import annotations

import math
import zlib
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders, TfmdDL
from fastai.learner import Metric
from fastai.text.data import TensorText
from fasttransform import ItemTransform

from .batching import PadTokens, TokenSortedDL, random_split
from .errors import UlmfitError
from .memory import SegmentDL
from .store import TokenStore, as_store
from .tokenize import HFTokenizer, word_start_table

__all__ = [
    "DocView",
    "BlockView",
    "BlockDL",
    "mask_tokens",
    "MaskTokens",
    "mlm_dataloaders",
    "mlm_loss",
    "MaskedAccuracy",
    "MaskedPerplexity",
    "fill_mask",
]


class _StoreView:
    "What the MLM views of a token store share: items `(ids,)` that `MaskTokens` makes 2 inputs, decoded by `tfm`."

    n_inp = 2  # `MaskTokens` turns (ids,) into (masked, labels, labels): the model reads the labels too

    def decode(self, o, full: bool = True):
        return self.tfm.decode(o)


class DocView(_StoreView):
    """Documents `idx` of a token store as MLM items `(TensorText,)`: each truncated to `tfm.max_len` ("docs"), or
    whole ("segments", read by `SegmentDL`), with the special tokens around it. Lengths come from the offsets."""

    def __init__(
        self,
        store: TokenStore,  # The token store
        idx,  # Indices of its documents, in reading order
        tfm: HFTokenizer,  # The tokenizer transform (max_len, special tokens, decoding)
        truncate: bool = True,  # Cut each document to `tfm.max_len`
    ):
        self.store, self.idx, self.tfm, self.truncate = store, np.asarray(idx, dtype=np.int64), tfm, truncate
        extra = len(tfm.prefix) + len(tfm.suffix)
        lens = store.lengths(self.idx) + extra
        self.item_lengths = np.minimum(lens, tfm.max_len) if truncate else lens  # read by `cached_lengths`

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int):
        if i >= len(self.idx):
            raise IndexError(i)
        return (
            TensorText(torch.as_tensor(self.tfm.wrap(self.store.doc(self.idx[i]), self.truncate), dtype=torch.long)),
        )


class BlockView(_StoreView):
    """Documents `idx` of a token store concatenated, with a separator after each, and cut into blocks of
    `tfm.max_len` tokens with the special tokens around each (the last, shorter block is dropped). A block is
    index arithmetic over the flat token array: nothing but one end offset per document is kept in memory."""

    def __init__(
        self,
        store: TokenStore,  # The token store
        idx,  # Indices of its documents, in reading order
        tfm: HFTokenizer,  # The tokenizer transform (block length, special tokens, decoding)
    ):
        self.store, self.idx, self.tfm = store, np.asarray(idx), tfm
        tok = tfm.tok
        self.sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        self.body = tfm.max_len - len(tfm.prefix) - len(tfm.suffix)  # tokens of the corpus per block
        self.ends = self._ends()  # (n_docs,) end of each document + separator
        self.n = int(self.ends[-1]) // self.body if len(self.ends) else 0
        self.wrap = (np.asarray(tfm.prefix, np.int32), np.asarray(tfm.suffix, np.int32))

    def _ends(self, chunk: int = 2**20) -> np.ndarray:
        "Cumulative lengths (separators included), a million documents at a time: 4 bytes a document when they fit."
        total = self.store.meta["n_tokens"] + len(self.store)  # at least the last end
        ends, done = np.empty(len(self.idx), np.uint32 if total < 2**32 else np.int64), 0
        for i in range(0, len(self.idx), chunk):
            part = np.cumsum(self.store.lengths(self.idx[i : i + chunk]) + (self.sep is not None)) + done
            ends[i : i + chunk], done = part, int(part[-1])
        return ends

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, b: int):
        if b >= self.n:
            raise IndexError(b)
        start, stop = b * self.body, (b + 1) * self.body  # positions in the concatenated corpus
        j = int(np.searchsorted(self.ends, start, side="right"))  # the document the block starts in
        parts, pos = [], start
        while pos < stop:
            d0 = int(self.ends[j - 1]) if j else 0  # where document j starts
            ids = self.store.doc(self.idx[j])
            if self.sep is not None:
                ids = np.append(ids, self.sep)
            parts.append(ids[pos - d0 : stop - d0])
            pos, j = int(self.ends[j]), j + 1
        ids = np.concatenate([self.wrap[0], *parts, self.wrap[1]]).astype(np.int64)
        return (TensorText(torch.from_numpy(ids)),)


class BlockDL(TfmdDL):
    """`TfmdDL` over a `BlockView` whose epoch order is a numpy array (a permutation from the DataLoader's own
    generator when shuffling), not fastai's Python list of every index: millions of blocks cost 8 bytes each."""

    def get_idxs(self):
        idxs = np.arange(self.n, dtype=np.int32 if self.n < 2**31 else np.int64)
        if self.shuffle:
            np.random.default_rng(self.rng.randint(0, 2**32 - 1)).shuffle(idxs)
        return idxs


def mask_tokens(
    ids: torch.Tensor,  # (B, L) token ids, padded on either side
    special_ids: torch.Tensor,  # Ids never chosen: special tokens and padding
    mask_id: int,  # The [MASK] id
    random_ids: torch.Tensor,  # Ids a chosen token may be replaced with (the non-special vocabulary)
    mlm_prob: float = 0.15,  # Share of real tokens (or words) chosen
    mask_frac: float = 0.8,  # Of the chosen: share replaced by [MASK]
    random_frac: float = 0.1,  # Of the chosen: share replaced by a random token (the rest stay unchanged)
    word_starts: torch.Tensor | None = None,  # Bool per vocab id: starts a word. Given: whole words are chosen
    generator: torch.Generator | None = None,  # Random generator (on the batch's device); None: torch's global one
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of a batch, with no Python loop over samples: returns (masked ids, labels with -100 where not
    chosen)."""
    candidate = ~torch.isin(ids, special_ids)  # (B, L) real, non-special tokens
    rand = lambda *shape: torch.rand(*shape, device=ids.device, generator=generator)
    if word_starts is None:
        chosen = rand(ids.shape) < mlm_prob
    else:
        word = (word_starts[ids] & candidate).long().cumsum(1)  # (B, L) index of each token's word
        chosen = (rand(ids.shape[0], ids.shape[1] + 1) < mlm_prob).gather(1, word)
    chosen &= candidate
    # a sequence with real tokens but none chosen gets one, so every batch has a loss
    empty = ~chosen.any(1) & candidate.any(1)  # (B,)
    if empty.any():
        pick = (rand(ids.shape) * candidate).argmax(1)  # (B,) a random candidate
        chosen[empty, pick[empty]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = rand(ids.shape)
    masked = torch.where(chosen & (r < mask_frac), torch.full_like(ids, mask_id), ids)
    to_random = chosen & (r >= mask_frac) & (r < mask_frac + random_frac)
    masked[to_random] = random_ids[
        torch.randint(len(random_ids), (int(to_random.sum()),), device=ids.device, generator=generator)
    ]
    return masked, labels


class MaskTokens(ItemTransform):
    """`after_batch`: dynamic masking of each batch (on the batch's device). Turns `(ids, *rest)` into
    `(masked, labels, *rest, labels)`: the model reads the labels to run its head on chosen tokens only."""

    order = 100

    def __init__(
        self,
        tfm: HFTokenizer,  # The tokenizer transform (gives special, mask and vocabulary ids)
        mlm_prob: float = 0.15,  # Share of real tokens chosen
        mask_frac: float = 0.8,  # Of the chosen: share set to [MASK]
        random_frac: float = 0.1,  # Of the chosen: share set to a random token
        whole_word: bool = False,  # Choose whole words rather than single subword tokens
        fixed: bool = False,  # The same masks for the same batch every time (held-out data): seeded by its ids
    ):
        super().__init__()
        self.fixed = fixed
        tok = tfm.tok
        if tok.mask_token_id is None:
            raise UlmfitError("the tokenizer has no mask token; it cannot train an MLM")
        if not 0 <= mask_frac + random_frac <= 1:
            raise UlmfitError("mask_frac + random_frac must be between 0 and 1")
        self.mlm_prob, self.mask_frac, self.random_frac = mlm_prob, mask_frac, random_frac
        self.mask_id, self.pad_id = tok.mask_token_id, tok.pad_token_id
        self.special_ids = torch.tensor(sorted(set(tok.all_special_ids) | {tok.pad_token_id}))
        self.random_ids = torch.tensor([i for i in range(len(tok)) if i not in set(self.special_ids.tolist())])
        self.word_starts = word_start_table(tok) if whole_word else None

    def encodes(self, b):
        ids = b[0]
        dev = ids.device
        ws = None if self.word_starts is None else self.word_starts.to(dev)
        gen = None
        if self.fixed:  # a seed from the batch's content: the same masks in every epoch, on any process
            gen = torch.Generator(device=dev).manual_seed(zlib.crc32(ids.detach().cpu().numpy().tobytes()))
        masked, labels = mask_tokens(
            ids,
            self.special_ids.to(dev),
            self.mask_id,
            self.random_ids.to(dev),
            self.mlm_prob,
            self.mask_frac,
            self.random_frac,
            ws,
            gen,
        )
        return (masked, labels, *b[1:], labels)

    def decodes(self, b):
        "Labels shown as the tokens to predict (padding elsewhere) so the tokenizer decodes them as text."
        if len(b) < 2:
            return b
        targets = b[1].masked_fill(b[1] == -100, self.pad_id)
        return (b[0], targets, *b[2:-1], targets)


def mlm_dataloaders(
    source,  # Texts: list, Series, DataFrame with `text_col`, a table file, a .txt corpus, a token store, a HF dataset
    tokenizer,  # A fast tokenizer, or a model folder / hub name
    text_col: str = "text",  # Column with the texts (DataFrame or file)
    max_len: int = 128,  # Block length (or longest document; or, with "segments", tokens per row per batch)
    mode: str = "blocks",  # "blocks": concatenate and cut into blocks; "docs": one item per text;
    # "segments": whole texts read in order, `max_len` at a time (memory encoders)
    valid_pct: float = 0.1,  # Share of the texts held out (split by text, before blocking)
    valid_texts=None,  # Held-out texts (same forms as `source`) instead of a random split
    seed: int = 42,  # Seed of the split
    bs: int = 32,  # Batch size
    mlm_prob: float = 0.15,  # Share of real tokens chosen
    mask_frac: float = 0.8,  # Of the chosen: share set to [MASK]
    random_frac: float = 0.1,  # Of the chosen: share set to a random token
    whole_word: bool = False,  # Whole-word masking
    docs: str = "lines",  # For a .txt corpus: a document is a line, a file, or a WikiText article
    cache=None,  # Token store cache for a file source (None: the default cache; False: none)
    **kwargs,  # Passed to the DataLoaders (e.g. `device`)
) -> DataLoaders:
    """MLM `DataLoaders` over a token store: the texts are tokenized once (into the cache for a file), blocks and
    documents are read from the memory-mapped ids; each training batch is masked afresh (`MaskTokens`), so every
    epoch sees new masks, while held-out batches get the same masks every time (comparable metrics). With mode
    "segments" the batches come from `SegmentDL` and carry a "starts a document" flag."""
    if mode not in ("blocks", "docs", "segments"):
        raise UlmfitError(f"mode must be 'blocks', 'docs' or 'segments', not {mode!r}")
    tfm = HFTokenizer(tokenizer, max_len)
    parts = store_parts(source, tfm, text_col, docs, cache, valid_texts, valid_pct, seed, "MLM fine-tuning")
    view = {"blocks": BlockView, "docs": DocView, "segments": partial(DocView, truncate=False)}[mode]
    views = [view(st, idx, tfm) for st, idx in parts]
    for v, (_, idx), what in zip(views, parts, ("training", "held-out")):
        if not len(v):
            raise UlmfitError(
                f"the {len(idx)} {what} text(s) fill no block of {max_len} tokens: lower max_len, "
                "add texts or change valid_pct"
            )
    masks = [MaskTokens(tfm, mlm_prob, mask_frac, random_frac, whole_word, fixed=not train) for train in (True, False)]
    if mode == "segments":
        dls = [
            SegmentDL(v, max_len, tfm.pad_id, bs, seed, shuffle=train, after_batch=m, **kwargs)
            for v, m, train in zip(views, masks, (True, False))
        ]
    else:
        dl_type = TokenSortedDL if mode == "docs" else BlockDL
        dls = [
            dl_type(
                v,
                bs=bs,
                shuffle=train,
                drop_last=train,
                num_workers=0,
                before_batch=PadTokens(tfm.pad_id, tfm.pad_first),
                after_batch=m,
                **kwargs,
            )
            for v, m, train in zip(views, masks, (True, False))
        ]
    return DataLoaders(*dls, device=kwargs.get("device"))


def store_parts(
    source,  # The texts, in any form `as_store` reads
    tfm: HFTokenizer,  # The tokenizer transform
    text_col: str,  # Column with the texts
    docs: str,  # For a .txt corpus: what a document is
    cache,  # Token store cache for a file source
    valid_texts,  # Held-out texts in a store of their own, or None for a split of `source`
    valid_pct: float,  # Share of `source`'s documents held out when `valid_texts` is None
    seed: int,  # Seed of that split
    what: str,  # The stage, for the error message
    min_texts: int = 2,  # Fewest texts a split needs
) -> list[tuple]:
    "(token store, document indices) for training and for the held-out metrics."
    opts = dict(text_col=text_col, docs=docs, unk=tfm.tok.unk_token)
    store = as_store(source, tfm, cache, **opts)
    if valid_texts is not None:
        vstore = as_store(valid_texts, tfm, cache, **opts)
        return [(store, np.arange(len(store))), (vstore, np.arange(len(vstore)))]
    if len(store) < min_texts:
        raise UlmfitError(f"{what} needs at least {min_texts} texts (some are held out), not {len(store)}")
    return [(store, idx) for idx in random_split(len(store), valid_pct, seed)]


def mlm_loss(pred: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
    "Cross-entropy of the logits at the chosen tokens (N, V) against the labels that are not -100."
    return F.cross_entropy(pred.float(), targ[targ != -100])


class MaskedAccuracy(Metric):
    "Share of chosen tokens predicted exactly, counted over tokens (not averaged over batches)."

    sum_attrs = ("correct", "total")  # summed over the processes of a distributed run

    def reset(self):
        self.correct, self.total = 0, 0

    def accumulate(self, learn):
        targ = learn.yb[0][learn.yb[0] != -100]
        self.correct += (learn.pred.argmax(-1) == targ).sum().item()
        self.total += targ.numel()

    @property
    def value(self):
        return self.correct / self.total if self.total else None

    @property
    def name(self):
        return "masked_accuracy"


class MaskedPerplexity(Metric):
    "exp of the mean cross-entropy over all chosen tokens."

    sum_attrs = ("loss", "total")

    def reset(self):
        self.loss, self.total = 0.0, 0

    def accumulate(self, learn):
        n = int((learn.yb[0] != -100).sum())
        self.loss += learn.loss.item() * n
        self.total += n

    @property
    def value(self):
        return math.exp(self.loss / self.total) if self.total else None

    @property
    def name(self):
        return "perplexity"


@torch.no_grad()
def fill_mask(model, tfm: HFTokenizer, text: str, k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-`k` (token, probability) for every mask in `text`; `[MASK]` and `<mask>` both stand for the
    tokenizer's mask token."""
    tok = tfm.tok
    for m in ("[MASK]", "<mask>"):
        text = text.replace(m, tok.mask_token)
    ids = torch.as_tensor(tfm.encode_batch([text])[0], dtype=torch.long)[None]
    where = (ids[0] == tok.mask_token_id).nonzero().flatten()
    if len(where) == 0:
        raise UlmfitError("no mask in the text: write [MASK] or <mask> where a word is missing")
    model.eval()
    device = next(model.parameters()).device
    logits = model(ids.to(device))[0, where].float().softmax(-1)  # (n_masks, V)
    top = logits.topk(k, dim=-1)
    return [
        [(tok.decode([i]).strip(), p) for i, p in zip(ix.tolist(), pr.tolist())]
        for ix, pr in zip(top.indices, top.values)
    ]
