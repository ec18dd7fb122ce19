"""`memxl`: Memory Transformer-XL as a bidirectional MLM encoder. Each memory layer reads, besides the
current segment: `num_mem_kv` persistent learned slots, a short-term memory (its own inputs at the
last `mem_len` real positions, detached, as in Transformer-XL) and a long-term memory of `lmem_len`
slots that is rewritten after every segment by attention over (memory, new states) with a gated
update. Positions are relative (a bucketed bias); long-term and persistent slots have none."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .common import (
    Attention,
    EncoderPreTrainedModel,
    MaskedLMMixin,
    MemoryConfig,
    SegmentedEncoder,
    SequenceClassificationMixin,
    memory_attention_mask,
)

__all__ = ["MemXLConfig", "MemXLMemories", "MemXLModel", "MemXLForMaskedLM", "MemXLForSequenceClassification"]


class MemXLConfig(MemoryConfig):
    model_type = "ulmfit_memxl"
    lmem_len: int = 16  # Long-term memory slots (0: none)
    mem_write_iters: int = 2  # Rounds of attention that write the long-term memory after a segment
    num_mem_kv: int = 4  # Persistent learned key/value slots in every layer
    detach_every: int = 1  # Within one call, the long-term memory's gradient flows back through this many writes


@dataclass
class MemXLMemories:
    "State carried from one segment to the next."

    mem: tuple  # Per memory layer (B, M, D): that layer's inputs at the last M positions, M <= mem_len
    mem_mask: torch.Tensor  # (B, M) True where `mem` holds a real token
    lmem: torch.Tensor | None  # (B, lmem_len, D) long-term memory, None when lmem_len is 0

    def detach(self) -> MemXLMemories:
        return MemXLMemories(
            tuple(m.detach() for m in self.mem), self.mem_mask, None if self.lmem is None else self.lmem.detach()
        )


class LongMemoryWriter(nn.Module):
    """Writes the long-term memory after a segment: `iters` rounds in which the slots attend over
    [slots; the memory layers' states at real positions], each followed by a gated update."""

    normal_init = ("init", "depth")

    def __init__(self, config: MemXLConfig, n_sources: int):
        super().__init__()
        D = config.hidden_size
        self.iters = config.mem_write_iters
        self.init = nn.Parameter(torch.zeros(config.lmem_len, D))  # the memory of a new document
        self.depth = nn.Parameter(torch.zeros(n_sources, 1, 1, D))  # marks which layer a state comes from
        self.norm = nn.RMSNorm(D, eps=config.norm_eps)
        self.attn = Attention(D, config.num_attention_heads)
        self.gate = nn.Linear(2 * D, D)

    def forward(self, lmem: torch.Tensor, states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """lmem (B, Lm, D), states (n, B, S, D), keep (B, S) -> new lmem (B, Lm, D); rows with no real token keep
        theirs."""
        n, B, S, D = states.shape
        src = (states + self.depth).transpose(0, 1).reshape(B, n * S, D)  # (B, nS, D)
        mask = torch.cat([torch.ones_like(lmem[..., 0], dtype=torch.bool), keep.repeat(1, n)], 1)[
            :, None, None
        ]  # (B,1,1,Lm+nS)
        new = lmem
        for _ in range(self.iters):
            upd = self.attn(self.norm(new), self.norm(torch.cat([new, src], 1)), mask)  # (B, Lm, D)
            z = torch.sigmoid(self.gate(torch.cat([new, upd], -1)))  # (B, Lm, D) how much to overwrite
            new = (1 - z) * new + z * upd
        return torch.where(keep.any(1)[:, None, None], new, lmem)


class MemXLModel(SegmentedEncoder):
    config_class = MemXLConfig

    def __init__(self, config: MemXLConfig):
        super().__init__(config, num_mem_kv=config.num_mem_kv)
        self.writer = (
            LongMemoryWriter(config, len(self.memory_layers)) if config.lmem_len and self.memory_layers else None
        )
        self.post_init()

    def empty_memories(self, batch_size: int, device=None) -> MemXLMemories:
        "Memories of new documents: no short-term states, the learned initial long-term memory."
        D = self.config.hidden_size
        mem = tuple(torch.zeros(batch_size, 0, D, device=device) for _ in self.memory_layers)
        lmem = None if self.writer is None else self.writer.init.expand(batch_size, -1, -1)
        return MemXLMemories(mem, torch.zeros(batch_size, 0, dtype=torch.bool, device=device), lmem)

    def reset_memories(self, memories: MemXLMemories, rows: torch.Tensor) -> MemXLMemories:
        "Forget what the rows where `rows` (B,) is True remember: they start new documents."
        lmem = memories.lmem
        if lmem is not None:
            lmem = torch.where(rows[:, None, None], self.writer.init.expand_as(lmem), lmem)
        return MemXLMemories(memories.mem, memories.mem_mask & ~rows[:, None], lmem)

    def segment_forward(
        self,
        input_ids: torch.Tensor,
        keep: torch.Tensor,
        memories: MemXLMemories,
        index: int = 0,
        allowed: torch.Tensor | None = None,
    ):
        """One segment: ids and keep (B, S) -> states (B, S, D), the next memories, no auxiliary loss.
        `index` counts the segments of the call (for `detach_every`); `allowed` (B, S, S) overrides the
        in-segment attention pattern."""
        cfg = self.config
        x = self.drop(self.embed_norm(self.embed(input_ids)))  # (B, S, D)
        M = memories.mem_mask.shape[1]
        lm = memories.lmem
        parts = [(keep.new_ones(len(keep), cfg.num_mem_kv), None)] if cfg.num_mem_kv else []  # persistent slots
        plain = (
            memory_attention_mask(self.rel_pos, keep, parts, cfg.causal, allowed)  # (B, H, S, P+S)
            if len(self.memory_layers) < len(self.layers)
            else None
        )  # for layers without memory
        mem_parts = parts + ([(keep.new_ones(len(keep), lm.shape[1]), None)] if lm is not None else [])
        mem_parts.append((memories.mem_mask, torch.arange(-M, 0, device=x.device)))
        with_mem = memory_attention_mask(self.rel_pos, keep, mem_parts, cfg.causal, allowed)  # (B, H, S, P+Lm+M+S)
        inputs = []  # each memory layer's input states
        for i, layer in enumerate(self.layers):
            if i in self.memory_layers:
                k = len(inputs)
                inputs.append(x)
                x = layer(x, with_mem, ([lm] if lm is not None else []) + [memories.mem[k]])
            else:
                x = layer(x, plain)
        # next memories: the last mem_len states (a new document's pad-only rows stay masked)
        start = max(0, M + keep.shape[1] - cfg.mem_len)
        mem = tuple(torch.cat([m, s.detach()], 1)[:, start:] for m, s in zip(memories.mem, inputs))
        mem_mask = torch.cat([memories.mem_mask, keep], 1)[:, start:]
        if lm is not None:
            # the write reads detached states (as the short-term memory); its gradient flows back through
            # at most `detach_every` writes (the first memory of a call is the learned initial one, or detached)
            src = lm.detach() if index and index % cfg.detach_every == 0 else lm
            lm = self.writer(src, torch.stack(inputs).detach(), keep)
        return self.norm(x), MemXLMemories(mem, mem_mask, lm), None


class MemXLForMaskedLM(MaskedLMMixin, EncoderPreTrainedModel):
    config_class = MemXLConfig
    base_class = MemXLModel


class MemXLForSequenceClassification(SequenceClassificationMixin, EncoderPreTrainedModel):
    config_class = MemXLConfig
    base_class = MemXLModel
