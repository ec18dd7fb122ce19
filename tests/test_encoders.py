"""ulmfit_tx's own encoders: the scratch encoder, Memory Transformer-XL and the Compressive
Transformer, including each correctness point the public reference implementations get wrong."""

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

import ulmfit_tx  # noqa: F401 (registers the encoders with the Auto classes)
from ulmfit_tx.encoders import CompressiveConfig, MemXLConfig, ScratchConfig
from ulmfit_tx.encoders.compressive import Compressor

V, S = 60, 8  # vocabulary, segment length
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
)


def memxl(**kw):
    return MemXLConfig(**{**SMALL, "segment_len": S, "mem_len": S, "lmem_len": 4, **kw})


def compressive(**kw):
    return CompressiveConfig(**{**SMALL, "segment_len": S, "mem_len": 12, "cmem_len": 3, "cmem_ratio": 4, **kw})


def model(config, auto=AutoModel, seed=0):
    torch.manual_seed(seed)
    return auto.from_config(config)


def ids(B=2, L=3 * S, seed=1):
    return torch.randint(5, V, (B, L), generator=torch.Generator().manual_seed(seed))


# scratch ---------------------------------------------------------------------------------------------------
def test_scratch_masks_padding_ties_head_and_round_trips(tmp_path):
    m = model(ScratchConfig(**SMALL, max_position_embeddings=32), AutoModelForMaskedLM).eval()
    x = ids(L=12)
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[0, 9:] = False
    other = x.clone()
    other[0, 9:] = 0
    a, b = m(x, keep).logits, m(other, keep).logits
    assert torch.allclose(a[0, :9], b[0, :9], atol=1e-6), "padding leaked into real tokens"
    assert m.lm_head.decoder.weight is m.model.embed.weight
    m.save_pretrained(tmp_path)
    back = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(back(x, keep).logits, a, atol=1e-6)
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    out = clf(x, keep, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0


# both memory models ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [memxl(), compressive()], ids=["memxl", "compressive"])
def test_returned_memories_carry_no_graph(config):
    m = model(config, AutoModelForMaskedLM).train()
    mems = None
    for i in range(3):  # three backward() calls in a row, no retain_graph
        x = ids(seed=i)
        out = m(x, memories=mems, labels=x)
        out.loss.backward()
        mems = out.memories
        tensors = [t for v in vars(mems).values() for t in (v if isinstance(v, tuple) else [v]) if t is not None]
        assert all(t.grad_fn is None and not t.requires_grad for t in tensors)


@pytest.mark.parametrize(
    "config",
    [
        memxl(mem_len=0, lmem_len=0),
        memxl(memory_layers=[]),
        compressive(memory_layers=[]),
        compressive(mem_len=0, cmem_len=0),
    ],
    ids=["memxl-no-memory", "memxl-no-memory-layers", "compressive-no-memory-layers", "compressive-no-memory"],
)
def test_without_memory_segments_are_independent(config):
    m = model(config).eval()
    x = ids(L=3 * S)
    alone = m(x[:, 2 * S :]).last_hidden_state
    together = m(x).last_hidden_state[:, 2 * S :]
    changed = x.clone()
    changed[:, : 2 * S] = ids(L=2 * S, seed=7)
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(m(changed).last_hidden_state[:, 2 * S :], alone, atol=1e-5)


@pytest.mark.parametrize("config", [memxl(), compressive(mem_len=S)], ids=["memxl", "compressive"])
def test_memory_is_written_from_real_positions_only(config):
    m = model(config).eval()
    a, b = ids(L=S, seed=3), ids(L=S, seed=4)
    keep = torch.ones_like(a, dtype=torch.bool)
    keep[:, 5:] = False  # segment A ends its document early: 3 padded positions
    mem = m(a, keep).memories
    assert mem.mem_mask[:, 5:].sum() == 0 and mem.mem_mask[:, :5].all()
    other = a.clone()
    other[:, 5:] = ids(L=3, seed=9)  # whatever sits at padded positions must not reach the next segment
    mem2 = m(other, keep).memories
    assert torch.allclose(m(b, memories=mem).last_hidden_state, m(b, memories=mem2).last_hidden_state, atol=1e-5)
    assert not torch.allclose(m(b, memories=mem).last_hidden_state, m(b).last_hidden_state, atol=1e-4), "memory unused"


@pytest.mark.parametrize(
    "config",
    [
        memxl(mem_len=2 * S, lmem_len=0),
        memxl(mem_len=2 * S, lmem_len=0, num_mem_kv=0),
        compressive(mem_len=2 * S, cmem_len=0),
    ],
    ids=["memxl", "memxl-no-mem-kv", "compressive"],
)
def test_transformer_xl_exactness(config):
    "Segment B read with the memory of A equals the joint forward over [A;B] where A sees A and B sees both."
    m = model(config).eval()
    x = ids(L=2 * S)
    keep = torch.ones_like(x, dtype=torch.bool)
    with torch.no_grad():
        h_a, mems, _ = m.segment_forward(x[:, :S], keep[:, :S], m.empty_memories(2))
        h_b, _, _ = m.segment_forward(x[:, S:], keep[:, S:], mems)
        allowed = torch.ones(2 * S, 2 * S, dtype=torch.bool)
        allowed[:S, S:] = False  # A's queries do not see B
        h_joint, _, _ = m.segment_forward(x, keep, m.empty_memories(2), allowed=allowed.expand(2, -1, -1))
    assert torch.allclose(h_joint[:, :S], h_a, atol=1e-5)
    assert torch.allclose(h_joint[:, S:], h_b, atol=1e-5)


@pytest.mark.parametrize("config", [memxl(), compressive()], ids=["memxl", "compressive"])
def test_reset_rows_forgets_only_those_rows(config):
    m = model(config).eval()
    x, nxt = ids(L=2 * S), ids(L=S, seed=5)
    mems = m(x).memories
    reset = m.reset_memories(mems, torch.tensor([True, False]))
    fresh, kept, carried = (
        m(nxt).last_hidden_state,
        m(nxt, memories=reset).last_hidden_state,
        m(nxt, memories=mems).last_hidden_state,
    )
    assert torch.allclose(kept[0], fresh[0], atol=1e-5)
    assert torch.allclose(kept[1], carried[1], atol=1e-5)


# Memory Transformer-XL -------------------------------------------------------------------------------------
def _init_memory_grad(detach_every: int):
    "Gradient on the learned initial long-term memory from a loss on the third segment of one call."
    m = model(memxl(mem_len=0, detach_every=detach_every)).train()
    m(ids(L=3 * S)).last_hidden_state[:, 2 * S :].pow(2).mean().backward()
    return m, m.writer.init.grad


def test_memxl_long_memory_write_gets_gradient_through_detach_every():
    m, g1 = _init_memory_grad(1)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.writer.named_parameters() if n != "init"), (
        "the write must get gradient from the next segment's loss"
    )
    assert g1 is None or g1.abs().sum() == 0, "detach_every=1: the gradient stops after one write"
    _, g2 = _init_memory_grad(2)
    assert g2 is not None and g2.abs().sum() > 0, "detach_every=2: the gradient flows back through two writes"


def test_memory_keys_values_fold_the_norm_weight_exactly():
    """Detached memories skip their input gradient, but keys, values and weight gradients are those of
    norm-then-project."""
    block = model(memxl()).layers[0]
    with torch.no_grad():
        block.norm1.weight.uniform_(0.5, 1.5)  # a norm weight that is not all ones
    g = torch.Generator().manual_seed(0)
    old, graph, newer = (torch.randn(2, n, 32, generator=g) for n in (3, 4, 5))
    graph.requires_grad_()  # a memory that carries a graph (memxl's lmem)

    def grads(kvs):
        block.zero_grad()
        torch.cat(kvs, 1).pow(2).sum().backward()
        return block.attn.kv.weight.grad.clone(), block.norm1.weight.grad.clone()

    fast = block.memory_keys_values((old, newer, graph))
    assert [t.shape[1] for t in fast] == [8, 4], "neighbouring detached memories are projected together"
    slow = [block.attn.kv(block.norm1(m)) for m in (old, newer, graph)]
    assert torch.allclose(torch.cat(fast, 1), torch.cat(slow, 1), atol=1e-5)
    for a, b in zip(grads(fast), grads(slow)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_memxl_rejects_unknown_memory_layers():
    with pytest.raises(ValueError, match="memory_layers"):
        model(memxl(memory_layers=[5]))


# Compressive Transformer -----------------------------------------------------------------------------------
def test_compressive_memory_lengths_follow_the_formula():
    m = model(compressive(mem_len=12, cmem_len=3, cmem_ratio=4)).eval()
    mems = None
    for k in range(1, 6):
        mems = m(ids(L=S, seed=k), memories=mems).memories
        assert mems.mem[0].shape[1] == mems.mem_mask.shape[1] == min(k * S, 12)
        assert mems.cmem[0].shape[1] == mems.cmem_mask.shape[1] == min(max(0, k * S - 12) // 4, 3)


@pytest.mark.parametrize("kind", ["conv", "mean", "max"])
def test_compressor_pads_evictions_that_are_not_a_multiple(kind):
    torch.manual_seed(0)
    c = Compressor(8, 4, kind)
    x, keep = torch.randn(1, 5, 8), torch.ones(1, 5, dtype=torch.bool)
    out = c(x, keep)
    assert out.shape == (1, 2, 8) and c.mask(keep).tolist() == [[True, True]]
    y = x.clone()
    y[0, 0] += 1.0  # the oldest state, alone in the padded slot, must count
    assert not torch.allclose(c(y, keep)[0, 0], out[0, 0])
    assert torch.allclose(c(y, keep)[0, 1], out[0, 1])
    if kind == "mean":
        assert torch.allclose(out[0, 0], x[0, 0]), "padding must not dilute the mean"
    m = model(compressive(segment_len=6, mem_len=8, cmem_len=8, cmem_ratio=4))
    mems = m(ids(L=18)).memories  # evictions of 4 then 6 states: 1 + 2 slots
    assert mems.cmem[0].shape[1] == 3 and mems.cmem_mask.all()


def test_compressive_every_parameter_keeps_training():
    m = model(compressive(mem_len=S, cmem_len=4, cmem_ratio=2), AutoModelForMaskedLM).train()
    compressor = {id(p) for p in m.model.compressors.parameters()}
    mems = None
    for step in range(4):  # evictions from the second segment on
        m.zero_grad()
        x = ids(seed=step)
        out = m(x, memories=mems)
        lm_loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x.flatten())
        lm_loss.backward(retain_graph=True)
        for n, p in m.named_parameters():
            assert p.requires_grad, n
            if id(p) not in compressor:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{n}: no LM gradient"
            else:
                assert p.grad is None or p.grad.abs().sum() == 0, f"{n}: the compressor must not get LM gradient"
        m.zero_grad()
        out.aux_loss.backward()
        for n, p in m.named_parameters():
            got = p.grad is not None and p.grad.abs().sum() > 0
            assert got == (id(p) in compressor), f"{n}: the auxiliary loss must train the compressor and nothing else"
        mems = out.memories


def test_compressive_aux_loss_is_zero_before_the_first_eviction():
    m = model(compressive(mem_len=2 * S)).train()
    first = m(ids(L=2 * S))  # fills the memory exactly: nothing evicted
    assert first.aux_loss.item() == 0
    assert m(ids(L=S, seed=3), memories=first.memories).aux_loss.item() > 0
