"""`compressive`: the Compressive Transformer as a bidirectional MLM encoder. Each memory layer keeps
its inputs at the last `mem_len` positions (detached); states pushed out of that memory are
compressed by `cmem_ratio` (strided convolution, or a mean or max over real states) into a
compressed memory of `cmem_len` slots. An attention-reconstruction loss trains the compressors, and
only them: it reads every other weight detached, and the compressed memory is stored detached."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import (
    EncoderPreTrainedModel,
    MaskedLMMixin,
    MemoryConfig,
    SegmentedEncoder,
    SequenceClassificationMixin,
    memory_attention_mask,
)

__all__ = [
    "CompressiveConfig",
    "CompressiveMemories",
    "Compressor",
    "CompressiveModel",
    "CompressiveForMaskedLM",
    "CompressiveForSequenceClassification",
]


class CompressiveConfig(MemoryConfig):
    model_type = "ulmfit_compressive"
    cmem_len: int = 32  # Compressed memory slots per memory layer (0: none)
    cmem_ratio: int = 4  # States per compressed slot
    compress: str = "conv"  # "conv" (strided convolution), "mean" or "max"
    aux_loss_weight: float = 1.0  # Weight of the attention-reconstruction loss
    gru_gated_residual: bool = False  # GRU gates instead of residual sums


@dataclass
class CompressiveMemories:
    "State carried from one segment to the next."

    mem: tuple  # Per memory layer (B, M, D): its inputs at the last M positions, M <= mem_len
    mem_mask: torch.Tensor  # (B, M) True where `mem` holds a real token
    cmem: tuple  # Per memory layer (B, C, D): compressed older states, C <= cmem_len
    cmem_mask: torch.Tensor  # (B, C) True where a slot compresses at least one real token

    def detach(self) -> CompressiveMemories:
        return CompressiveMemories(
            tuple(m.detach() for m in self.mem), self.mem_mask, tuple(c.detach() for c in self.cmem), self.cmem_mask
        )


class Compressor(nn.Module):
    """Compresses evicted states (B, E, D) into (B, ceil(E / ratio), D), padding the oldest end when E is not a
    multiple."""

    def __init__(self, dim: int, ratio: int, kind: str = "conv"):
        super().__init__()
        if kind not in ("conv", "mean", "max"):
            raise ValueError(f"compress must be conv, mean or max, not {kind!r}")
        self.ratio, self.kind = ratio, kind
        self.conv = nn.Conv1d(dim, dim, ratio, stride=ratio) if kind == "conv" else None

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        "x (B, E, D), keep (B, E) -> (B, ceil(E / ratio), D); padding and padded tokens count as nothing."
        B, E, D = x.shape
        pad = -E % self.ratio
        x = F.pad(x * keep[..., None], (0, 0, pad, 0))  # (B, E', D)
        kg = F.pad(keep, (pad, 0), value=False).view(B, -1, self.ratio, 1)  # (B, E'/r, r, 1)
        if self.kind == "conv":
            return self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, E'/r, D)
        groups = x.view(B, -1, self.ratio, D)
        if self.kind == "mean":
            return groups.sum(2) / kg.sum(2).clamp(min=1)
        return groups.masked_fill(~kg, torch.finfo(x.dtype).min).max(2).values.masked_fill(~kg.any(2), 0)

    def mask(self, keep: torch.Tensor) -> torch.Tensor:
        "Which compressed slots (B, ceil(E / ratio)) hold at least one real token."
        return F.pad(keep, (-keep.shape[1] % self.ratio, 0), value=False).view(len(keep), -1, self.ratio).any(2)


class CompressiveModel(SegmentedEncoder):
    config_class = CompressiveConfig

    def __init__(self, config: CompressiveConfig):
        super().__init__(config, gru_gated=config.gru_gated_residual)
        self.compressors = nn.ModuleList(
            [Compressor(config.hidden_size, config.cmem_ratio, config.compress) for _ in self.memory_layers]
            if config.cmem_len
            else []
        )
        self.post_init()

    def empty_memories(self, batch_size: int, device=None) -> CompressiveMemories:
        empty = tuple(torch.zeros(batch_size, 0, self.config.hidden_size, device=device) for _ in self.memory_layers)
        no_mask = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        return CompressiveMemories(empty, no_mask, empty, no_mask)

    def reset_memories(self, memories: CompressiveMemories, rows: torch.Tensor) -> CompressiveMemories:
        "Forget what the rows where `rows` (B,) is True remember: they start new documents."
        return CompressiveMemories(
            memories.mem, memories.mem_mask & ~rows[:, None], memories.cmem, memories.cmem_mask & ~rows[:, None]
        )

    def segment_forward(
        self,
        input_ids: torch.Tensor,
        keep: torch.Tensor,
        memories: CompressiveMemories,
        index: int = 0,
        allowed: torch.Tensor | None = None,
    ):
        """One segment: ids and keep (B, S) -> states (B, S, D), the next memories and the reconstruction
        loss (0 until a state is evicted, and outside training)."""
        cfg, dev = self.config, input_ids.device
        x = self.drop(self.embed_norm(self.embed(input_ids)))  # (B, S, D)
        M, C, S = memories.mem_mask.shape[1], memories.cmem_mask.shape[1], keep.shape[1]
        cpos = -M - cfg.cmem_ratio * torch.arange(
            C, 0, -1, device=dev
        )  # compressed slot j sits ratio*(C-j) before the memory
        parts = [(memories.cmem_mask, cpos), (memories.mem_mask, torch.arange(-M, 0, device=dev))]
        with_mem = memory_attention_mask(self.rel_pos, keep, parts, cfg.causal, allowed)  # (B, H, S, C+M+S)
        plain = (
            memory_attention_mask(self.rel_pos, keep, [], cfg.causal, allowed)  # (B, H, S, S)
            if len(self.memory_layers) < len(self.layers)
            else None
        )  # for layers without memory
        evict = max(0, M + S - cfg.mem_len)  # states that leave the memory after it
        compress = bool(evict and self.compressors)
        inputs, qkvs = [], []  # each memory layer's inputs and attention
        for i, layer in enumerate(self.layers):
            if i in self.memory_layers:
                k = len(inputs)
                inputs.append(x)
                x, qkv = layer(x, with_mem, (memories.cmem[k], memories.mem[k]), return_qkv=True)
                qkvs.append(qkv)
            else:
                x = layer(x, plain)
        # push the segment into the memory; what falls out of it is compressed
        full_mask = torch.cat([memories.mem_mask, keep], 1)  # (B, M+S)
        cmem_mask = memories.cmem_mask
        if compress:
            new_mask = self.compressors[0].mask(full_mask[:, :evict])  # (B, ceil(evict / ratio))
            cmem_mask = torch.cat([cmem_mask, new_mask], 1)[:, -cfg.cmem_len :]
        mem, cmem, aux = [], [], x.new_zeros(())
        for k, (m, c, s) in enumerate(zip(memories.mem, memories.cmem, inputs)):
            full = torch.cat([m, s.detach()], 1)  # (B, M+S, D)
            mem.append(full[:, evict:])
            if not compress:
                cmem.append(c)
                continue
            new = self.compressors[k](full[:, :evict], full_mask[:, :evict])  # (B, ceil(evict / ratio), D)
            cmem.append(torch.cat([c, new.detach()], 1)[:, -cfg.cmem_len :])
            if self.training:
                q, keys, values = qkvs[k]  # the evicted states' keys: C..C+evict
                aux = aux + self.reconstruction_loss(
                    self.layers[self.memory_layers[k]],
                    q,
                    keys[:, :, C : C + evict],
                    values[:, :, C : C + evict],
                    full_mask[:, :evict],
                    new,
                    new_mask,
                )
        aux = aux * cfg.aux_loss_weight / max(1, len(inputs))
        return self.norm(x), CompressiveMemories(tuple(mem), full_mask[:, evict:], tuple(cmem), cmem_mask), aux

    @staticmethod
    def reconstruction_loss(layer, q, old_k, old_v, old_mask, new, new_mask) -> torch.Tensor:
        """How differently the segment's queries q (B, H, S, Dh) read the evicted states (their keys and
        values from the attention pass) and their compression `new` (B, C', D), everything but `new`
        detached and the layer's weights too: the gradient reaches the compressor only."""
        rows = old_mask.any(1)  # rows that evicted a real token
        if not rows.any():
            return new.new_zeros(())
        if not rows.all():  # the others would attend to nothing
            q, old_k, old_v, old_mask, new, new_mask = (t[rows] for t in (q, old_k, old_v, old_mask, new, new_mask))
        q, old_k, old_v = q.detach(), old_k.detach(), old_v.detach()
        with torch.no_grad():
            target = F.scaled_dot_product_attention(q, old_k, old_v, attn_mask=old_mask[:, None, None])
        normed = F.rms_norm(new, new.shape[-1:], layer.norm1.weight.detach(), layer.norm1.eps)
        k, v = layer.attn.keys_values(normed, detach_weights=True)  # (b, H, C', Dh)
        pred = F.scaled_dot_product_attention(q, k, v, attn_mask=new_mask[:, None, None])
        return F.mse_loss(pred, target)


class CompressiveForMaskedLM(MaskedLMMixin, EncoderPreTrainedModel):
    config_class = CompressiveConfig
    base_class = CompressiveModel


class CompressiveForSequenceClassification(SequenceClassificationMixin, EncoderPreTrainedModel):
    config_class = CompressiveConfig
    base_class = CompressiveModel
