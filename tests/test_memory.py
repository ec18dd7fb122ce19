"""Memory encoders inside fastai: the segment DataLoader, MemoryCallback, learners, splitters, export,
the pretrain command, and the synthetic long-range task that only a memory can solve."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from fastai.callback.core import Callback
from fastai.learner import load_learner
from torch import nn
from transformers import AutoModelForMaskedLM

import ulmfit_tx  # noqa: F401
from ulmfit_tx import clas_dataloaders, classifier_learner, mlm_dataloaders, mlm_learner
from ulmfit_tx.archs import clas_splitter, lm_splitter
from ulmfit_tx.cli import main
from ulmfit_tx.encoders import CompressiveConfig, MemXLConfig
from ulmfit_tx.io import read_corpus
from ulmfit_tx.memory import MemoryCallback, SegmentDL
from ulmfit_tx.pretrain import pretrain_learner

from .conftest import N_LAYERS, OWN_ARCHS, ROOT, SEGMENT

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def test_segment_dl_feeds_each_document_in_order_to_one_row(own_models, sample_df):
    texts = sample_df.text.tolist()[:12]
    dls = mlm_dataloaders(
        texts,
        own_models["memxl"],
        max_len=2 * SEGMENT,
        mode="segments",
        bs=4,
        valid_pct=0.25,
        mask_frac=0.0,
        random_frac=0.0,
    )  # chosen tokens stay as they are: the batches show the raw ids
    dl = dls.train
    assert isinstance(dl, SegmentDL) and dl.n_inp == 3
    docs = {tuple(dl.dataset[i][0].tolist()) for i in range(len(dl.dataset))}
    rebuilt, current = set(), {}
    for _ in range(2):  # two epochs: shuffling reorders documents inside rows, never chunks inside a document
        for ids, labels, starts, _ in dl:
            assert ids.shape == (dl.bs, 2 * SEGMENT) and ((labels == -100) | (labels == ids)).all()
            for r in range(dl.bs):
                if starts[r]:
                    if current.get(r):
                        rebuilt.add(tuple(current[r]))
                    current[r] = []
                current.setdefault(r, []).extend(t for t in ids[r].tolist() if t != dl.pad_id)
        rebuilt.update(tuple(c) for c in current.values() if c)
        assert rebuilt == docs
        rebuilt, current = set(), {}
    dls.show_batch(max_n=2)


@pytest.mark.parametrize("arch", ["memxl", "compressive"])
def test_memory_learner_trains_carries_and_resets(own_models, sample_df, arch):
    d = own_models[arch]
    dls = mlm_dataloaders(sample_df.text.tolist()[:24], d, max_len=2 * SEGMENT, mode="segments", bs=4)
    learn = mlm_learner(dls, d)
    assert any(isinstance(c, MemoryCallback) for c in learn.cbs)
    seen, aux = [], []

    class Watch(Callback):
        order = MemoryCallback.order + 1

        def before_batch(self):
            seen.append((self.training, self.learn.model.memories is not None, len(self.learn.xb)))

        def after_loss(self):
            if self.training:
                aux.append(float((self.learn.loss_grad - self.learn.loss).detach()))

    learn.add_cb(Watch())
    before = learn.validate()[0]
    learn.fit_one_cycle(2, 3e-3)
    after = learn.validate()[0]
    assert after < before, "MLM loss must go down"
    train = [s for s in seen if s[0] is True]
    assert train[0][1] is False and any(s[1] for s in train), "memories start empty and are carried between batches"
    assert all(s[2] == 2 for s in seen), "the flags are taken out of the inputs"
    assert any(a > 0 for a in aux) == (arch == "compressive"), "the auxiliary loss is added (compressive only)"
    assert learn.model.memories is None, "memories are dropped after fitting"
    learn.lr_find(num_it=5, show_plot=False)


@pytest.mark.parametrize("arch", OWN_ARCHS)
def test_own_encoders_split_freeze_export_and_predict(own_models, small_df, tmp_path, arch):
    d = own_models[arch]
    max_len = 4 * SEGMENT if arch != "scratch" else 64  # memory encoders read 4 segments of each review
    learn = classifier_learner(clas_dataloaders(small_df, d, max_len=max_len, bs=8), d)
    groups = clas_splitter(learn.model)
    assert len(groups) == N_LAYERS + 2
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(learn.model.parameters()))
    assert {id(p) for p in learn.model.hf.embed_norm.parameters()} <= {id(p) for p in groups[0]}, (
        "embedding norm with the embeddings"
    )
    learn.freeze_to(-2)
    top = {id(p) for g in learn.opt.param_lists[-2:] for p in g}
    assert all(p.requires_grad == (id(p) in top) for p in learn.model.parameters())
    norms = [p for m in learn.model.modules() if isinstance(m, torch.nn.RMSNorm) for p in m.parameters()]
    assert norms and all(not learn.opt.state[p].get("do_wd", True) for p in norms), "no weight decay on RMSNorm"
    learn.fit_one_cycle(1, 1e-3)
    learn.export(tmp_path / "export.pkl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = load_learner(tmp_path / "export.pkl")
    text = small_df.text[0]
    assert back.predict(text)[0] == learn.predict(text)[0]
    assert torch.allclose(back.predict(text)[2], learn.predict(text)[2], atol=1e-5)
    lm = mlm_learner(mlm_dataloaders(small_df, d, max_len=2 * SEGMENT), d)
    assert len(lm_splitter(lm.model)) == N_LAYERS + 1


def test_memory_classifier_reads_past_the_first_segment(own_models, small_df):
    d = own_models["memxl"]
    learn = classifier_learner(clas_dataloaders(small_df, d, max_len=8 * SEGMENT, bs=8), d)
    ids = learn.tokenizer.encode_batch([small_df.text[0]])[0]
    assert len(ids) > 2 * SEGMENT
    learn.model.eval()
    x = torch.tensor(ids)[None]
    changed = x.clone()
    changed[0, -3] = (changed[0, -3] + 1) % 500 + 5  # a token in the last segment
    assert not torch.allclose(learn.model(x), learn.model(changed)), "the classifier must read the whole text"


# the long-range task: a key shown in the first segment, asked for NSEG-1 segments later ------------------------
V, S, K = 40, 8, 8
SMALL = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    hidden_dropout=0.0,
    attn_dropout=0.0,
    attn_layer_dropout=0.0,
    ff_dropout=0.0,
    segment_len=S,
)


def _recall_batch(B, nseg, g):
    keys = torch.randint(5, 5 + K, (B,), generator=g)
    x = torch.randint(5 + K, V, (B, nseg * S), generator=g)  # noise never uses a key id
    x[:, 1], x[:, (nseg - 1) * S + 3] = keys, 1  # the key, and the mask asking for it
    y = torch.full_like(x, -100)
    y[:, (nseg - 1) * S + 3] = keys
    return x, y


def _recall_accuracy(config, nseg=3, steps=300) -> float:
    torch.manual_seed(0)
    m = AutoModelForMaskedLM.from_config(config)
    opt = torch.optim.AdamW(m.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = _recall_batch(32, nseg, g)
        loss = m(x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    x, y = _recall_batch(512, nseg, torch.Generator().manual_seed(1))
    with torch.no_grad():
        pred = m(x).logits[:, (nseg - 1) * S + 3].argmax(-1)
    return (pred == y[:, (nseg - 1) * S + 3]).float().mean().item()


@pytest.mark.parametrize(
    "name,config,nseg,steps",
    [
        ("memxl short-term memory", MemXLConfig(**SMALL, mem_len=2 * S, lmem_len=0), 3, 300),
        (
            "compressive: only the compressed memory holds the key",
            CompressiveConfig(**SMALL, mem_len=S, cmem_len=4, cmem_ratio=2),
            3,
            400,
        ),
        ("memxl long-term memory only", MemXLConfig(**SMALL, mem_len=0, lmem_len=4), 2, 400),
    ],
)
def test_memory_solves_the_long_range_task_and_no_memory_cannot(name, config, nseg, steps, record_property):
    with_memory = _recall_accuracy(config, nseg, steps)
    without = _recall_accuracy(
        type(config)(**{**config.to_dict(), "mem_len": 0, "lmem_len": 0, "cmem_len": 0}), nseg, steps
    )
    record_property("accuracy_with_memory", with_memory)
    record_property("accuracy_without_memory", without)
    print(f"\n{name}: accuracy with memory {with_memory:.3f}, without {without:.3f} (chance {1 / K:.3f})")
    assert with_memory > 0.9 and without < 0.3, (name, with_memory, without)


# pretraining from scratch ----------------------------------------------------------------------------------
@pytest.mark.skipif(not WIKI.exists(), reason="needs ../shared/data/wikitext-2")
def test_read_corpus_splits_wikitext_articles():
    articles, lines = read_corpus(WIKI, "articles"), read_corpus(WIKI, "lines")
    assert 50 <= len(articles) < len(lines) and articles[0].startswith("= Homarus gammarus =")


@pytest.mark.parametrize("arch", ["scratch", "compressive", "roberta"])
def test_cli_pretrain_writes_a_folder_the_pipeline_reads(tmp_path, sample_df, arch, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sample_df.text.tolist()[:60]))
    out = tmp_path / "model"
    assert (
        main(
            [
                "pretrain",
                "--corpus",
                str(corpus),
                "--arch",
                arch,
                "--out",
                str(out),
                "--vocab-size",
                "500",
                "--max-len",
                "32",
                "--layers",
                "1",
                "--hidden",
                "32",
                "--heads",
                "2",
                "--bs",
                "8",
            ]
        )
        == 0
    )
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.json", "loss.png"} <= {
        p.name for p in out.iterdir()
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dropout"] == 0 and len(metrics["per_epoch"]) == 1, "one epoch; the final validate() is not one"
    assert set(metrics["per_epoch"][0]) == {"train_loss", "valid_loss", "masked_accuracy", "perplexity"}
    config = json.loads(
        (out / "config.json").read_text()
    )  # trained without dropout, saved with the default for fine-tuning
    assert config.get("hidden_dropout", config.get("hidden_dropout_prob")) == 0.1
    assert main(["fill-mask", "--model", str(out), "the movie was [MASK] ."]) == 0
    assert "mask 1:" in capsys.readouterr().out
    assert AutoModelForMaskedLM.from_pretrained(out).config.model_type == {
        "scratch": "ulmfit_scratch",
        "compressive": "ulmfit_compressive",
    }.get(arch, arch)


@pytest.mark.parametrize("arch", ["scratch", "bert"])
def test_pretrain_learner_trains_without_dropout_and_keeps_the_config_default(sample_df, arch):
    learn = pretrain_learner(
        sample_df.text.tolist()[:40], arch, vocab_size=400, max_len=32, layers=1, hidden=32, heads=2
    )
    assert {m.p for m in learn.model.modules() if isinstance(m, nn.Dropout)} == {0.0}
    config = learn.model.hf.config
    assert config.to_dict().get("hidden_dropout", config.to_dict().get("hidden_dropout_prob")) == 0.1
    learn = pretrain_learner(
        sample_df.text.tolist()[:40], arch, vocab_size=400, max_len=32, layers=1, hidden=32, heads=2, dropout=None
    )
    assert 0.1 in {m.p for m in learn.model.modules() if isinstance(m, nn.Dropout)}


def test_cli_pretrain_errors_name_the_problem(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "ulmfit_tx.cli",
            "pretrain",
            "--corpus",
            str(tmp_path / "none.txt"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "no such file" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "empty").mkdir()
    assert main(["pretrain", "--corpus", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert (
        main(
            [
                "pretrain",
                "--corpus",
                str(ROOT / "data" / "imdb_sample.csv"),
                "--text-col",
                "review",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
