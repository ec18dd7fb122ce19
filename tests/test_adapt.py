"Stage 2 for sentence-embedding encoders: contrastive (SimCSE) adaptation, in Python and through `finetune-lm`."

import json

import pytest
import torch
from fastai.torch_core import set_seed
from transformers import AutoModel, AutoTokenizer

from tests.conftest import reviews_csv
from ulmfit_tx import (
    SimCSELoss,
    UlmfitError,
    clas_dataloaders,
    classifier_learner,
    contrastive_dataloaders,
    contrastive_learner,
    has_mlm_head,
)
from ulmfit_tx.cli import main


@pytest.fixture(scope="module")
def encoder_only(tiny_models, tmp_path_factory):
    "The tiny BERT saved without its MLM head (`BertModel`), as sentence-embedding models are."
    out = tmp_path_factory.mktemp("encoder_only")
    AutoModel.from_pretrained(tiny_models["bert"]).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_models["bert"]).save_pretrained(out)
    return out


def test_simcse_loss_rewards_views_of_the_same_text():
    torch.manual_seed(0)
    a = torch.randn(8, 16)
    matched = torch.cat([a, a + 0.01 * torch.randn(8, 16)])  # (2B, D): row i and 8 + i views of one text
    shuffled = torch.cat([a, a[torch.randperm(8)]])
    loss = SimCSELoss(0.05)
    assert loss(matched) < 0.01 < loss(shuffled)
    z = matched.clone().requires_grad_()
    loss(z).backward()
    assert z.grad.shape == (16, 16) and z.grad.abs().sum() > 0
    with pytest.raises(UlmfitError, match="temperature must be positive"):
        SimCSELoss(0)


def test_contrastive_learner_learns_and_hands_its_encoder_to_the_classifier(encoder_only, small_df, tmp_path):
    dls = contrastive_dataloaders(small_df, encoder_only, max_len=32, valid_pct=0.25, bs=8, seed=0)
    ids, doc = dls.one_batch()  # one input; the target, the texts' indices, only because fastai wants one
    assert ids.shape[0] == 8 == len(doc.unique()) and dls.train.n_inp == 1
    learn = contrastive_learner(dls, encoder_only, halves=False, precision="fp32")  # views a tiny model learns
    learn.model.eval()
    with torch.no_grad():
        z = learn.model(ids)
    assert z.shape == (16, 32) and not torch.allclose(z[:8], z[8:])  # two dropout views, even in eval mode
    set_seed(0, reproducible=True)
    before = learn.validate()[0]
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(3, 1e-3)
    after = learn.validate()
    assert after[0] < before and 0 <= after[1] <= 1, (before, after)
    learn.save_pretrained(tmp_path / "adapted")
    clf = classifier_learner(clas_dataloaders(small_df, tmp_path / "adapted", max_len=32), tmp_path / "adapted")
    adapted = learn.model.hf.state_dict()
    assert all(torch.equal(adapted[k], v) for k, v in clf.model.hf.state_dict().items() if k in adapted)


def test_finetune_lm_picks_the_objective_by_the_checkpoint(tiny_models, encoder_only, sample_df, tmp_path):
    data = reviews_csv(tmp_path, sample_df, 40, 10)
    assert has_mlm_head(tiny_models["bert"]) and not has_mlm_head(encoder_only)
    common = ["--data", str(data), "--max-len", "32", "--bs", "8", "--epochs", "1"]
    assert main(["finetune-lm", "--model", str(encoder_only), "--out", str(tmp_path / "auto"), *common]) == 0
    m = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert m["objective"] == "simcse" and m["lr"] == 5e-5 and m["halves"] is True and 0 <= m["view_accuracy"] <= 1
    assert m["contrastive_loss"] > 0 and "masked_accuracy" not in m
    assert (tmp_path / "auto" / "model.safetensors").is_file() and not has_mlm_head(tmp_path / "auto")
    assert main(["finetune-lm", "--model", str(tiny_models["bert"]), "--out", str(tmp_path / "mlm"), *common]) == 0
    assert json.loads((tmp_path / "mlm" / "metrics.json").read_text())["objective"] == "mlm"
    simcse = ["finetune-lm", "--objective", "simcse", "--out", str(tmp_path / "x"), *common]
    assert main([*simcse, "--model", str(encoder_only), "--temperature", "0"]) == 2  # refused before any work
    assert not (tmp_path / "x").exists()


def _views(learn, ids):
    "The token masks (2B, L) the model's two views read for `ids`, caught at `embed`; and the real and special tokens."
    seen = []
    learn.model.embed = lambda both, mask: seen.append(mask) or torch.zeros(len(both), 4)
    learn.model(ids)
    return seen[0], ids != learn.model.pad_id, torch.isin(ids, learn.model.special_ids)


def test_deletion_leaves_tokens_out_of_the_second_view_only(encoder_only, small_df):
    dls = contrastive_dataloaders(small_df, encoder_only, max_len=32, bs=8, seed=0)
    learn = contrastive_learner(dls, encoder_only, deletion=0.5, halves=False, precision="fp32")
    ids, _ = dls.one_batch()
    mask, real, special = _views(learn, ids)
    assert torch.equal(mask[:8], real)  # the first views read every token
    kept = mask[8:][real].float().mean()
    assert 0.3 < kept < 0.7 and mask[8:][special & real].all() and not mask[8:][~real].any()
    with pytest.raises(UlmfitError, match="deletion must be in"):
        contrastive_learner(dls, encoder_only, deletion=1.0)


def test_halves_give_each_view_one_half_of_the_text(encoder_only, small_df):
    dls = contrastive_dataloaders(small_df, encoder_only, max_len=32, bs=8, seed=0)
    ids, _ = dls.one_batch()
    mask, real, special = _views(contrastive_learner(dls, encoder_only, precision="fp32"), ids)  # the default
    first, second = mask[:8], mask[8:]
    assert torch.equal(first | second, real) and not (first & second & ~special).any()  # split, no token shared
    sizes = (first & ~special).sum(1) - (second & ~special).sum(1)
    assert sizes.abs().max() <= 2 and (first[:, 0] & second[:, 0]).all()  # even halves; both read [CLS]
