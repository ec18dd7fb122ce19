"""Pieces shared by ulmfit_tx's own encoders (`scratch`, `memxl`, `compressive`): the config fields
they have in common, a pre-norm transformer block that can also read memories, a bucketed relative
position bias, the MLM and classification heads, output types, and the Hugging Face plumbing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from ..kernels import Dropout, attend
from ..pooling import masked_concat_pool

__all__ = [
    "EncoderConfig",
    "MemoryConfig",
    "SegmentedEncoder",
    "EncoderOutput",
    "HeadOutput",
    "FeedForward",
    "Attention",
    "Block",
    "RelativePositionBias",
    "masked_concat_pool",
    "attention_keep",
    "memory_attention_mask",
    "MLMHead",
    "ClassificationHead",
    "EncoderPreTrainedModel",
    "MaskedLMMixin",
    "SequenceClassificationMixin",
]


class EncoderConfig(PreTrainedConfig):
    "Fields every ulmfit_tx encoder has (Hugging Face names, so the rest of the pipeline reads them as for BERT)."

    vocab_size: int = 8000
    hidden_size: int = 256  # Width of the hidden states
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024  # Width of the feed-forward layer
    hidden_dropout: float = 0.1  # Dropout on the embeddings
    attn_dropout: float = 0.1  # Dropout on the attention probabilities
    attn_layer_dropout: float = 0.1  # Dropout on the attention output (before the residual)
    ff_dropout: float = 0.1  # Dropout inside the feed-forward layer and on its output
    classifier_dropout: float = 0.1  # Dropout on the pooled features of the classification head
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True  # The MLM decoder shares the word embedding matrix


class MemoryConfig(EncoderConfig):
    "Fields of the encoders that read a long input segment by segment with a memory."

    segment_len: int = 128  # Tokens read at a time
    mem_len: int = 128  # Short-term memory: the last `mem_len` states of each memory layer (detached)
    memory_layers: list[int] | None = None  # 0-based layers that read memory (None: all)
    causal: bool = False  # Tokens see only earlier tokens of their segment (memory is always visible)
    rel_pos_buckets: int = 32  # Relative position buckets (half for each direction)
    rel_pos_max_distance: int = 512  # Distance beyond which positions share the last bucket
    max_position_embeddings: int = 4096  # Longest input one call reads (the pipeline's max_len limit)


@dataclass
class EncoderOutput(ModelOutput):
    "What a base encoder returns: states (B, L, D), the memories to pass to the next call, an auxiliary loss."

    last_hidden_state: torch.Tensor | None = None
    memories: Any = None
    aux_loss: torch.Tensor | None = None


@dataclass
class HeadOutput(ModelOutput):
    "What the MLM and classification models return (`loss` includes `aux_loss` when labels are given)."

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    memories: Any = None
    aux_loss: torch.Tensor | None = None


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, dim), Dropout(dropout))


class Attention(nn.Module):
    "Multi-head attention of queries from `x` over keys/values from `kv` (computed by `attend`)."

    def __init__(self, dim: int, heads: int, attn_dropout: float = 0.0, out_dropout: float = 0.0):
        super().__init__()
        assert dim % heads == 0, f"hidden size {dim} is not a multiple of {heads} heads"
        self.heads, self.attn_dropout = heads, attn_dropout
        self.q, self.kv, self.out = (
            nn.Linear(dim, dim, bias=False),
            nn.Linear(dim, 2 * dim, bias=False),
            nn.Linear(dim, dim),
        )
        self.drop = Dropout(out_dropout)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        B, T, D = t.shape
        return t.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, H, T, Dh)

    def keys_values(self, kv: torch.Tensor, detach_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        "(B, K, D) -> keys and values (B, H, K, Dh); with `detach_weights` no gradient reaches the projection."
        w = self.kv.weight.detach() if detach_weights else self.kv.weight
        return self.split_kv(F.linear(kv, w))

    def split_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        "Projected (B, K, 2D) -> keys and values (B, H, K, Dh)."
        return tuple(self.split(t) for t in kv.chunk(2, dim=-1))

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_qkv: bool = False,
        projected: bool = False,
    ):
        """x (B, Q, D), kv (B, K, D) (or (B, K, 2D) already through `self.kv` when `projected`), mask: bool
        (True = attend) or additive float, broadcastable to (B, H, Q, K). Returns (B, Q, D), and with
        `return_qkv` also the queries, keys and values (B, H, Q|K, Dh)."""
        q = self.split(self.q(x))  # (B, H, Q, Dh)
        k, v = self.split_kv(kv) if projected else self.keys_values(kv)  # (B, H, K, Dh) each
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)
        y = attend(q, k, v, mask, self.attn_dropout if self.training else 0.0)  # (B, H, Q, Dh)
        out = self.drop(self.out(y.transpose(1, 2).flatten(2)))  # (B, Q, D)
        return (out, (q, k, v)) if return_qkv else out


class Block(nn.Module):
    """Pre-norm transformer block. Memories (raw states of earlier segments) go through the same norm as
    the current states before the keys and values are computed, so both share one representation;
    `num_mem_kv` learned slots are always visible ("all-attention" persistent memory)."""

    normal_init = ("mem_kv",)

    def __init__(self, config: EncoderConfig, num_mem_kv: int = 0, gru_gated: bool = False):
        super().__init__()
        D = config.hidden_size
        self.norm1, self.norm2 = nn.RMSNorm(D, eps=config.norm_eps), nn.RMSNorm(D, eps=config.norm_eps)
        self.attn = Attention(D, config.num_attention_heads, config.attn_dropout, config.attn_layer_dropout)
        self.ff = FeedForward(D, config.intermediate_size, config.ff_dropout)
        self.mem_kv = nn.Parameter(torch.zeros(num_mem_kv, D)) if num_mem_kv else None
        self.gates = nn.ModuleList([nn.GRUCell(D, D), nn.GRUCell(D, D)]) if gru_gated else None

    def residual(self, x: torch.Tensor, y: torch.Tensor, i: int) -> torch.Tensor:
        "x + y, or a GRU gate between them (the Compressive Transformer's gated residual)."
        if self.gates is None:
            return x + y
        return self.gates[i](y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])).view_as(x)

    def memory_keys_values(self, memories: tuple) -> list[torch.Tensor]:
        """Projected keys and values (B, M, 2D) of the memories, in order, through the same norm as the
        current states. Detached memories need no input gradient, so neighbouring ones are projected
        together with the norm weight folded into the projection (kv(m_hat * w) = m_hat @ (W * w)^T):
        backward then skips their rows' input gradient, over half of the rows a memory layer projects."""
        out = []
        for detached, group in groupby(memories, key=lambda m: not m.requires_grad):
            if not detached:
                out.extend(self.attn.kv(self.norm1(m)) for m in group)
                continue
            flat = torch.cat(list(group), 1)  # (B, M, D)
            folded = self.attn.kv.weight * self.norm1.weight  # (2D, D)
            out.append(F.linear(F.rms_norm(flat, flat.shape[-1:], eps=self.norm1.eps), folded))
        return out

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, memories: tuple = (), return_qkv: bool = False
    ):
        """x (B, S, D); memories: tensors (B, M_i, D); mask over the keys [mem_kv, *memories, x].
        With `return_qkv` also returns the attention's queries, keys and values."""
        h = self.norm1(x)  # (B, S, D)
        kv = [self.attn.kv(self.mem_kv).expand(len(x), -1, -1)] if self.mem_kv is not None else []  # (B, P, 2D)
        kv = torch.cat(kv + self.memory_keys_values(memories) + [self.attn.kv(h)], dim=1)  # (B, K, 2D)
        a, qkv = self.attn(h, kv, mask, return_qkv=True, projected=True)
        x = self.residual(x, a, 0)
        x = self.residual(x, self.ff(self.norm2(x)), 1)  # (B, S, D)
        return (x, qkv) if return_qkv else x


class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias (bidirectional: the sign of the distance has its own
    buckets), plus one extra bucket for slots without a position (persistent and long-term memory)."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 256):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.bias = nn.Embedding(num_buckets + 1, heads)

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        n = self.num_buckets // 2
        out = (rel > 0).long() * n
        rel, exact = rel.abs(), n // 2
        log = (
            exact
            + (torch.log(rel.float().clamp(min=1) / exact) / math.log(self.max_distance / exact) * (n - exact)).long()
        )
        return out + torch.where(rel < exact, rel, log.clamp(max=n - 1))

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor, k_has_pos: torch.Tensor | None = None) -> torch.Tensor:
        "Positions (Q,) and (K,) -> additive bias (1, H, Q, K); keys where `k_has_pos` is False get the extra bucket."
        b = self.bucket(k_pos[None, :] - q_pos[:, None])  # (Q, K)
        if k_has_pos is not None:
            b = torch.where(k_has_pos[None, :], b, self.num_buckets)
        return self.bias(b).permute(2, 0, 1)[None]  # (1, H, Q, K)


class MLMHead(nn.Module):
    "Dense, GELU, RMSNorm, then the decoder (weights tied to the word embeddings) with its own bias."

    def __init__(self, config: EncoderConfig):
        super().__init__()
        D = config.hidden_size
        self.dense, self.norm = nn.Linear(D, D), nn.RMSNorm(D, eps=config.norm_eps)
        self.decoder = nn.Linear(D, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(h))), self.decoder.weight, self.bias)  # (..., V), one fused addmm


class ClassificationHead(nn.Module):
    "Concat pooling over the real tokens of the whole input, dropout, linear."

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.drop, self.out = Dropout(config.classifier_dropout), nn.Linear(3 * config.hidden_size, config.num_labels)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(masked_concat_pool(h, mask)))  # (B, C)


class EncoderPreTrainedModel(PreTrainedModel):
    "Weight initialisation shared by ulmfit_tx's encoders; each family sets `config_class`."

    base_model_prefix = "model"
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MLMHead):
            init.zeros_(module.bias)
        elif isinstance(module, nn.GRUCell):
            for p in (module.weight_ih, module.weight_hh):
                init.normal_(p, std=std)
            for p in (module.bias_ih, module.bias_hh):
                init.zeros_(p)
        for name in getattr(module, "normal_init", ()):  # a module's own parameters: small random values
            if getattr(module, name) is not None:
                init.normal_(getattr(module, name), std=std)


class SegmentedEncoder(EncoderPreTrainedModel):
    """Base of the memory encoders: token embeddings with an RMSNorm (as `scratch`), relative positions,
    blocks and a final norm; the forward reads an input of any length one segment at a time and carries
    the memories. A family defines `empty_memories`, `reset_memories` and `segment_forward`."""

    def __init__(self, config: MemoryConfig, **block_kwargs):
        super().__init__(config)
        n = config.num_hidden_layers
        layers = list(range(n)) if config.memory_layers is None else sorted(set(config.memory_layers))
        if any(not 0 <= i < n for i in layers):
            raise ValueError(f"memory_layers {layers} must lie in 0..{n - 1}")
        self.memory_layers = layers
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.embed_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.drop = Dropout(config.hidden_dropout)
        self.rel_pos = RelativePositionBias(
            config.num_attention_heads, config.rel_pos_buckets, config.rel_pos_max_distance
        )
        self.layers = nn.ModuleList([Block(config, **block_kwargs) for _ in range(n)])
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, new):
        self.embed = new

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, memories=None, **kwargs
    ) -> EncoderOutput:
        "Ids (B, L), any L: segments of `segment_len` in order; returns states (B, L, D) and detached memories."
        B, L = input_ids.shape
        S = self.config.segment_len
        keep = attention_keep(input_ids, attention_mask)  # (B, L)
        pad = -L % S
        ids = F.pad(input_ids, (0, pad), value=self.config.pad_token_id or 0)  # (B, nS)
        keep = F.pad(keep, (0, pad), value=False)
        mems = self.empty_memories(B, ids.device) if memories is None else memories
        states, aux = [], []
        for i in range(ids.shape[1] // S):
            h, mems, a = self.segment_forward(ids[:, i * S : (i + 1) * S], keep[:, i * S : (i + 1) * S], mems, index=i)
            states.append(h)  # (B, S, D)
            if a is not None:
                aux.append(a)
        aux_loss = torch.stack(aux).mean() if aux else None
        return EncoderOutput(last_hidden_state=torch.cat(states, 1)[:, :L], memories=mems.detach(), aux_loss=aux_loss)


def attention_keep(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    "The attention mask as booleans (B, L), True at real tokens; all True when none is given (as in BERT)."
    return torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()


def memory_attention_mask(
    rel_pos: RelativePositionBias,
    keep: torch.Tensor,  # (B, S) True at the real tokens of the segment
    parts: list,  # Memory key parts before the segment: (mask (B, K_i), positions (K_i,) or None)
    causal: bool = False,  # Segment tokens see only earlier ones (memory is always visible)
    allowed: torch.Tensor | None = None,  # (B, S, S) bool: which segment keys each query sees (overrides keep/causal)
) -> torch.Tensor:
    """Additive mask (B, H, S, K) over the keys [*parts, segment]: relative position bias where a key
    is visible, -inf elsewhere. A query always sees itself, so padded rows never divide by zero."""
    B, S = keep.shape
    dev = keep.device
    q_pos = torch.arange(S, device=dev)
    if allowed is None:
        allowed = keep[:, None, :].expand(B, S, S)
        if causal:
            allowed = allowed & torch.ones(S, S, dtype=torch.bool, device=dev).tril()
    allowed = allowed | torch.eye(S, dtype=torch.bool, device=dev)
    masks = [m[:, None, :].expand(B, S, m.shape[1]) for m, _ in parts] + [allowed]
    pos = [p if p is not None else torch.zeros(m.shape[1], dtype=torch.long, device=dev) for m, p in parts] + [q_pos]
    has_pos = [torch.full((m.shape[1],), p is not None, device=dev) for m, p in parts] + [
        torch.ones_like(q_pos, dtype=torch.bool)
    ]
    bias = rel_pos(q_pos, torch.cat(pos), torch.cat(has_pos))  # (1, H, S, K)
    return bias.masked_fill(~torch.cat(masks, dim=2)[:, None], float("-inf"))  # (B, H, S, K)


class MaskedLMMixin:
    "`...ForMaskedLM` of a family: its base model (`base_class`) and a tied MLM head."

    _tied_weights_keys = {"lm_head.decoder.weight": "model.embed.weight"}
    base_class: type

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.model, self.lm_head = self.base_class(config), MLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, new):
        self.lm_head.decoder = new

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        memories=None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> HeadOutput:
        out = self.model(input_ids, attention_mask, memories=memories)
        logits = self.lm_head(out.last_hidden_state)  # (B, L, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
        return HeadOutput(loss=loss, logits=logits, memories=out.memories, aux_loss=out.aux_loss)


class SequenceClassificationMixin:
    "`...ForSequenceClassification` of a family: concat pooling over every token the encoder read."

    base_class: type

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.model, self.head = self.base_class(config), ClassificationHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        memories=None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> HeadOutput:
        mask = attention_keep(input_ids, attention_mask)
        out = self.model(input_ids, mask, memories=memories)
        logits = self.head(out.last_hidden_state, mask)  # (B, C)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
        return HeadOutput(loss=loss, logits=logits, memories=out.memories, aux_loss=out.aux_loss)
