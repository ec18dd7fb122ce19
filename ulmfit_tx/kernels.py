"""Training kernels for the CPU. `attend` is the softmax attention of ulmfit_tx's own encoders; `hf_attention`
does the same job for Hugging Face models (registered with transformers as "ulmfit_tx"); `Dropout` is
`nn.Dropout`. `use_fast_kernels` switches a Hugging Face model to them. They are torch's own kernels except
where torch's CPU path is slow: dropout, whose mask torch draws with `bernoulli_`, one generator call per
element (`dropout_keep` draws the same mask from 16-bit slices of 64-bit words, four to a random draw), and SDPA
with attention dropout, which leaves its fused kernel for that `bernoulli_` and an unfused math path.
`reuse_freed_memory` stops glibc handing large freed blocks (the word embeddings' gradient) back every step.
`fuse_projections` computes a self-attention's query, key and value in one matrix product."""

from __future__ import annotations

import ctypes
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = [
    "dropout_keep",
    "Dropout",
    "attend",
    "hf_attention",
    "reuse_freed_memory",
    "QKVProjection",
    "fuse_projections",
    "qkv_projections",
    "use_fast_kernels",
]


def dropout_keep(
    shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, float]:
    """A boolean keep-mask of `shape` whose elements are False with probability `p` (to 1/65536), and
    the scale 1/P(keep) that preserves the expectation. Each element reads 16 bits of a random 64-bit
    word, so one generator call serves four elements. Reproducible under `torch.manual_seed`."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    n, cut = math.prod(shape), round(p * 65536)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # all 64 bits random
    keep = words.view(torch.int16)[:n].view(shape) >= cut - 32768  # P(False) = cut / 65536
    return keep, 65536 / (65536 - cut)


def _drop(x: torch.Tensor, p: float) -> torch.Tensor:
    "Dropout of `x` with `dropout_keep`'s mask: zeros where dropped, the rest scaled by 1/(1-p)."
    keep, scale = dropout_keep(x.shape, p, x.device)
    return x * keep.to(x.dtype).mul_(scale)


class Dropout(nn.Dropout):
    "`nn.Dropout`, training on CPU with `dropout_keep`'s mask; elsewhere (GPU, eval, in place, p=1) torch's own."

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and 0 < self.p < 1 and x.device.type == "cpu" and not self.inplace):
            return super().forward(x)
        return _drop(x, self.p)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of q (B, H, Q, Dh) over k, v (B, H, K, Dh) -> (B, H, Q, Dh); `mask` is additive
    or boolean (True: attend), broadcastable to (B, H, Q, K). torch's SDPA, except in two cases where SDPA
    falls back to its slow unfused math path and a `baddbmm` (scores and scale), the mask applied in place, a
    softmax, `dropout_keep`'s mask and a `matmul` do the same work faster: a mask that needs a gradient (a learned
    position bias), and attention dropout on CPU."""
    cpu_dropout, learned_mask = dropout_p > 0 and q.device.type == "cpu", mask is not None and mask.requires_grad
    if not (cpu_dropout or learned_mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    (B, H, Q, Dh), K = q.shape, k.shape[2]
    scale = Dh**-0.5 if scale is None else scale
    kt = k.reshape(B * H, K, Dh).transpose(1, 2)  # (BH, Dh, K)
    scores = torch.baddbmm(q.new_empty(1, 1, 1), q.reshape(B * H, Q, Dh), kt, beta=0, alpha=scale).view(B, H, Q, K)
    if mask is not None and mask.dtype == torch.bool:
        scores.masked_fill_(~mask, torch.finfo(q.dtype).min)  # True: attend
    elif mask is not None:
        scores = scores + mask if mask.requires_grad else scores.add_(mask)
    probs = scores.softmax(-1)  # (B, H, Q, K)
    if dropout_p > 0:
        probs = _drop(probs, dropout_p)
    return torch.matmul(probs, v)  # (B, H, Q, Dh)


def hf_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A Hugging Face attention function (the signature of transformers' `sdpa_attention_forward`):
    `attend` while training on CPU with attention dropout, otherwise transformers' own SDPA function."""
    # `attend` covers plain multi-head attention: no grouped key/value heads, no mask-less causal attention
    plain = key.shape[1] == query.shape[1] and (attention_mask is not None or not getattr(module, "is_causal", False))
    if not (dropout > 0 and query.device.type == "cpu" and plain):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return attend(query, key, value, attention_mask, dropout, scaling).transpose(
        1, 2
    ).contiguous(), None  # (B, Q, H, Dh)


AttentionInterface.register("ulmfit_tx", hf_attention)
AttentionMaskInterface.register("ulmfit_tx", sdpa_mask)


_MALLOPT = {"trim": -1, "mmap": -3}  # glibc's M_TRIM_THRESHOLD and M_MMAP_THRESHOLD
_reusing: bool | None = None  # whether `reuse_freed_memory` took effect; None: not tried yet


def reuse_freed_memory(
    limit: int = 2**28,  # Blocks up to this many bytes come from (and go back to) the reusable heap
) -> bool:
    """Make glibc's malloc keep freed blocks of up to `limit` bytes for reuse instead of unmapping them. Above 32 MB it
    maps every block afresh and pays a page fault per 4 KB page when it is first written: the word embeddings'
    gradient (30,522 x 384 floats, 47 MB, for MiniLM) is allocated anew by every backward pass. Freed memory stays
    with the process (its peak resident size does not grow). Set by the first call in a process (later calls report
    it); Linux with glibc only, and not when the user set glibc's malloc variables. Returns whether the setting is
    in effect."""
    global _reusing
    if _reusing is None:
        user_set = any(k.startswith("MALLOC_") for k in os.environ) or "glibc.malloc" in os.environ.get(
            "GLIBC_TUNABLES", ""
        )
        try:
            libc = None if user_set or not sys.platform.startswith("linux") else ctypes.CDLL("libc.so.6")
        except OSError:
            libc = None  # not glibc (musl, ...)
        _reusing = bool(libc) and bool(
            libc.mallopt(_MALLOPT["mmap"], limit) and libc.mallopt(_MALLOPT["trim"], 4 * limit)
        )
    return _reusing


class QKVProjection(nn.Linear):
    """One of a self-attention's query, key and value projections (an `nn.Linear`, same parameters and state-dict
    keys), computed with its siblings in one matrix product: the first of the three (`siblings` set) multiplies the
    input by the three weights stacked and hands the other two their slices, which they return when called next
    with the same input (as a Hugging Face self-attention does); called with another input, each is a plain
    `nn.Linear`. One (B*L, H) x (H, 3H) product instead of three: fewer, larger matrix products, and under autocast
    one bf16 cast of the weights."""

    siblings: list | None = None  # on the first projection: the other two
    _handed: tuple | None = None  # on the others: (input, output) handed over by the first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        handed, self._handed = self._handed, None
        if handed is not None and handed[0] is x:
            return handed[1]
        if not self.siblings:
            return super().forward(x)
        mods = [self, *self.siblings]
        bias = (
            None if self.bias is None else torch.cat([m.bias for m in mods])
        )  # all three or none (`fuse_projections`)
        out = F.linear(x, torch.cat([m.weight for m in mods]), bias).split([m.out_features for m in mods], -1)
        for m, o in zip(self.siblings, out[1:]):
            m._handed = (x, o)
        return out[0]


_QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))  # BERT, RoBERTa, ALBERT; DistilBERT


def qkv_projections(model: nn.Module):
    """The self-attentions of a Hugging Face model whose query, key and value are `nn.Linear` layers of one input
    size, all with or all without bias: (attention module, their three names, the layers)."""
    for m in list(model.modules()):
        if "Cross" in type(m).__name__:
            continue
        for names in _QKV_NAMES:
            mods = [getattr(m, n, None) for n in names]
            linear = all(isinstance(p, nn.Linear) for p in mods)
            if linear and len({(p.in_features, p.bias is None) for p in mods}) == 1:
                yield m, names, mods


def fuse_projections(model: nn.Module, fuse: bool = True) -> nn.Module:
    """Switch every self-attention of a Hugging Face model whose query, key and value are `nn.Linear`s of one
    input to `QKVProjection`s (or, `fuse=False`, back to plain `nn.Linear`s). Same parameters,
    outputs and gradients, one matrix product instead of three."""
    for m, names, mods in qkv_projections(model):
        new = [_sharing(p, QKVProjection if fuse else nn.Linear) for p in mods]
        if fuse:
            new[0].siblings = new[1:]
        for n, p in zip(names, new):
            setattr(m, n, p)
    return model


def _sharing(linear: nn.Linear, cls: type) -> nn.Linear:
    "A `cls` (`nn.Linear` or `QKVProjection`) with `linear`'s parameters and settings, without its fusion links."
    new = cls.__new__(cls)
    new.__dict__.update({k: v for k, v in linear.__dict__.items() if k not in ("siblings", "_handed")})
    return new


def use_fast_kernels(model: nn.Module) -> nn.Module:
    """Switch a Hugging Face model that runs on SDPA to `hf_attention`, its `nn.Dropout` modules to `Dropout`, and its
    self-attentions' projections to `QKVProjection`s (`fuse_projections`): the same maths, faster CPU training.
    Other attention implementations are left alone. Also `reuse_freed_memory`."""
    reuse_freed_memory()
    fuse_projections(model)
    if getattr(model.config, "_attn_implementation", None) == "sdpa" and getattr(
        model, "_supports_attention_backend", False
    ):
        model.set_attn_implementation("ulmfit_tx")
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p, child.inplace))
    return model
