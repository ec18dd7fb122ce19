import numpy as np
import pytest
import torch

from ulmfit_tx import BlockView, HFTokenizer, MaskTokens, UlmfitError, as_store, mask_tokens, mlm_dataloaders
from ulmfit_tx.tokenize import word_start_table


def _batch(tfm, texts, left=False):
    ids = [torch.as_tensor(x, dtype=torch.long) for x in tfm.encode_batch(texts)]
    n = max(map(len, ids))
    pad = lambda x: torch.cat(
        [x.new_full((n - len(x),), tfm.pad_id), x] if left else [x, x.new_full((n - len(x),), tfm.pad_id)]
    )
    return torch.stack([pad(x) for x in ids])


@pytest.mark.parametrize("left", [False, True])
def test_masking_statistics(bert_dir, sample_df, left):
    torch.manual_seed(0)
    tfm = HFTokenizer(bert_dir, max_len=128)
    ids = _batch(tfm, sample_df.text[:200], left)
    mt = MaskTokens(tfm)
    masked, labels, labels2 = mt((ids,))
    assert labels is labels2
    special = torch.isin(ids, mt.special_ids)
    chosen = labels != -100
    real = (~special).sum().item()
    assert abs(chosen.sum().item() / real - 0.15) < 0.01  # 15% of real tokens, not of padded length
    assert not (chosen & special).any()  # never specials or padding
    assert torch.equal(labels[chosen], ids[chosen])  # labels are the original ids
    assert torch.equal(masked[~chosen], ids[~chosen])  # nothing else changes
    n = chosen.sum().item()
    is_mask = (masked == tfm.tok.mask_token_id) & chosen
    same = (masked == ids) & chosen
    rand = chosen & ~is_mask & ~same
    assert abs(is_mask.sum().item() / n - 0.8) < 0.03
    assert abs(rand.sum().item() / n - 0.1) < 0.03  # random tokens (a few may equal the original)
    assert abs(same.sum().item() / n - 0.1) < 0.03
    assert not torch.isin(masked[rand], mt.special_ids).any()  # random replacements are never special


def test_masking_fractions_are_configurable(bert_dir, sample_df):
    tfm = HFTokenizer(bert_dir, max_len=128)
    ids = _batch(tfm, sample_df.text[:100])
    masked, labels, _ = MaskTokens(tfm, mlm_prob=0.3, mask_frac=1.0, random_frac=0.0)((ids,))
    chosen = labels != -100
    assert abs(chosen.sum().item() / (~torch.isin(ids, MaskTokens(tfm).special_ids)).sum().item() - 0.3) < 0.02
    assert (masked[chosen] == tfm.tok.mask_token_id).all()


def test_every_sequence_gets_a_prediction(bert_dir):
    tfm = HFTokenizer(bert_dir, max_len=16)
    ids = _batch(tfm, ["hi", "ok then"] * 50)
    _, labels, _ = MaskTokens(tfm)((ids,))
    assert ((labels != -100).sum(1) >= 1).all()


@pytest.mark.parametrize("arch", ["bert", "roberta", "albert"])
def test_whole_word_masking_chooses_all_pieces_of_a_word(tiny_models, sample_df, arch):
    torch.manual_seed(0)
    tfm = HFTokenizer(tiny_models[arch], max_len=128)
    ids = _batch(tfm, sample_df.text[:50])
    _, labels, _ = MaskTokens(tfm, whole_word=True)((ids,))
    starts = word_start_table(tfm.tok)[ids]
    chosen = labels != -100
    cont = ~starts & ~torch.isin(ids, MaskTokens(tfm).special_ids)  # continuation pieces
    prev = torch.roll(chosen, 1, dims=1)
    assert cont.any() and torch.equal(chosen[cont], prev[cont])  # a piece is chosen iff the one before it is


def test_blocks_and_docs_dataloaders(bert_dir, sample_df):
    tfm = HFTokenizer(bert_dir, max_len=32)
    store = as_store(sample_df.text[:20].tolist(), tfm)
    idx = [3, 0, 7, 8, 9, 15]  # any documents, in any order
    blocks = [b[0].numpy() for b in BlockView(store, idx, tfm)]
    texts = sample_df.text[:20].iloc[idx]  # the oracle: concatenate with [SEP] and cut
    flat = [t for ids in tfm.token_ids(texts) for t in ids + [tfm.tok.sep_token_id]]
    want = [
        [tfm.tok.cls_token_id] + flat[i : i + 30] + [tfm.tok.sep_token_id] for i in range(0, len(flat) // 30 * 30, 30)
    ]
    assert len(blocks) == len(want) == len(flat) // 30
    assert all(np.array_equal(b, w) for b, w in zip(blocks, want))
    dls = mlm_dataloaders(sample_df.text[:40], bert_dir, max_len=32, bs=8)
    x, lab, y = dls.one_batch()
    assert x.shape == (8, 32) and torch.equal(lab, y) and dls.n_inp == 2
    dls.show_batch(max_n=2)
    docs = mlm_dataloaders(sample_df.text[:40], bert_dir, max_len=64, mode="docs", bs=4)
    x, _, _ = docs.one_batch()
    assert x.shape[0] == 4 and x.shape[1] <= 64


def test_mask_tokens_function_is_vectorised_over_the_batch():
    ids = torch.randint(5, 100, (64, 50))
    masked, labels = mask_tokens(ids, torch.tensor([0, 1, 2, 3, 4]), 4, torch.arange(5, 100))
    assert masked.shape == labels.shape == ids.shape


def test_at_least_one_text_is_held_out_and_too_short_texts_are_named(bert_dir, sample_df):
    dls = mlm_dataloaders(sample_df.text[:40], bert_dir, max_len=32, bs=8, valid_pct=0.001)
    assert len(dls.valid_ds) >= 1
    with pytest.raises(UlmfitError, match="training text.*fill no block of 128"):
        mlm_dataloaders(["short one"] * 20, bert_dir, max_len=128, bs=8)


def test_mlm_head_warmup_trains_head_and_embeddings_before_the_encoder(bert_dir, sample_df):
    "mlm_stages' warm-up (fastai's LM recipe): the encoder layers stay as they were, then every layer trains."
    from ulmfit_tx import fit_stages, mlm_learner, mlm_stages

    learn = mlm_learner(mlm_dataloaders(sample_df.head(40), bert_dir, max_len=32, bs=8), bert_dir)
    start = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    changed = lambda: {n for n, p in learn.model.named_parameters() if not torch.equal(p, start[n])}
    warmup, rest = mlm_stages(1e-4, epochs=1, warmup_epochs=1)
    assert (warmup.depth, warmup.lr, rest.depth, rest.lr) == (1, 1e-3, None, 1e-4)
    with learn.no_bar(), learn.no_logging():
        fit_stages(learn, [warmup])
    first = changed()
    assert any("word_embeddings" in n for n in first) and any(".cls." in n for n in first)
    assert not any(".encoder.layer." in n for n in first)
    rest = mlm_stages(1e-4, epochs=1, warmup_epochs=1, div=2.6)[1]  # ULMFiT's discriminative rates
    assert (rest.depth, rest.lr, rest.div) == (None, 1e-4, 2.6)
    with learn.no_bar(), learn.no_logging():
        fit_stages(learn, [rest])
    assert any(".encoder.layer." in n for n in changed())
    lrs = np.array([h["lr"] for h in learn.opt.hypers])  # the head and embeddings' group is last
    assert len(lrs) >= 3 and np.allclose(lrs[1:] / lrs[:-1], 2.6)
    with pytest.raises(UlmfitError, match="warmup_epochs"):
        mlm_stages(warmup_epochs=-1)
