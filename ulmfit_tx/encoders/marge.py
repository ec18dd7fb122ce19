"""Marge (Lewis et al. 2020, "Pre-training via Paraphrasing"): an encoder adapted to a corpus without masking. A
decoder reconstructs a target document from evidence documents of the same corpus; the relevance of each evidence
document biases the decoder's cross-attention, so the retriever (the encoder's first `retrieval_layer` layers) learns
from the reconstruction loss alone.

    g(x)    = the first token's state after `retrieval_layer` encoder layers, minus its corpus mean `center` (updated
              at every reindex; `config.center=False` keeps it zero, as in the paper), L2-normalised
    f(x, z) = cos(g(x), g(z)) = g(x) . g(z)
    cross-attention logit of a token of evidence z += beta * f(x, z)   (every cross-attention layer and head)

The encoder is any registered Hugging Face encoder (BERT, RoBERTa, ALBERT, DistilBERT, ulmfit_tx's `scratch`), built
from `config.encoder`, or a `scratch` encoder from the fields below; the decoder is ulmfit_tx's pre-norm blocks and
shares the encoder's word embeddings (input and output)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CONFIG_MAPPING, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from ..archs import ARCHS, encoder_groups
from ..kernels import Dropout
from .common import Attention, Block, EncoderConfig, EncoderPreTrainedModel, FeedForward, attention_keep

__all__ = ["MargeConfig", "MargeOutput", "CrossBlock", "MargeDecoder", "MargeModel"]


class MargeConfig(EncoderConfig):
    """Marge's encoder, retrieval and decoder. `hidden_size` is the encoder's (the decoder works at that width);
    `num_attention_heads`, `intermediate_size` and the dropouts size the decoder (and a `scratch` encoder)."""

    model_type = "ulmfit_marge"
    encoder: dict | None = None  # The encoder's config as a dict (any registered model type); None: `scratch`
    num_hidden_layers: int = 4  # Layers of a `scratch` encoder (ignored when `encoder` is given)
    retrieval_layer: int = 2  # Encoder layers before the document embedding g(x)
    self_layers: int = 2  # Decoder layers with causal self-attention only
    cross_layers: int = 2  # Then decoder layers with self-attention and cross-attention over the evidence
    max_position_embeddings: int = 512  # Longest target (decoder positions; also a `scratch` encoder's)
    beta_init: float = 5.0  # Initial scale of the relevance bias (learned)
    center: bool = True  # Subtract the corpus mean of the first-token states before normalising (set at
    # each reindex); False: the paper's plain normalisation

    def encoder_config(self):
        """The encoder's config object: `encoder` as its model type's config class, or a `scratch` config from these
        fields."""
        if self.encoder is not None:
            return CONFIG_MAPPING[self.encoder["model_type"]].from_dict(self.encoder)
        fields = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "hidden_dropout",
            "attn_dropout",
            "attn_layer_dropout",
            "ff_dropout",
            "norm_eps",
            "initializer_range",
            "pad_token_id",
            "max_position_embeddings",
        )
        return CONFIG_MAPPING["ulmfit_scratch"](**{f: getattr(self, f) for f in fields})


@dataclass
class MargeOutput(ModelOutput):
    "Loss (with `labels`), next-token logits (B, T, V), relevance scores f(x, z) (B, K) and the current beta."

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    beta: torch.Tensor | None = None


class CrossBlock(nn.Module):
    "Pre-norm decoder block: causal self-attention, cross-attention over all evidence tokens at once, feed-forward."

    def __init__(self, config: MargeConfig):
        super().__init__()
        D, H = config.hidden_size, config.num_attention_heads
        self.norm1, self.norm_x, self.norm2 = (nn.RMSNorm(D, eps=config.norm_eps) for _ in range(3))
        self.attn = Attention(D, H, config.attn_dropout, config.attn_layer_dropout)
        self.cross = Attention(D, H, config.attn_dropout, config.attn_layer_dropout)
        self.ff = FeedForward(D, config.intermediate_size, config.ff_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, evidence: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        "x (B, T, D); mask (B, 1, T, T) bool; evidence (B, KL, D) token states; bias (B, 1, 1, KL) additive."
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)  # (B, T, D)
        x = x + self.cross(self.norm_x(x), evidence, bias)  # (B, T, D) one softmax over all evidence tokens
        return x + self.ff(self.norm2(x))


class MargeDecoder(nn.Module):
    "Positions, `self_layers` causal blocks, `cross_layers` blocks with cross-attention, a final norm."

    def __init__(self, config: MargeConfig, embed_dim: int):
        super().__init__()
        D = config.hidden_size
        self.pos = nn.Embedding(config.max_position_embeddings, D)
        self.embed_in = nn.Linear(embed_dim, D) if embed_dim != D else nn.Identity()  # ALBERT: narrower embeddings
        self.embed_out = nn.Linear(D, embed_dim) if embed_dim != D else nn.Identity()
        self.embed_norm, self.norm = nn.RMSNorm(D, eps=config.norm_eps), nn.RMSNorm(D, eps=config.norm_eps)
        self.drop = Dropout(config.hidden_dropout)
        self.self_layers = nn.ModuleList([Block(config) for _ in range(config.self_layers)])
        self.cross_layers = nn.ModuleList([CrossBlock(config) for _ in range(config.cross_layers)])
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(
        self, emb: nn.Embedding, ids: torch.Tensor, keep: torch.Tensor, evidence: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        "ids, keep (B, T); evidence (B, KL, D); bias (B, 1, 1, KL) -> final states (B, T, D)."
        T = ids.shape[1]
        x = self.embed_in(emb(ids)) + self.pos(torch.arange(T, device=ids.device))  # (B, T, D)
        x = self.drop(self.embed_norm(x))
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        mask = causal & keep[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=ids.device)  # (B, 1, T, T)
        for layer in self.self_layers:
            x = layer(x, mask)  # (B, T, D)
        for layer in self.cross_layers:
            x = layer(x, mask, evidence, bias)
        return self.norm(x)

    def logits(self, emb: nn.Embedding, h: torch.Tensor) -> torch.Tensor:
        "States (..., D) -> next-token logits (..., V), tied to the word embeddings."
        return F.linear(self.embed_out(h), emb.weight, self.bias)


class _Stop(Exception):
    "Raised by the retrieval-layer hook to end an encoder pass that only needs the document embedding."


class MargeModel(EncoderPreTrainedModel):
    config_class = MargeConfig

    def __init__(self, config: MargeConfig):
        super().__init__(config)
        from . import MEMORY_MODEL_TYPES

        ec = config.encoder_config()
        if ec.model_type in MEMORY_MODEL_TYPES or ec.model_type == config.model_type:
            why = (
                "it reads segment by segment"
                if ec.model_type in MEMORY_MODEL_TYPES
                else "it has no encoder layers of its own"
            )
            raise ValueError(f"a {ec.model_type!r} model cannot be Marge's encoder ({why})")
        spec = ARCHS.get(ec.model_type)
        self.encoder = AutoModel.from_config(ec, **({"add_pooling_layer": False} if spec and spec.has_pooler else {}))
        n = ec.num_hidden_layers
        if not 1 <= config.retrieval_layer <= n:
            raise ValueError(f"retrieval_layer {config.retrieval_layer} must lie within the encoder's 1..{n} layers")
        if config.cross_layers < 1:
            raise ValueError("the decoder needs at least one cross-attention layer (cross_layers >= 1)")
        if ec.hidden_size != config.hidden_size:
            raise ValueError(f"hidden_size {config.hidden_size} differs from the encoder's {ec.hidden_size}")
        self.decoder = MargeDecoder(config, self.encoder.get_input_embeddings().embedding_dim)
        self.beta = nn.Parameter(torch.tensor(float(config.beta_init)))
        self.register_buffer("center", torch.zeros(config.hidden_size))  # (D,) mean first-token state of the corpus
        self.post_init()

    @classmethod
    def from_encoder(cls, encoder: PreTrainedModel, **kwargs) -> MargeModel:
        "A Marge model around the weights of `encoder` (a base model), with a fresh decoder sized from its config."
        ec = encoder.config
        H = ec.hidden_size
        fields = dict(
            vocab_size=ec.vocab_size,
            hidden_size=H,
            num_attention_heads=ec.num_attention_heads,
            pad_token_id=ec.pad_token_id,
            intermediate_size=getattr(ec, "intermediate_size", None) or getattr(ec, "hidden_dim", 4 * H),
        )
        config = cls.config_class(encoder=ec.to_dict(), **{**fields, **kwargs})
        model = cls(config)
        unexpected = model.encoder.load_state_dict(encoder.state_dict(), strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"the encoder's weights do not fit its config: {unexpected[:3]}")
        return model

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def first_states(
        self, ids: torch.Tensor, mask: torch.Tensor, states: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids, mask (N, L) -> the first token's state after `retrieval_layer` layers (N, D), and the last layer's
        token states (N, L, D) (None with `states=False`: the pass stops at the retrieval layer)."""
        found, calls = {}, [0]

        def hook(module, args, out):  # every layer call (ALBERT reuses its layers)
            calls[0] += 1
            if calls[0] == self.config.retrieval_layer:
                found["h"] = out[0] if isinstance(out, tuple) else out  # (N, L, D)
                if not states:
                    raise _Stop

        handles = [m.register_forward_hook(hook) for m in encoder_groups(self.encoder)[1]]
        try:
            last = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (N, L, D)
        except _Stop:
            last = None
        finally:
            for h in handles:
                h.remove()
        return found["h"][:, 0], last

    def embed(self, first: torch.Tensor) -> torch.Tensor:
        "First-token states (N, D) -> document embeddings g (N, D): centred, L2-normalised."
        return F.normalize(first - self.center, dim=-1)

    def encode(
        self, ids: torch.Tensor, mask: torch.Tensor, states: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        "ids, mask (N, L) -> g (N, D) and the last layer's token states (N, L, D) (None with `states=False`)."
        first, last = self.first_states(ids, mask, states)
        return self.embed(first), last

    def decode(
        self,
        input_ids: torch.Tensor,  # (B, T) target ids (special tokens included)
        attention_mask: torch.Tensor | None,  # (B, T) True at real target tokens
        evidence_ids: torch.Tensor,  # (B, K, L) ids of each target's K evidence documents
        evidence_mask: torch.Tensor,  # (B, K, L) True at real evidence tokens
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's final states (B, T, D) reconstructing the targets from their evidence, and the scores f(x, z)
        (B, K)."""
        B, K, L = evidence_ids.shape
        keep, ev_keep = attention_keep(input_ids, attention_mask), evidence_mask.bool()
        gx, _ = self.encode(input_ids, keep, states=False)  # (B, D)
        gz, ev = self.encode(evidence_ids.flatten(0, 1), ev_keep.flatten(0, 1))  # (BK, D), (BK, L, D)
        scores = torch.einsum("bd,bkd->bk", gx, gz.view(B, K, -1))  # (B, K) cosine f(x, z)
        bias = (self.beta * scores)[:, :, None].expand(B, K, L)  # (B, K, L) every token of z gets beta f(x, z)
        bias = bias.masked_fill(~ev_keep, float("-inf")).reshape(B, 1, 1, K * L)
        return self.decoder(self.get_input_embeddings(), input_ids, keep, ev.reshape(B, K * L, -1), bias), scores

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        "Decoder states (..., D) -> next-token logits (..., V)."
        return self.decoder.logits(self.get_input_embeddings(), h)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        evidence_ids: torch.Tensor,
        evidence_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> MargeOutput:
        "`decode`, then logits (B, T, V) and, with `labels` (B, T: the next token, -100 where none), the loss."
        h, scores = self.decode(input_ids, attention_mask, evidence_ids, evidence_mask)
        logits = self.logits(h)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return MargeOutput(loss=loss, logits=logits, scores=scores, beta=self.beta.detach())
