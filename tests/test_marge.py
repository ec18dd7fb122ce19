"Marge: the model, exact retrieval, the evidence DataLoader, reindexing, the learner, the CLI, and a paraphrase task."

import json

import numpy as np
import pytest
import torch

from ulmfit_tx.cli import main
from ulmfit_tx.encoders import MargeConfig, MargeModel, ScratchConfig
from ulmfit_tx.errors import UlmfitError
from ulmfit_tx.kernels import Dropout
from ulmfit_tx.learner import classifier_learner, marge_learner
from ulmfit_tx.models import marge_model
from ulmfit_tx.retrieval import Chunks, Retriever, marge_dataloaders, pad_ids, top_k_neighbours
from ulmfit_tx.schedule import fit_marge
from ulmfit_tx.store import build_store
from ulmfit_tx.tokenize import HFTokenizer
from ulmfit_tx.train_tokenizer import train_tokenizer

NO_DROP = dict(hidden_dropout=0.0, attn_dropout=0.0, attn_layer_dropout=0.0, ff_dropout=0.0)


def tiny_marge(**kw) -> MargeModel:
    cfg = dict(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        retrieval_layer=2,
        self_layers=1,
        cross_layers=2,
        max_position_embeddings=32,
        **NO_DROP,
    )
    torch.manual_seed(0)
    return MargeModel(MargeConfig(**{**cfg, **kw})).eval()


def batch(B=3, K=4, T=10, L=12, seed=0):
    "Targets and evidence with some right padding; labels are the next tokens."
    g = torch.Generator().manual_seed(seed)
    ids, ev = torch.randint(5, 50, (B, T), generator=g), torch.randint(5, 50, (B, K, L), generator=g)
    mask, ev_mask = torch.ones(B, T, dtype=torch.bool), torch.ones(B, K, L, dtype=torch.bool)
    mask[0, -3:], ev_mask[1, 2, -5:] = False, False
    ids[~mask], ev[~ev_mask] = 0, 0
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return ids, mask, ev, ev_mask, labels


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_top_k_equals_brute_force_cosine(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(300, 16), dim=-1)
    hashes = np.arange(300) % 290  # rows i and i+290 are "duplicates"
    groups = np.arange(300) // 3  # chunks of one document, three each
    idx, val = top_k_neighbours(emb, 5, hashes, groups, block=37, backend=backend)
    sim = (emb @ emb.T).numpy()
    bad = (hashes[:, None] == hashes[None]) | (groups[:, None] == groups[None])
    sim[bad] = -np.inf
    want = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    np.testing.assert_allclose(val.numpy(), np.take_along_axis(sim, want, 1), atol=1e-6)
    assert (np.sort(idx.numpy(), 1) == np.sort(want, 1)).mean() > 0.999  # equal up to exact ties
    assert not bad[np.arange(300)[:, None], idx.numpy()].any()


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_top_k_searches_again_when_candidates_run_out(backend):
    "A row whose nearest candidates are all duplicates of itself still gets k allowed neighbours."
    if backend == "faiss":
        pytest.importorskip("faiss")
    emb = torch.nn.functional.normalize(
        torch.cat([torch.ones(30, 4) + 1e-3 * torch.randn(30, 4), torch.randn(10, 4)]), dim=-1
    )
    hashes = np.r_[np.zeros(30, np.int64), np.arange(1, 11)]  # the 30 near-identical rows are duplicates
    idx, _ = top_k_neighbours(emb, 3, hashes, backend=backend)
    assert (idx[:30] >= 30).all()
    with pytest.raises(UlmfitError, match="neighbours asked"):
        top_k_neighbours(emb[:3], 3)


def test_loss_invariant_to_evidence_order_and_beta_zero_ignores_scores():
    m = tiny_marge()
    ids, mask, ev, ev_mask, labels = batch()
    loss = m(ids, mask, ev, ev_mask, labels).loss
    perm = torch.tensor([2, 0, 3, 1])
    permuted = m(ids, mask, ev[:, perm], ev_mask[:, perm], labels)
    torch.testing.assert_close(permuted.loss, loss)
    torch.testing.assert_close(permuted.scores, m(ids, mask, ev, ev_mask, labels).scores[:, perm])
    # the centre moves every g (so every score) but no evidence token state: only beta * scores can see it
    with torch.no_grad():
        m.center.normal_()
    assert not torch.equal(m(ids, mask, ev, ev_mask, labels).logits, permuted.logits)
    with torch.no_grad():
        m.beta.zero_()
    a = m(ids, mask, ev, ev_mask, labels)
    with torch.no_grad():
        m.center.normal_()
    b = m(ids, mask, ev, ev_mask, labels)
    assert not torch.allclose(a.scores, b.scores)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)


def test_reconstruction_loss_reaches_the_retriever():
    "The scores carry gradient, and the layers below the retrieval layer get some through the target's g(x) alone."
    m = tiny_marge().train()
    ids, mask, ev, ev_mask, labels = batch()
    h, scores = m.decode(ids, mask, ev, ev_mask)
    scores.retain_grad()
    torch.nn.functional.cross_entropy(m.logits(h).flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    assert scores.grad.abs().sum() > 0 and m.beta.grad.abs() > 0
    m.zero_grad()
    ids2 = ids.clone()
    ids2[:, 0] = 7  # the decoder never reads position 0's prediction...
    gx = m.encode(ids2, mask, states=False)[0]  # ...but g(x) reads the whole target
    gx.sum().backward()
    assert m.encoder.layers[0].attn.q.weight.grad.abs().sum() > 0
    assert m.encoder.layers[2].attn.q.weight.grad is None  # the pass stopped at the retrieval layer (2 of 3)


def test_configured_heads_and_dropouts_are_used():
    m = tiny_marge(
        num_attention_heads=8, hidden_dropout=0.11, attn_dropout=0.22, attn_layer_dropout=0.33, ff_dropout=0.44
    )
    dec = m.decoder
    assert dec.drop.p == 0.11
    for block in list(dec.self_layers) + list(dec.cross_layers):
        attns = [block.attn] + ([block.cross] if hasattr(block, "cross") else [])
        assert all(a.heads == 8 and a.attn_dropout == 0.22 and a.drop.p == 0.33 for a in attns)
        assert [d.p for d in block.ff if isinstance(d, Dropout)] == [0.44, 0.44]
    assert len(dec.cross_layers) == 2 and len(dec.self_layers) == 1
    ids, mask, ev, ev_mask, labels = batch()
    m.train()
    assert not torch.allclose(m(ids, mask, ev, ev_mask).logits, m(ids, mask, ev, ev_mask).logits)  # dropout is on
    m.eval()
    torch.testing.assert_close(m(ids, mask, ev, ev_mask).logits, m(ids, mask, ev, ev_mask).logits)


def test_config_is_validated():
    with pytest.raises(ValueError, match="retrieval_layer 4"):
        tiny_marge(retrieval_layer=4)
    with pytest.raises(ValueError, match="at least one cross-attention"):
        tiny_marge(cross_layers=0)


@pytest.mark.parametrize("arch", ["scratch", "bert", "roberta", "albert", "distilbert"])
def test_every_encoder_family_and_padding_does_not_change_a_document_embedding(arch, tiny_models):
    src = tiny_models["bert"] if arch == "scratch" else tiny_models[arch]
    tok = HFTokenizer(src).tok
    if arch == "scratch":
        cfg = ScratchConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
        )
        m = marge_model(cfg, tok, retrieval_layer=2).hf.eval()
    else:
        m = marge_model(src, tok, retrieval_layer=2).hf.eval()
    docs = [
        np.array(tok("a short review")["input_ids"]),
        np.array(tok("a much longer review of a film with many words")["input_ids"]),
    ]
    alone = m.encode(*pad_ids(docs[:1], tok.pad_token_id), states=False)[0]
    together = m.encode(*pad_ids(docs, tok.pad_token_id), states=False)[0]
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)
    ids, mask = pad_ids(docs, tok.pad_token_id)  # a whole forward: evidence (2, 2, L), loss, gradient
    out = m.train()(
        ids, mask, ids[[1, 0]][:, None].expand(2, 2, -1), mask[[1, 0]][:, None].expand(2, 2, -1), labels=ids
    )
    assert out.logits.shape == (*ids.shape, len(tok)) and out.scores.shape == (2, 2)
    out.loss.backward()
    assert m.beta.grad is not None


def test_marge_round_trip_and_encoder_hands_off_to_the_classifier(tiny_models, tmp_path, small_df):
    src = tiny_models["bert"]
    dls = marge_dataloaders(small_df.text.tolist(), src, max_len=32, k=2, bs=4, valid_pct=0.1, cache=False)
    learn = marge_learner(dls, src, retrieval_layer=1, self_layers=1, cross_layers=1, progress=False)
    learn.reindex()
    b = dls.valid.one_batch()
    learn.model.eval()
    before = learn.model(*b[:5])
    learn.save_marge(tmp_path / "marge")
    learn.save_pretrained(tmp_path / "enc")
    again = marge_learner(dls, tmp_path / "marge", progress=False)
    again.model.eval()
    torch.testing.assert_close(again.model(*b[:5]), before)
    torch.testing.assert_close(again.model.hf.center, learn.model.hf.center)
    with pytest.raises(UlmfitError, match="Marge model already"):
        marge_learner(dls, tmp_path / "marge", retrieval_layer=1)
    # the encoder folder is an ordinary BERT folder with the adapted weights
    from ulmfit_tx.data import clas_dataloaders

    clf = classifier_learner(clas_dataloaders(small_df, tmp_path / "enc", max_len=32, bs=8), tmp_path / "enc")
    torch.testing.assert_close(
        clf.model.hf.embeddings.word_embeddings.weight, learn.model.hf.encoder.embeddings.word_embeddings.weight
    )
    table = dls.train.show_batch(max_n=2, show=False)
    assert list(table.columns[:2]) == [
        "target",
        "evidence 1 ({:.2f})".format(dls.train.retriever.scores[dls.train_ds.idx[0], 0]),
    ]


def test_chunks_duplicates_and_own_document_are_never_evidence(tiny_models, tmp_path):
    tfm = HFTokenizer(tiny_models["bert"], 12)
    texts = ["the film was good and the actors were fine but the ending was long and slow"] * 3 + [
        f"review {i} says the plot is thin" for i in range(8)
    ]
    store = build_store(texts, tfm, tmp_path / "store", progress=False)
    chunks = Chunks(store, tfm)
    assert len(chunks) > len(texts) and (chunks.length <= 10).all()
    assert (
        np.concatenate([chunks.tokens(i) for i in np.flatnonzero(chunks.doc == 0)]).tolist() == store.doc(0).tolist()
    )
    r = Retriever(chunks, k=3)
    r.reindex(tiny_marge(vocab_size=tfm.tok.vocab_size, pad_token_id=tfm.pad_id), progress=False)
    h = chunks.hashes()
    assert not (h[r.neighbours] == h[:, None]).any()  # no exact duplicate (nor itself)
    assert not (chunks.doc[r.neighbours] == chunks.doc[:, None]).any()  # no chunk of its own document


def paraphrase_corpus(n: int = 1000, length: int = 16, vocab: int = 300, seed: int = 0):
    "n random 'documents' of made-up words, then a noisy rewrite of each (words dropped, swapped, replaced)."
    rng = np.random.default_rng(seed)
    words = [f"w{i}x" for i in range(vocab)]
    src = [[words[j] for j in rng.integers(0, vocab, length)] for _ in range(n)]

    def rewrite(d):
        d = [w for w in d if rng.random() > 0.1]
        for i in range(len(d) - 1):
            if rng.random() < 0.1:
                d[i], d[i + 1] = d[i + 1], d[i]
        return [words[rng.integers(vocab)] if rng.random() < 0.1 else w for w in d]

    return [" ".join(d) for d in src] + [" ".join(rewrite(d)) for d in src]


def test_marge_learns_to_retrieve_paraphrase_sources(tmp_path):
    """Targets are noisy rewrites of one source document each: training raises recall@1 of the true source above
    0.9 (chance 1/1999), and the decoder uses the evidence: its loss is lower with retrieved than random evidence."""
    n = 1000
    texts = paraphrase_corpus(n)
    tok = train_tokenizer(texts, "wordpiece", 350)
    torch.manual_seed(0)
    cfg = ScratchConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        pad_token_id=tok.pad_token_id,
        **NO_DROP,
    )
    dls = marge_dataloaders(texts, tok, max_len=24, k=4, bs=32, valid_pct=0.1, cache=False)
    learn = marge_learner(
        dls, cfg, retrieval_layer=1, self_layers=1, cross_layers=1, reindex_every=50, progress=False, **NO_DROP
    )
    r = dls.train.retriever
    assert (r.chunks.doc == np.arange(2 * n)).all()  # one chunk per document

    def recall():
        learn.reindex()
        return float((r.neighbours[n:, 0] == np.arange(n)).mean())

    before = recall()
    fit_marge(learn, 3e-3, warmup_epochs=8, epochs=4, encoder_div=1)  # a fresh encoder: the decoder's rate
    after = recall()
    print(
        f"paraphrase recall@1: {before:.3f} at initialisation, {after:.3f} after training "
        f"(chance {1 / (2 * n - 1):.4f})"
    )
    assert after >= 0.9 and after > before
    assert any(h["changed"] for h in learn.reindexer.history[1:])  # reindexing while training changes the table
    retrieved = learn.validate()[0]
    r.neighbours = np.random.default_rng(0).integers(0, 2 * n, r.neighbours.shape)
    random_ev = _loss_without_reindex(learn)
    print(
        f"held-out reconstruction loss: {retrieved:.3f} with retrieved evidence, {random_ev:.3f} with random evidence"
    )
    assert retrieved < random_ev - 0.5, (retrieved, random_ev)


def _loss_without_reindex(learn) -> float:
    "The held-out loss with the neighbour table as it is now (validate() would rebuild it first)."
    cb = learn.reindexer
    learn.remove_cb(cb)
    try:
        return learn.validate()[0]
    finally:
        learn.add_cb(cb)


def test_pretrain_marge_cli_then_train_clf(tiny_models, tmp_path, sample_df):
    data = tmp_path / "d.csv"
    sample_df.head(60).to_csv(data, index=False)
    out = tmp_path / "marge_out"
    assert (
        main(
            [
                "pretrain-marge",
                "--data",
                str(data),
                "--model",
                str(tiny_models["bert"]),
                "--out",
                str(out),
                "--max-len",
                "32",
                "--bs",
                "8",
                "--evidence",
                "2",
                "--reindex-every",
                "10",
                "--self-layers",
                "1",
                "--cross-layers",
                "1",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["retrieval_layer"] == 1 and len(m["per_epoch"]) == 2 and m["reindex"][0]["step"] == 0
    assert any(h["step"] > 0 for h in m["reindex"]) and np.isfinite(m["valid_loss"])
    assert (out / "loss.png").exists() and (out / "marge" / "config.json").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    assert (
        main(
            [
                "train-clf",
                "--data",
                str(data),
                "--model",
                str(out),
                "--out",
                str(tmp_path / "clf"),
                "--max-len",
                "32",
                "--schedule",
                "one-cycle",
                "--bs",
                "8",
            ]
        )
        == 0
    )
    # wrong settings are refused before any work
    assert (
        main(
            [
                "pretrain-marge",
                "--data",
                str(data),
                "--model",
                str(tiny_models["bert"]),
                "--out",
                str(tmp_path / "x"),
                "--retrieval-layer",
                "5",
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "pretrain-marge",
                "--data",
                str(data),
                "--model",
                str(out / "marge"),
                "--out",
                str(tmp_path / "x"),
                "--cross-layers",
                "3",
            ]
        )
        == 2
    )  # a saved Marge model keeps its own decoder
    with pytest.raises(UlmfitError, match="k=5000 evidence chunks asked"):
        marge_dataloaders(str(data), tiny_models["bert"], max_len=32, k=5000)
    assert not (tmp_path / "x").exists()
