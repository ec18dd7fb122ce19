"""Retrieval for Marge (`encoders/marge.py`): a token store's documents cut into chunks, their embeddings g(z), an
exact top-k neighbour table by cosine (blocked matrix products; a chunk never retrieves itself, an exact duplicate of
itself, or, optionally, a chunk of its own document), a fastai DataLoader of (target, evidence) batches, and the
`Reindexer` Callback that rebuilds embeddings and neighbours while training."""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Metric
from fastai.text.data import TensorText
from fastai.torch_core import display_df
from fastprogress.fastprogress import progress_bar

from .batching import random_split
from .distributed import unwrap
from .errors import UlmfitError
from .store import TokenStore, as_store
from .tokenize import HFTokenizer

__all__ = [
    "Chunks",
    "pad_ids",
    "embed_chunks",
    "top_k_neighbours",
    "Retriever",
    "EvidenceDL",
    "marge_dataloaders",
    "Reindexer",
    "Beta",
]


class Chunks:
    """The documents `idx` of a token store cut into chunks of at most `tfm.max_len` tokens, special tokens included
    (or only each document's first chunk, with `split_docs=False`). Chunk i is (`doc[i]`, `start[i]`, `length[i]`)."""

    def __init__(
        self,
        store: TokenStore,  # The token store
        tfm: HFTokenizer,  # Its tokenizer transform (chunk length, special tokens)
        idx=None,  # Documents to read (default: all)
        split_docs: bool = True,  # Cut long documents into several chunks; False: keep each document's start only
    ):
        self.store, self.tfm = store, tfm
        idx = np.arange(len(store)) if idx is None else np.asarray(idx, np.int64)
        body = tfm.max_len - len(tfm.prefix) - len(tfm.suffix)  # corpus tokens per chunk
        if body < 1:
            raise UlmfitError(f"max_len {tfm.max_len} leaves no room for text beside the special tokens")
        lens = store.lengths(idx)
        n = np.maximum(1, -(-lens // body)) if split_docs else np.ones(len(idx), np.int64)  # chunks per document
        self.doc = np.repeat(idx, n)  # (N,) source document of each chunk
        self.start = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) * body  # (N,) offset in its document
        self.length = np.minimum(np.repeat(lens, n) - self.start, body)  # (N,) corpus tokens in the chunk
        self._hashes = None

    def __len__(self) -> int:
        return len(self.doc)

    def tokens(self, i: int) -> np.ndarray:
        "Chunk i's corpus token ids (no special tokens)."
        return self.store.doc(self.doc[i])[self.start[i] : self.start[i] + self.length[i]]

    def ids(self, i: int) -> np.ndarray:
        "Chunk i as model input: its tokens with the special tokens around them."
        return self.tfm.wrap(self.tokens(i))

    def hashes(self) -> np.ndarray:
        "(N,) a 64-bit hash of each chunk's token ids: equal for exact duplicates (computed once)."
        if self._hashes is None:
            self._hashes = np.fromiter((hash(self.tokens(i).tobytes()) for i in range(len(self))), np.int64, len(self))
        return self._hashes

    def text(self, i: int) -> str:
        return self.tfm.decode_ids(self.ids(i))


def pad_ids(seqs: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    "Id arrays -> ids (N, L) padded on the right with `pad_id`, and the mask (N, L), True at real tokens."
    lens = np.fromiter(map(len, seqs), np.int64, len(seqs))
    ids = np.full((len(seqs), lens.max()), pad_id, np.int64)
    for row, s in zip(ids, seqs):
        row[: len(s)] = s
    return torch.from_numpy(ids), torch.from_numpy(np.arange(lens.max())[None] < lens[:, None])


@torch.no_grad()
def embed_chunks(
    model,  # A `MargeModel`
    chunks: Chunks,  # What to embed
    bs: int = 128,  # Chunks per forward pass (in order of length, so padding is little)
    progress: bool = True,  # Show a progress bar
) -> torch.Tensor:
    """g(z) of every chunk (N, D), L2-normalised, on the model's device: eval mode (restored after), no gradient, the
    same padding masks as in training, and the pass stops at the retrieval layer. With `config.center`, the model's
    `center` becomes the mean first-token state of these chunks first."""
    was_training, dev = model.training, next(model.parameters()).device
    model.eval()
    lens = chunks.length + len(chunks.tfm.prefix) + len(chunks.tfm.suffix)
    order = np.argsort(lens, kind="stable")
    first = torch.empty(len(chunks), model.config.hidden_size, device=dev)
    try:
        steps = range(0, len(order), bs)
        for s in progress_bar(steps, leave=False) if progress else steps:
            sel = order[s : s + bs]
            ids, mask = pad_ids([chunks.ids(i) for i in sel], chunks.tfm.pad_id)
            first[torch.from_numpy(sel).to(dev)] = model.first_states(ids.to(dev), mask.to(dev), states=False)[
                0
            ].float()
    finally:
        model.train(was_training)
    if model.config.center:
        model.center.copy_(first.mean(0))
    return model.embed(first)


def top_k_neighbours(
    emb: torch.Tensor,  # (N, D) L2-normalised embeddings
    k: int,  # Neighbours per row
    hashes: np.ndarray | None = None,  # (N,) content hashes: rows with equal hashes never retrieve each other
    groups: np.ndarray | None = None,  # (N,) source ids: rows of one group never retrieve each other
    block: int | None = None,  # Query rows per matrix product (default: about 16M scores at a time)
    backend: str = "torch",  # "torch": blocked matrix products; "faiss": an exact inner-product index
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by cosine, each row against all rows, one block of queries at a time; never a row itself, its
    duplicates or its group. Returns indices (N, k) and scores (N, k), best first. The top `k + extra` candidates of
    a block are filtered; a row left short (many duplicates or a big group) is searched again with every exclusion
    masked over all N."""
    if backend not in ("torch", "faiss"):
        raise UlmfitError(f"backend must be 'torch' or 'faiss', not {backend!r}")
    N, dev = len(emb), emb.device
    hashes = None if hashes is None else torch.as_tensor(hashes, device=dev)
    groups = None if groups is None else torch.as_tensor(groups, device=dev)
    biggest = 1 if groups is None else int(torch.unique(groups, return_counts=True)[1].max())
    if k > N - biggest:
        raise UlmfitError(
            f"{k} neighbours asked, but a chunk has only {N - biggest} others to retrieve "
            "(fewer evidence documents, or more documents)"
        )
    block, c = block or max(1, min(N, 2**24 // N)), min(N, k + 8 + biggest)  # rows per block, candidates per row
    search = _faiss_search(emb, c) if backend == "faiss" else lambda q: (q @ emb.T).topk(c, dim=1)  # -> (b, c) each
    idx, val = torch.empty(N, k, dtype=torch.long, device=dev), torch.empty(N, k, device=dev)

    def excluded(rows: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:  # (b,) x (b, c) -> (b, c) bool
        bad = cand == rows[:, None]
        if hashes is not None:
            bad |= hashes[cand] == hashes[rows][:, None]
        if groups is not None:
            bad |= groups[cand] == groups[rows][:, None]
        return bad

    for s in range(0, N, block):
        rows = torch.arange(s, min(s + block, N), device=dev)
        cv, ci = search(emb[rows])  # (b, c) candidates
        v, j = cv.masked_fill(excluded(rows, ci), float("-inf")).topk(k, dim=1)
        i = ci.gather(1, j)
        short = ~torch.isfinite(v).all(1)  # rows whose candidates ran out
        if short.any():
            r = rows[short]
            full = excluded(r, torch.arange(N, device=dev).expand(len(r), N))
            v[short], i[short] = (emb[r] @ emb.T).masked_fill(full, float("-inf")).topk(k, dim=1)
        idx[rows], val[rows] = i, v
    return idx, val


def _faiss_search(emb: torch.Tensor, c: int):
    "An exact inner-product faiss index of `emb`: returns search(queries) -> the top `c` (scores, indices) as tensors."
    try:
        import faiss
    except ImportError:
        raise UlmfitError(
            "backend='faiss' needs faiss: pip install faiss-cpu (or faiss-gpu), or use backend='torch'"
        ) from None
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb.float().cpu().numpy())

    def search(q: torch.Tensor):
        v, i = index.search(q.float().cpu().numpy(), c)
        return torch.from_numpy(v).to(emb), torch.from_numpy(i).to(emb.device)

    return search


class Retriever:
    """The chunks Marge reads and the current neighbour table over them: `reindex(model)` embeds every chunk and finds
    each one's `k` nearest (never itself, a duplicate, or, with `exclude_same_doc`, a chunk of its own document)."""

    def __init__(
        self,
        chunks: Chunks,  # Targets and evidence candidates
        k: int = 4,  # Evidence documents per target
        exclude_same_doc: bool = True,  # A chunk never retrieves another chunk of its own document
        backend: str = "torch",  # Nearest-neighbour search: "torch" (blocked matrix products) or "faiss"
    ):
        self.chunks, self.k, self.exclude_same_doc, self.backend = chunks, k, exclude_same_doc, backend
        self.neighbours = self.scores = None  # (N, k) each, after `reindex`

    def reindex(self, model, bs: int = 128, progress: bool = True) -> dict:
        "New embeddings and neighbour table from `model` (a `MargeModel`); returns statistics of the table."
        t0 = time.perf_counter()
        emb = embed_chunks(model, self.chunks, bs, progress)
        t1 = time.perf_counter()
        idx, val = top_k_neighbours(
            emb, self.k, self.chunks.hashes(), self.chunks.doc if self.exclude_same_doc else None, backend=self.backend
        )
        old, self.neighbours, self.scores = self.neighbours, idx.cpu().numpy(), val.cpu().numpy()
        same_doc = self.chunks.doc[self.neighbours] == self.chunks.doc[:, None]
        changed = (
            None
            if old is None
            else float(np.mean([len(set(a) - set(b)) for a, b in zip(self.neighbours, old)]) / self.k)
        )
        return dict(
            embed_s=t1 - t0,
            search_s=time.perf_counter() - t1,
            n_chunks=len(self.chunks),
            mean_score=float(self.scores.mean()),
            mean_top1=float(self.scores[:, 0].mean()),
            same_doc=float(same_doc.mean()),
            changed=changed,
        )


class _Targets:
    "The dataset of an `EvidenceDL`: target chunk numbers, with the tokenizer (`find_tokenizer`) and the input count."

    n_inp = 5  # targets, their mask, evidence, its mask, labels (the model reads the labels to project only there)

    def __init__(self, idx: np.ndarray, tfm: HFTokenizer):
        self.idx, self.tfm = idx, tfm

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> int:
        return int(self.idx[i])


class EvidenceDL(DataLoader):
    """Batches of target chunks with their current evidence: `(targets (B, T), mask, evidence (B, K, L), mask,
    labels, labels)`; labels are each target's next tokens (-100 at padding and at the end)."""

    def __init__(
        self,
        retriever: Retriever,  # Chunks and neighbour table
        targets,  # Chunk numbers used as targets
        bs: int = 8,  # Batch size
        **kwargs,  # Passed to fastai's `DataLoader` (shuffle, drop_last, device)
    ):
        super().__init__(_Targets(np.asarray(targets, np.int64), retriever.chunks.tfm), bs=bs, **kwargs)
        self.retriever = retriever

    def create_item(self, s: int) -> int:
        return self.dataset[s]

    def create_batch(self, b: list) -> tuple:
        r, b = self.retriever, np.asarray(b)
        if r.neighbours is None:
            raise UlmfitError(
                "no neighbour table yet: fit with the Reindexer callback (marge_learner adds it) "
                "or call learn.reindex()"
            )
        pad = r.chunks.tfm.pad_id
        ids, mask = pad_ids([r.chunks.ids(i) for i in b], pad)  # (B, T)
        ev = r.neighbours[b]  # (B, K)
        ev_ids, ev_mask = pad_ids([r.chunks.ids(i) for i in ev.ravel()], pad)  # (BK, L)
        ev_ids, ev_mask = ev_ids.view(*ev.shape, -1), ev_mask.view(*ev.shape, -1)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # (B, T) the next token
        return (TensorText(ids), mask, ev_ids, ev_mask, labels, labels)

    def new(self, dataset=None, cls=None, **kwargs):
        kw = dict(bs=self.bs, shuffle=self.shuffle, drop_last=self.drop_last, device=self.device) | kwargs
        return EvidenceDL(self.retriever, (self.dataset if dataset is None else dataset).idx, **kw)

    def show_batch(self, max_n: int = 4, show: bool = True, **kwargs) -> pd.DataFrame:
        "The first `max_n` targets beside their current evidence and its relevance, as a table."
        r, rows = self.retriever, []
        if r.neighbours is None:
            self.create_batch([])  # the error that says what to do
        for i in self.dataset.idx[:max_n]:
            row = {"target": r.chunks.text(i)}
            for n, (j, s) in enumerate(zip(r.neighbours[i], r.scores[i]), 1):
                row[f"evidence {n} ({s:.2f})"] = r.chunks.text(j)
            rows.append(row)
        df = pd.DataFrame(rows)
        if show:
            display_df(df)
        return df


def marge_dataloaders(
    source,  # Texts: list, Series, DataFrame, table file, .txt corpus, or a token store
    tokenizer,  # A fast tokenizer, or a model folder / hub name
    max_len: int = 128,  # Tokens per chunk (targets and evidence), special tokens included
    k: int = 4,  # Evidence documents per target
    valid_pct: float = 0.05,  # Share of the documents whose chunks are held-out targets
    bs: int = 8,  # Targets per batch
    seed: int = 42,  # Seed of the split
    exclude_same_doc: bool = True,  # Never retrieve a chunk of the target's own document
    split_docs: bool = True,  # Cut long documents into chunks; False: each document's first `max_len` tokens only
    backend: str = "torch",  # Nearest-neighbour search: "torch" (blocked matrix products) or "faiss" (when installed)
    text_col: str = "text",  # Column with the texts (DataFrame or file)
    docs: str = "lines",  # For a .txt corpus: a document is a line, a file, or a WikiText article
    cache=None,  # Token store cache for a file source (None: the default cache; False: none)
    **kwargs,  # Passed to the DataLoaders (e.g. `device`)
) -> DataLoaders:
    """Marge `DataLoaders` over a token store: every chunk is a retrieval candidate; the chunks of `valid_pct` of the
    documents are the held-out targets. The neighbour table is built by `Reindexer` when a fit starts."""
    tfm = HFTokenizer(tokenizer, max_len)
    store = as_store(source, tfm, cache, text_col=text_col, docs=docs, unk=tfm.tok.unk_token)
    chunks = Chunks(store, tfm, split_docs=split_docs)
    others = len(chunks) - (int(np.bincount(chunks.doc).max()) if exclude_same_doc else 1)
    if not 1 <= k <= others:
        raise UlmfitError(
            f"k={k} evidence chunks asked, but {len(store)} documents ({len(chunks)} chunks) leave a target "
            f"{others} others to retrieve: lower k (--evidence) or add texts"
        )
    retriever = Retriever(chunks, k, exclude_same_doc, backend)
    _, valid_docs = random_split(len(store), valid_pct, seed)
    held = np.isin(chunks.doc, valid_docs)
    train, valid = np.flatnonzero(~held), np.flatnonzero(held)
    if len(train) < bs or not len(valid):
        raise UlmfitError(
            f"{len(store)} documents ({len(chunks)} chunks) give {len(train)} training and {len(valid)} "
            f"held-out targets: need at least bs={bs} and 1; add texts, lower bs or change valid_pct"
        )
    dls = [
        EvidenceDL(retriever, t, bs, shuffle=tr, drop_last=tr, **kwargs) for t, tr in ((train, True), (valid, False))
    ]
    return DataLoaders(*dls, device=kwargs.get("device"))


class Reindexer(Callback):
    """Rebuild the chunk embeddings and the neighbour table when a fit starts and every `every` training steps, with a
    progress bar; `history` has one row of statistics (step, seconds, scores, share changed) per rebuild. fastai
    attaches it as `learn.reindexer`."""

    order = -5  # before the progress bar and the recorder see the first batch

    def __init__(
        self,
        every: int | None = None,  # Training steps between rebuilds (None: only when a fit starts)
        bs: int = 128,  # Chunks per embedding pass
        progress: bool = True,  # Show the embedding progress bar and a line per rebuild
    ):
        self.every, self.bs, self.progress, self.history, self.steps = every, bs, progress, [], 0

    def before_fit(self):
        self.rebuild()

    def after_batch(self):
        if not self.training:
            return
        self.steps += 1  # counted over every fit of this learner
        if self.every and self.steps % self.every == 0:
            self.rebuild()

    def rebuild(self):
        "Rebuild now (also `learn.reindex()`)."
        model = unwrap(self.learn.model).hf  # (inside DistributedDataParallel when distributed)
        stats = self.learn.dls.train.retriever.reindex(model, self.bs, self.progress)
        stats = {"step": self.steps, **stats, "beta": model.beta.item()}
        self.history.append(stats)
        if self.progress:
            print(
                f"reindex at step {stats['step']}: {stats['n_chunks']:,} chunks embedded in {stats['embed_s']:.1f}s, "
                f"searched in {stats['search_s']:.1f}s; mean top-1 cosine {stats['mean_top1']:.3f}"
                + (f", {stats['changed']:.0%} of neighbours changed" if stats["changed"] is not None else ""),
                file=sys.stderr,
            )


class Beta(Metric):
    "The relevance scale beta of the Marge model (a learned scalar), logged with the metrics."

    def reset(self):
        self.beta = None

    def accumulate(self, learn):
        self.beta = unwrap(learn.model).hf.beta.item()

    @property
    def value(self):
        return self.beta

    @property
    def name(self):
        return "beta"
