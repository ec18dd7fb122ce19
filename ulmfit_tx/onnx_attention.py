"""ONNX Runtime's fused self-attention in the exported graph.

`fuse_attention` makes each self-attention of a Hugging Face encoder one call of the torch operator
`ulmfit_tx::self_attention` (the input, the query/key/value weights stacked, the padding mask): PyTorch computes it as
one matrix product and SDPA; `torch.onnx` writes it (with `ONNX_TRANSLATIONS`) as ONNX Runtime's `com.microsoft`
`Attention` operator, one node for the projections, the scores, the softmax and the weighted sum, where the
unfused graph has a dozen (matrix products, transposes, a mask added, a softmax) and a (B, 1, L, L) mask built from
the padding. A graph with it runs in ONNX Runtime only."""

import torch
import torch.nn.functional as F
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .kernels import qkv_projections

__all__ = ["self_attention", "fuse_attention", "ONNX_TRANSLATIONS", "IMPLEMENTATION"]

IMPLEMENTATION = "ulmfit_tx_onnx"  # the attention implementation's name in transformers' registries


@torch.library.custom_op("ulmfit_tx::self_attention", mutates_args=())
def self_attention(
    x: torch.Tensor,  # (B, L, D) the layer's input
    weight: torch.Tensor,  # (D, 3 D) the query, key and value weights side by side
    bias: torch.Tensor,  # (3 D)
    mask: torch.Tensor | None,  # (B, L) True (or 1) at the tokens to attend to; None: all of them
    heads: int,  # number of attention heads
    scale: float,  # the scores' factor (1 / sqrt(D / heads) in these encoders)
) -> torch.Tensor:
    "Multi-head self-attention of `x` before the output projection: (B, L, D) -> (B, L, D)."
    B, L, D = x.shape
    qkv = torch.addmm(bias, x.reshape(B * L, D), weight)  # (B L, 3 D)
    q, k, v = qkv.view(B, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # each (B, H, L, Dh)
    keep = None if mask is None else mask.bool()[:, None, None, :]  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)  # (B, H, L, Dh)
    return out.transpose(1, 2).reshape(B, L, D)


@self_attention.register_fake
def _(x, weight, bias, mask, heads, scale):
    return torch.empty_like(x)


def _schema() -> OpSchema:
    "The part of `com.microsoft.Attention`'s signature the exporter writes (the onnx package does not know the op)."
    arg, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    return OpSchema(
        "Attention",
        "com.microsoft",
        1,
        inputs=[arg(n, "T") for n in ("input", "weights", "bias")] + [arg("mask_index", "M", param_option=optional)],
        outputs=[arg("output", "T")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[
            OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "", required=True),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "", required=False),
        ],
    )


_ATTENTION = Op(Opset("com.microsoft", 1), "Attention", _schema())


def _self_attention_onnx(x, weight, bias, mask, heads: int, scale: float):
    "`self_attention` as ONNX Runtime's `Attention` node; the (B, L) mask is its `mask_index` (1: attend)."
    mask_index = None if mask is None else op.Cast(mask, to=6)  # int32
    return _ATTENTION(x, weight, bias, mask_index, num_heads=heads, scale=scale)


ONNX_TRANSLATIONS = {torch.ops.ulmfit_tx.self_attention.default: _self_attention_onnx}  # for torch.onnx.export


class _Unprojected(nn.Module):
    "Stands for a query, key or value projection whose work `self_attention` does: returns its input."

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _attention(module: nn.Module, query: torch.Tensor, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    """A transformers attention function over `fuse_attention`'s layers: `query` (B, H, L, Dh) is the layer's input
    (its projections are `_Unprojected`), `attention_mask` the (B, L) padding mask of `_padding_mask`."""
    B, H, L, Dh = query.shape
    x = query.transpose(1, 2).reshape(B, L, H * Dh)  # (B, L, D)
    out = self_attention(x, module.qkv_weight, module.qkv_bias, attention_mask, H, scaling or Dh**-0.5)
    return out.view(B, L, H, Dh), None


def _padding_mask(attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    "A transformers mask function that keeps the (B, L) padding mask as it is (`self_attention` expands it)."
    return attention_mask


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, _padding_mask)


def fuse_attention(model: nn.Module) -> bool:
    """Switch every self-attention of the Hugging Face model `model` (in place, for export and inference) to
    `self_attention`: its query, key and value weights stacked into `qkv_weight` (D, 3 D) and `qkv_bias`, the
    projections `_Unprojected`. Only where each one maps the hidden size to itself and the model takes
    transformers' attention functions; returns whether it did (else `model` is left as it was)."""
    hidden = getattr(model.config, "hidden_size", None)
    found = list(qkv_projections(model))
    if not (found and getattr(model, "_supports_attention_backend", False)) or any(
        lin.in_features != hidden or lin.out_features != hidden for _, _, lins in found for lin in lins
    ):
        return False
    for mod, names, lins in found:
        w = torch.cat([lin.weight for lin in lins]).t().contiguous()  # (D, 3 D)
        b = w.new_zeros(3 * hidden) if lins[0].bias is None else torch.cat([lin.bias for lin in lins])
        mod.qkv_weight, mod.qkv_bias = nn.Parameter(w.detach()), nn.Parameter(b.detach())
        for n in names:
            setattr(mod, n, _Unprojected())
    model.set_attn_implementation(IMPLEMENTATION)
    return True
