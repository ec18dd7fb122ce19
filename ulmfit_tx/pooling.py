"""ULMFiT's pooling classifier as a Hugging Face model: `PoolingClassifierConfig` and
`PoolingForSequenceClassification` (an encoder of any registered model type, then concat pooling and
BatchNorm/Dropout/Linear layers). This file imports only torch and transformers: a bundle carries a copy as
`modeling_ulmfit_tx.py`, named in config.json's `auto_map`, so `from_pretrained(bundle, trust_remote_code=True)`
and `pipeline()` load it where ulmfit_tx is not installed."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

__all__ = [
    "masked_concat_pool",
    "pair_types",
    "lin_bn_drop",
    "PoolingClassifierHead",
    "PoolingClassifierConfig",
    "PoolingForSequenceClassification",
]


def masked_concat_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    "ULMFiT's concat pooling over real tokens: first token, mean and max of h (B, L, D) -> (B, 3D)."
    m = mask.unsqueeze(-1)  # (B, L, 1)
    first = h[torch.arange(h.shape[0], device=h.device), mask.int().argmax(1)]  # (B, D) first real token
    mean = (h * m).sum(1) / m.sum(1).clamp(min=1)  # (B, D)
    mx = h.masked_fill(~m, torch.finfo(h.dtype).min).max(1).values  # (B, D)
    return torch.cat([first, mean, mx], dim=1)


def pair_types(ids: torch.Tensor, sep: int, mask: torch.Tensor) -> torch.Tensor:
    """Token type ids of pairs of texts encoded as [CLS] a [SEP] b [SEP]: 0 up to the first `sep` token (included), 1
    after it, 0 at padding; what the tokenizer gives as `token_type_ids`, read from the ids (so ids stay the only
    input, of the ONNX graph too)."""
    at = (ids == sep).long()  # (B, L)
    return ((at.cumsum(1) - at).clamp(max=1) * mask).long()  # (B, L): 1 after the first separator


def lin_bn_drop(n_in: int, n_out: int, p: float, act: nn.Module | None) -> nn.Sequential:
    "fastai's `LinBnDrop(n_in, n_out, p=p, act=act)`: BatchNorm1d (weight 1, bias 1e-3), Dropout if p, Linear, act."
    bn = nn.BatchNorm1d(n_in)
    nn.init.constant_(bn.weight, 1.0)
    nn.init.constant_(bn.bias, 1e-3)
    layers = [bn, *([nn.Dropout(p)] if p else []), nn.Linear(n_in, n_out, bias=False), *([act] if act else [])]
    return nn.Sequential(*layers)


class PoolingClassifierHead(nn.Module):
    """ULMFiT's classifier head (fastai's `PoolingLinearClassifier`) on transformer states: the first
    token, the masked mean and the masked max, concatenated, then `LinBnDrop` layers."""

    def __init__(
        self,
        hidden: int,  # Size of the encoder's hidden states
        n_out: int,  # Number of classes
        lin_ftrs: list | None = None,  # Sizes of the hidden linear layers (fastai's default: [50])
        ps: list | None = None,  # Dropout of each hidden layer (default 0.1 each)
        output_p: float = 0.1,  # Dropout on the pooled features
    ):
        super().__init__()
        lin_ftrs = [50] if lin_ftrs is None else list(lin_ftrs)
        ps = [0.1] * len(lin_ftrs) if ps is None else list(ps)
        self.config = dict(hidden=hidden, n_out=n_out, lin_ftrs=lin_ftrs, ps=ps, output_p=output_p)  # (bundles)
        dims, ps = [hidden * 3] + lin_ftrs + [n_out], [output_p] + ps
        acts = [nn.ReLU(inplace=True)] * len(lin_ftrs) + [None]
        self.layers = nn.Sequential(*[lin_bn_drop(i, o, p, a) for i, o, p, a in zip(dims[:-1], dims[1:], ps, acts)])

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.layers(masked_concat_pool(h, mask))  # (B, L, H) -> (B, 3H) -> (B, n_out)


class PoolingClassifierConfig(PreTrainedConfig):
    """An encoder with ULMFiT's pooling head, as a Hugging Face config: what a pooling classifier's bundle holds as
    `config.json`, so `AutoModelForSequenceClassification` and `pipeline("text-classification")` load the bundle."""

    model_type = "ulmfit_tx_pooling"
    encoder: dict | None = None  # The encoder's config as a dict (any registered model type)
    encoder_kwargs: dict | None = None  # Arguments that build the encoder (e.g. {"add_pooling_layer": false})
    pooling: dict | None = None  # `PoolingClassifierHead`'s arguments (hidden, n_out, lin_ftrs, ps, output_p)
    type_sep: int | None = None  # Pairs of texts: the separator token after which token types are 1 (`pair_types`)

    def encoder_config(self) -> PreTrainedConfig:
        "The encoder's config object, of its model type's config class."
        return CONFIG_MAPPING[self.encoder["model_type"]].from_dict(self.encoder)


class PoolingForSequenceClassification(PreTrainedModel):
    """The Hugging Face face of a pooling classifier: the encoder `hf` and `head`, the same modules (and weight names)
    as ulmfit_tx's `SequenceClassifier`, so one safetensors file serves both. The attention mask defaults to the
    padding."""

    config_class = PoolingClassifierConfig
    base_model_prefix = "hf"

    def __init__(self, config: PoolingClassifierConfig):
        super().__init__(config)
        self.hf = AutoModel.from_config(config.encoder_config(), **(config.encoder_kwargs or {}))
        self.head = PoolingClassifierHead(**config.pooling)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        mask = input_ids != self.config.pad_token_id if attention_mask is None else attention_mask.bool()  # (B, L)
        types = {}
        if self.config.type_sep is not None:  # a pair classifier: the tokenizer's types, or read from the ids
            types["token_type_ids"] = (
                pair_types(input_ids, self.config.type_sep, mask) if token_type_ids is None else token_type_ids
            )
        h = self.hf(input_ids=input_ids, attention_mask=mask, **types).last_hidden_state  # (B, L, H)
        logits = self.head(h, mask)  # (B, C)
        return SequenceClassifierOutput(loss=None if labels is None else self._loss(logits, labels), logits=logits)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        "The loss of `config.problem_type`, as Hugging Face's own heads compute it."
        if self.config.problem_type == "regression":
            return nn.functional.mse_loss(logits.squeeze(-1), labels.float().view(-1))
        if self.config.problem_type == "multi_label_classification":
            return nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
        return nn.functional.cross_entropy(logits, labels)
