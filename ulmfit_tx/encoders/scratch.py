"""`scratch`: ulmfit_tx's own small encoder for pretraining from nothing. Pre-norm blocks with
RMSNorm, learned positional embeddings, an RMSNorm on the embeddings (without it the small embeddings
that a tied decoder needs are swamped by the blocks' outputs, and MLM training from nothing starts
slower), padding masked in attention, torch's `scaled_dot_product_attention`, and a weight-tied MLM head."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import Dropout
from .common import (
    Block,
    EncoderConfig,
    EncoderOutput,
    EncoderPreTrainedModel,
    MaskedLMMixin,
    SequenceClassificationMixin,
    attention_keep,
)

__all__ = ["ScratchConfig", "ScratchModel", "ScratchForMaskedLM", "ScratchForSequenceClassification"]


class ScratchConfig(EncoderConfig):
    model_type = "ulmfit_scratch"
    max_position_embeddings: int = 512  # Longest input, special tokens included


class ScratchModel(EncoderPreTrainedModel):
    config_class = ScratchConfig

    def __init__(self, config: ScratchConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.pos = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.drop = Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, new):
        self.embed = new

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> EncoderOutput:
        B, L = input_ids.shape
        keep = attention_keep(input_ids, attention_mask)  # (B, L) True at real tokens
        x = self.embed(input_ids) + self.pos(torch.arange(L, device=input_ids.device))  # (B, L, D)
        x = self.drop(self.embed_norm(x))
        mask = keep[:, None, None, :]  # (B, 1, 1, L) keys to attend
        for layer in self.layers:
            x = layer(x, mask)  # (B, L, D)
        return EncoderOutput(last_hidden_state=self.norm(x))


class ScratchForMaskedLM(MaskedLMMixin, EncoderPreTrainedModel):
    config_class = ScratchConfig
    base_class = ScratchModel


class ScratchForSequenceClassification(SequenceClassificationMixin, EncoderPreTrainedModel):
    config_class = ScratchConfig
    base_class = ScratchModel
