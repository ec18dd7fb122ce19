"""CPU training kernels: `attend` against torch's SDPA, the fast dropout mask and `Dropout`, and the "ulmfit_tx"
attention function and dropout modules that the learners switch Hugging Face models to."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM

import ulmfit_tx.kernels as kernels
from ulmfit_tx.kernels import Dropout, QKVProjection, attend, dropout_keep, fuse_projections, use_fast_kernels
from ulmfit_tx.models import MaskedLM

from .conftest import ARCHS


def qkv_mask(seed=0, learned=False):
    "q (2, 3, 5, 8), k, v (2, 3, 7, 8) and an additive mask: a learned bias with padded keys, or padding only."
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(2, 3, 5, 8, generator=g),
        torch.randn(2, 3, 7, 8, generator=g),
        torch.randn(2, 3, 7, 8, generator=g),
    )
    keep = torch.rand(2, 1, 1, 7, generator=g) > 0.3
    keep[..., 0] = True
    bias = torch.randn(1, 3, 5, 7, generator=g) if learned else torch.zeros(1, 1, 1, 7)
    return q, k, v, bias.masked_fill(~keep, float("-inf"))


def grads_of(fn, q, k, v, mask):
    "Output of `fn` and the gradients of q, k, v and the mask (when it is a float tensor)."
    leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in (q, k, v, mask)]
    out = fn(*leaves)
    (out * torch.arange(8.0)).sum().backward()
    return [out] + [t.grad for t in leaves]


def test_attend_with_a_learned_bias_matches_sdpa():
    "The baddbmm path (taken when the additive mask needs a gradient) gives SDPA's output and gradients."
    q, k, v, mask = qkv_mask(learned=True)
    ours, ref = grads_of(attend, q, k, v, mask), grads_of(F.scaled_dot_product_attention, q, k, v, mask)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_dropout_keep_drops_p_and_is_seeded():
    torch.manual_seed(0)
    keep, scale = dropout_keep((1000, 1000), 0.1)
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    assert abs((~keep).float().mean().item() - 0.1) < 0.002, "wrong dropout rate"
    assert abs(scale - 1 / 0.9) < 1e-4
    lanes = (~keep).view(-1, 4).float().mean(0)  # each 16-bit slice of a 64-bit word, separately
    assert ((lanes - 0.1).abs() < 0.004).all(), f"some 16-bit slices drop at the wrong rate: {lanes.tolist()}"
    torch.manual_seed(0)
    assert torch.equal(dropout_keep((1000, 1000), 0.1)[0], keep), "not reproducible under torch.manual_seed"
    assert dropout_keep((7,), 0.0)[0].all()
    with pytest.raises(ValueError, match="dropout probability"):
        dropout_keep((3,), 1.0)


@pytest.mark.parametrize("bool_mask", [False, True], ids=["additive", "bool"])
def test_attend_cpu_dropout_is_dropout_on_the_probabilities(bool_mask):
    "On CPU with dropout: softmax, then `dropout_keep`'s mask and scale, then the values; gradients included."
    q, k, v, mask = qkv_mask()
    if bool_mask:
        mask = mask == 0

    def reference(q, k, v, mask):
        torch.manual_seed(3)
        keep, scale = dropout_keep((6, 5, 7), 0.25)
        probs = (
            q @ k.transpose(-1, -2) / 8**0.5 + torch.zeros(mask.shape).masked_fill(~mask, -1e30)
            if bool_mask
            else q @ k.transpose(-1, -2) / 8**0.5 + mask
        ).softmax(-1)
        return probs * keep.view(2, 3, 5, 7) * scale @ v

    def ours(q, k, v, mask):
        torch.manual_seed(3)
        return attend(q, k, v, mask, 0.25)

    for a, b in zip(grads_of(ours, q, k, v, mask)[:4], grads_of(reference, q, k, v, mask)[:4]):
        assert torch.allclose(a, b, atol=1e-5)
    torch.manual_seed(3)
    assert not torch.allclose(attend(q, k, v, mask, 0.25), attend(q, k, v, mask, 0.0)), "no dropout applied"


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_models_switch_to_the_ulmfit_tx_attention(arch, tiny_models, monkeypatch, tmp_path):
    "Wrapped models run `hf_attention`: SDPA's results in eval mode, `attend` when training with dropout on CPU."
    dropout = {
        "attention_dropout" if arch == "distilbert" else "attention_probs_dropout_prob": 0.1
    }  # ALBERT's default is 0
    sdpa = AutoModelForMaskedLM.from_pretrained(tiny_models[arch], **dropout).eval()
    pad = sdpa.config.pad_token_id
    hf = MaskedLM(AutoModelForMaskedLM.from_pretrained(tiny_models[arch], **dropout), pad).hf.eval()
    assert (sdpa.config._attn_implementation, hf.config._attn_implementation) == ("sdpa", "ulmfit_tx")
    ids = torch.randint(5, 100, (2, 12))
    ids[0, 9:] = pad
    keep = ids != pad
    with torch.no_grad():
        a, b = hf(input_ids=ids, attention_mask=keep).logits, sdpa(input_ids=ids, attention_mask=keep).logits
    assert torch.allclose(a[keep], b[keep], atol=1e-5)
    calls = []
    monkeypatch.setattr(
        kernels, "attend", lambda *a: calls.append(a[4]) or F.scaled_dot_product_attention(*a[:3], attn_mask=a[3])
    )
    hf.train()(input_ids=ids, attention_mask=keep).logits.sum().backward()
    assert calls and all(p > 0 for p in calls), "training on CPU with dropout did not use attend"
    drops = [type(m) for m in hf.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(t is Dropout for t in drops), "some nn.Dropout modules were not switched"
    hf.save_pretrained(tmp_path)  # a saved folder must load without ulmfit_tx
    assert "ulmfit_tx" not in (tmp_path / "config.json").read_text()


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_projections_match_the_plain_ones(arch, tiny_models, tmp_path):
    """Each self-attention's query, key and value become `QKVProjection`s (one matrix product): same outputs and
    gradients as the plain model, same state-dict keys, a saved folder that loads without ulmfit_tx, and back."""
    plain = AutoModelForMaskedLM.from_pretrained(tiny_models[arch]).eval()
    fused = fuse_projections(AutoModelForMaskedLM.from_pretrained(tiny_models[arch]).eval())
    projs = [m for m in fused.modules() if isinstance(m, QKVProjection)]
    assert len(projs) == 3 * (1 if arch == "albert" else fused.config.num_hidden_layers)  # ALBERT shares one layer
    assert fused.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(5, 100, (2, 12))
    ids[0, 9:] = plain.config.pad_token_id
    outs = []
    for m in (plain, fused):
        out = m(input_ids=ids, attention_mask=ids != plain.config.pad_token_id).logits
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outs.append((out, {n: p.grad for n, p in m.named_parameters()}))
    (a, ga), (b, gb) = outs
    assert torch.allclose(a, b, atol=1e-5)
    assert ga.keys() == gb.keys() and all(torch.allclose(ga[n], gb[n], atol=1e-5) for n in ga)
    q, k, v = projs[:3]
    x, y = torch.randn(4, q.in_features), torch.randn(4, q.in_features)
    with torch.no_grad():  # the key called with another input than the query's is a plain linear layer
        q(x)
        assert torch.allclose(k(y), torch.nn.functional.linear(y, k.weight, k.bias), atol=1e-6)
        assert torch.allclose(v(x), torch.nn.functional.linear(x, v.weight, v.bias), atol=1e-6)
    fused.save_pretrained(tmp_path)
    again = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, fused(input_ids=ids).logits, atol=1e-5)
    assert not any(isinstance(m, QKVProjection) for m in fuse_projections(fused, False).modules())


def test_use_fast_kernels_leaves_our_own_encoders_alone(own_models):
    hf = AutoModelForMaskedLM.from_pretrained(own_models["scratch"])
    assert use_fast_kernels(hf).config._attn_implementation != "ulmfit_tx"


def test_dropout_drops_p_scales_the_rest_and_passes_gradients():
    "`Dropout` on CPU: zeros at rate p, kept values scaled by 1/(1-p) (the mean kept), the same mask in the gradient."
    drop, x = Dropout(0.2).train(), torch.ones(400, 500, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    zero = y == 0
    assert abs(zero.float().mean().item() - 0.2) < 0.005
    assert torch.allclose(y[~zero], torch.full_like(y[~zero], 1 / 0.8)) and abs(y.mean().item() - 1) < 0.01
    y.sum().backward()
    assert torch.equal(x.grad == 0, zero)
    torch.manual_seed(0)
    assert torch.equal(drop(x), y), "not reproducible under torch.manual_seed"
    assert torch.equal(drop.eval()(x), x), "eval mode must be the identity"


REUSE = """
import resource, sys, torch
from ulmfit_tx.kernels import reuse_freed_memory
def faults():   # minor page faults of ten fresh word-embedding gradients (30,522 x 384 floats), after a first
    torch.zeros(30522, 384)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10): torch.zeros(30522, 384)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
before = faults(); on = reuse_freed_memory(); faults()  # the first blocks after the switch may still be fresh
after = faults()
print(before, on, reuse_freed_memory(), after)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("user_env", [{}, {"MALLOC_ARENA_MAX": "2"}])
def test_reuse_freed_memory_stops_page_faults_on_large_gradients(user_env):
    """Each fresh 47 MB block costs ~11,400 page faults; reused, none (now and then glibc maps one afresh: at most a
    quarter of them may fault). Measured once the heap has grown to hold them: in the first ten allocations after the
    switch a varying number still come fresh (0 to 8 here, with the address layout of the process), in the next ten
    none. A user's own malloc settings are left alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | user_env
    res = subprocess.run([sys.executable, "-c", REUSE], capture_output=True, text=True, env=env, check=True)
    before, on, again, after = res.stdout.split()
    assert int(before) > 10 * 10_000
    if user_env:
        assert (on, again) == ("False", "False") and int(after) > 10 * 10_000
    else:
        assert (on, again) == ("True", "True") and int(after) < int(before) / 4
