import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback

from ulmfit_tx import (
    LAYER_DIV,
    MixedPrecision,
    UlmfitError,
    clas_dataloaders,
    classifier_learner,
    fit_ulmfit,
    mlm_dataloaders,
    mlm_learner,
    set_precision,
    ulmfit_lrs,
)
from ulmfit_tx.precision import cpu_has_bf16_matmul, default_precision


def keyword_task(n=96, seed=0):
    "Texts whose label is given by one keyword among filler words: learnable in a few epochs."
    rng = np.random.default_rng(seed)
    filler = "the a movie film plot actor scene story it was and of to in this that".split()
    rows = []
    for i in range(n):
        label = ["neg", "pos"][i % 2]
        words = list(rng.choice(filler, 12))
        words.insert(int(rng.integers(0, 12)), "wonderful" if label == "pos" else "terrible")
        rows.append((" ".join(words), label, i >= n * 3 // 4))
    return pd.DataFrame(rows, columns=["text", "label", "is_valid"])


class Track(Callback):
    "Records, at the first batch of each fit, how many parameters train and the learning rate of every group."

    order = 70  # after fastai's ParamScheduler has set the rates

    def __init__(self):
        self.trainable, self.lrs = [], []

    def before_batch(self):
        if self.training and self.epoch == 0 and self.iter == 0:
            self.trainable.append(sum(p.requires_grad for p in self.model.parameters()))
            self.lrs.append([h["lr"] for h in self.opt.hypers])


def test_classifier_learns_a_keyword_task(bert_dir):
    torch.manual_seed(0)
    dls = clas_dataloaders(keyword_task(), bert_dir, max_len=32, bs=8)
    learn = classifier_learner(dls, bert_dir)
    learn.unfreeze()
    first = learn.validate()[0]
    learn.fit_one_cycle(8, 3e-3)
    loss, acc = learn.validate()
    assert loss < first * 0.5 and acc >= 0.9


def test_mlm_loss_decreases(bert_dir):
    torch.manual_seed(0)
    texts = ["the movie was good and the actor was great"] * 60 + ["the plot was bad and the story was weak"] * 60
    dls = mlm_dataloaders(texts, bert_dir, max_len=32, bs=8, mode="docs")
    learn = mlm_learner(dls, bert_dir)
    before = learn.validate()
    learn.fit_one_cycle(15, 3e-3)
    after = learn.validate()
    assert after[0] < before[0] * 0.3 and after[2] < before[2] and after[1] > before[1]  # loss, ppl down; acc up
    first, second = learn.fill_mask("the [MASK] was bad and the actor was [MASK]")
    assert "plot" in [t for t, _ in first[:2]] and "great" in [t for t, _ in second[:2]]


def test_fit_ulmfit_unfreezes_gradually_with_discriminative_rates(bert_dir, small_df):
    dls = clas_dataloaders(small_df, bert_dir, max_len=32, bs=8)
    track = Track()
    learn = classifier_learner(dls, bert_dir, cbs=track)
    n_groups = len(learn.opt.param_lists)
    sizes = [sum(1 for _ in g) for g in learn.opt.param_lists]
    fit_ulmfit(learn, lr=1e-3, epochs=1, stage_div=2.0)
    assert track.trainable == [sum(sizes[-1:]), sum(sizes[-2:]), sum(sizes[-3:]), sum(sizes)]
    for stage, lrs in enumerate(track.lrs):
        want = 1e-3 / 2**stage / LAYER_DIV ** np.arange(n_groups - 1, -1, -1)
        np.testing.assert_allclose(np.array(lrs) * 25, want, rtol=1e-6)  # one-cycle starts at lr_max/25


def test_ulmfit_lrs_and_stage_errors(bert_dir, small_df):
    learn = classifier_learner(clas_dataloaders(small_df, bert_dir, max_len=32), bert_dir)
    lrs = ulmfit_lrs(learn, 1e-2)
    assert len(lrs) == len(learn.opt.param_lists) and lrs[-1] == 1e-2 and np.allclose(lrs[1:] / lrs[:-1], LAYER_DIV)
    assert np.allclose(ulmfit_lrs(learn, 1e-2, div=2.6), 1e-2 / 2.6 ** np.arange(len(lrs) - 1, -1, -1))
    with pytest.raises(UlmfitError, match="3 epoch counts for 4 stages"):
        fit_ulmfit(learn, epochs=(1, 1, 1))
    with pytest.raises(UlmfitError, match="div must be positive"):
        fit_ulmfit(learn, div=0)


@pytest.mark.parametrize("task", ["clf", "mlm"])
def test_lr_find_runs_on_both_learners(bert_dir, small_df, task):
    if task == "clf":
        learn = classifier_learner(clas_dataloaders(small_df, bert_dir, max_len=32, bs=4), bert_dir)
    else:
        learn = mlm_learner(mlm_dataloaders(small_df, bert_dir, max_len=32, bs=4), bert_dir)
    res = learn.lr_find(num_it=15, show_plot=False)
    assert 1e-7 < res.valley < 10


def test_precision_choice(bert_dir, small_df):
    learn = classifier_learner(clas_dataloaders(small_df, bert_dir, max_len=32), bert_dir)
    amp = lambda l: [c for c in l.cbs if isinstance(c, MixedPrecision)]
    assert default_precision("cpu") == ("bf16" if cpu_has_bf16_matmul() else "fp32")
    if not torch.cuda.is_available():
        assert len(amp(learn)) == (default_precision() == "bf16")  # auto
    learn = classifier_learner(clas_dataloaders(small_df, bert_dir, max_len=32), bert_dir, precision="fp32")
    assert not amp(learn)
    assert len(amp(set_precision(learn, "bf16"))) == 1
    with pytest.raises(UlmfitError, match="precision must be auto, fp32, fp16 or bf16, not 'fp8'"):
        set_precision(learn, "fp8")
    if not torch.cuda.is_available():
        with pytest.raises(UlmfitError, match="fp16 needs a CUDA GPU, not cpu: use bf16 or fp32"):
            set_precision(learn, "fp16")


@pytest.mark.parametrize(
    "amx,avx512_bf16,expected", [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")]
)
def test_cpu_precision_follows_bf16_instructions(monkeypatch, amx, avx512_bf16, expected):
    "auto is bf16 on a CPU with AMX (Intel) or AVX512-BF16 (AMD Zen 4), where bf16 products are native, else float32."
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert cpu_has_bf16_matmul() == (expected == "bf16") and default_precision("cpu") == expected


def test_bf16_on_cpu_autocasts_and_keeps_float32_weights(bert_dir):
    "bf16 on the CPU (fastai's own MixedPrecision only autocasts on CUDA): the training batches' matrix products run"
    """in bf16, weights, gradients and optimizer state stay float32, the model learns; validation and predictions:
    float32."""
    seen = []
    hook = lambda m, i, o: seen.append(o.dtype)
    torch.manual_seed(0)
    dls = clas_dataloaders(keyword_task(), bert_dir, max_len=32, bs=8, device="cpu")
    learn = classifier_learner(dls, bert_dir, precision="bf16")
    learn.unfreeze()
    lin = next(m for m in learn.model.hf.modules() if isinstance(m, torch.nn.Linear))
    handle = lin.register_forward_hook(hook)
    first = learn.validate()[0]
    assert set(seen) == {torch.float32}
    learn.fit_one_cycle(8, 3e-3)
    assert seen.count(torch.bfloat16) == len(seen) - 9 * len(dls.valid) > 0  # training batches only
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    assert all(
        v.dtype == torch.float32 for s in learn.opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim
    )
    loss, acc = learn.validate()
    assert loss < first * 0.5 and acc >= 0.9
    seen.clear()
    probs = learn.predict_texts(["the movie was wonderful", "the movie was terrible"])
    handle.remove()
    assert list(probs.label) == ["pos", "neg"] and set(seen) == {torch.float32}


def test_model_errors(tiny_models, small_df, tmp_path):
    dls = clas_dataloaders(small_df, tiny_models["bert"], max_len=256)
    with pytest.raises(UlmfitError, match="max_len 256 is larger than .*128 positions"):
        classifier_learner(dls, tiny_models["bert"])
    rob = clas_dataloaders(small_df, tiny_models["roberta"], max_len=32)
    small_vocab = tmp_path / "small"
    from transformers import AutoModelForMaskedLM

    m = AutoModelForMaskedLM.from_pretrained(tiny_models["bert"])
    m.resize_token_embeddings(100)
    m.save_pretrained(small_vocab)
    with pytest.raises(UlmfitError, match="tokenizer has 600 tokens but the model's vocabulary 100"):
        classifier_learner(rob, small_vocab)
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(UlmfitError, match="is a file"):
        classifier_learner(rob, tmp_path / "file.bin")
