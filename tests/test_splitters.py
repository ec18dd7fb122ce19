import pytest
from torch import nn

from ulmfit_tx import UlmfitError, clas_dataloaders, classifier_learner, mlm_dataloaders, mlm_learner
from ulmfit_tx.archs import clas_splitter, lm_splitter

from .conftest import ARCHS, N_LAYERS

# embeddings + one group per layer + head; ALBERT shares one layer: embeddings, shared layer, head
CLAS_GROUPS = {"bert": N_LAYERS + 2, "roberta": N_LAYERS + 2, "distilbert": N_LAYERS + 2, "albert": 3}


@pytest.fixture(scope="module")
def learners(tiny_models, sample_df):
    df = sample_df.iloc[:40]
    out = {}
    for arch in ARCHS:
        d = tiny_models[arch]
        out[arch] = (
            classifier_learner(clas_dataloaders(df, d, max_len=32, bs=8), d),
            mlm_learner(mlm_dataloaders(df, d, max_len=32, bs=8), d),
        )
    return out


def _check_partition(model, groups):
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids))  # no parameter in two groups
    assert set(ids) == {id(p) for p in model.parameters()}  # every parameter in one group


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_partition_the_parameters(learners, arch):
    clf, lm = learners[arch]
    groups = clas_splitter(clf.model)
    assert len(groups) == CLAS_GROUPS[arch]
    _check_partition(clf.model, groups)
    lm_groups = lm_splitter(lm.model)
    assert len(lm_groups) == CLAS_GROUPS[arch] - 1  # embeddings share the head's group
    _check_partition(lm.model, lm_groups)
    tied = lm.model.hf.get_output_embeddings().weight
    assert any(p is tied for p in lm_groups[-1])  # the tied decoder trains with the head


@pytest.mark.parametrize("arch", ["bert", "albert"])
def test_freeze_to_trains_exactly_the_top_groups(learners, arch):
    clf, _ = learners[arch]
    assert not any(p.requires_grad for g in clf.opt.param_lists[:-1] for p in g)  # created frozen, as fastai
    clf.freeze_to(-2)
    groups = clf.opt.param_lists
    top = {id(p) for g in groups[-2:] for p in g}
    assert all(p.requires_grad == (id(p) in top) for p in clf.model.parameters())  # LayerNorms freeze too
    clf.unfreeze()
    assert all(p.requires_grad for p in clf.model.parameters())
    clf.freeze()
    assert {id(p) for p in clf.model.parameters() if p.requires_grad} == {id(p) for p in groups[-1]}


def test_no_weight_decay_on_biases_and_norm_weights(learners):
    clf, _ = learners["bert"]
    clf.unfreeze()
    norm_or_bias = {
        id(p)
        for m in clf.model.modules()
        for n, p in m.named_parameters(recurse=False)
        if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)) or n == "bias"
    }
    for g in clf.opt.param_lists:
        for p in g:
            assert clf.opt.state[p].get("do_wd", True) == (id(p) not in norm_or_bias)


def test_unknown_architecture_error_says_how_to_fix():
    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = nn.Linear(2, 2)
            self.hf.config = type("C", (), {"model_type": "mystery"})()
            self.hf.base_model = self.hf

    with pytest.raises(UlmfitError, match="mystery.*splitter=.*register_arch"):
        clas_splitter(Fake())
