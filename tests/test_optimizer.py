import copy

import numpy as np
import torch
from fastai.optimizer import Adam
from torch import nn

from ulmfit_tx import FusedAdamW


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4), nn.Linear(4, 2))


def _groups(m):
    return [list(m[0].parameters()), list(m[1].parameters()) + list(m[2].parameters()), list(m[3].parameters())]


def test_fused_adamw_matches_fastai_adam_with_groups_no_wd_and_frozen_params():
    ref_model, new_model = _model(), _model()
    ref, new = Adam(_groups(ref_model), lr=1e-2, wd=0.1), FusedAdamW(_groups(new_model), lr=1e-2, wd=0.1)
    for opt, m in [(ref, ref_model), (new, new_model)]:
        for p in m[1].parameters():
            opt.state[p]["do_wd"] = False  # LayerNorm: no weight decay
        opt.freeze_to(1)  # group 0 frozen
        opt.set_hyper("lr", np.array([1e-3, 3e-3, 1e-2]))  # discriminative rates
    frozen = copy.deepcopy(new_model[0].state_dict())
    torch.manual_seed(1)
    for step in range(6):
        mom = 0.95 - 0.02 * step  # scheduled like fit_one_cycle
        grads = [torch.randn_like(p) for p in ref_model.parameters()]
        for opt, m in [(ref, ref_model), (new, new_model)]:
            opt.set_hyper("mom", mom)
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone() if p.requires_grad else None
            opt.step()
    for a, b in zip(ref_model.parameters(), new_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k, v in new_model[0].state_dict().items():
        assert torch.equal(v, frozen[k])
    assert all(not torch.equal(a, b) for a, b in zip(_model()[3].parameters(), new_model[3].parameters()))
