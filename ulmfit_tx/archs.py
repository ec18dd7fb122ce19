"""What ulmfit_tx knows about each Hugging Face architecture (where its embeddings, layers and MLM
head live), and the splitters built on it: one parameter group for the embeddings, one per
encoder layer, one for the head, each parameter in exactly one group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fastcore.basics import nested_attr
from torch import nn

from .errors import UlmfitError

__all__ = [
    "ArchSpec",
    "ARCHS",
    "register_arch",
    "arch_spec",
    "max_positions",
    "encoder_groups",
    "clas_splitter",
    "lm_splitter",
    "marge_splitter",
]


@dataclass
class ArchSpec:
    "Where the parts of one architecture's base model (and MLM model) are."

    embeddings: list[str]  # Attribute paths on the base model of the embedding modules (first group)
    layers: str  # Attribute path on the base model of the `nn.ModuleList` of encoder layers
    mlm_head: Callable | None  # f(mlm_model, hidden (N, H)) -> logits (N, V); None: full logits are gathered
    has_pooler: bool = False  # Whether the base model builds a pooler we drop (`add_pooling_layer=False`)
    pos_offset: int = 0  # Position slots the model reserves (RoBERTa counts from padding_idx + 1)


ARCHS: dict[str, ArchSpec] = {
    "bert": ArchSpec(["embeddings"], "encoder.layer", lambda m, h: m.cls(h), has_pooler=True),
    "roberta": ArchSpec(["embeddings"], "encoder.layer", lambda m, h: m.lm_head(h), has_pooler=True, pos_offset=2),
    # ALBERT shares one transformer layer across all depths: its groups are the embeddings with the
    # projection into the hidden size, the one shared layer group, and the head.
    "albert": ArchSpec(
        ["embeddings", "encoder.embedding_hidden_mapping_in"],
        "encoder.albert_layer_groups",
        lambda m, h: m.predictions(h),
        has_pooler=True,
    ),
    "distilbert": ArchSpec(
        ["embeddings"],
        "transformer.layer",
        lambda m, h: m.vocab_projector(m.vocab_layer_norm(m.activation(m.vocab_transform(h)))),
    ),
}


def register_arch(model_type: str, spec: ArchSpec):
    "Teach ulmfit_tx a new `config.model_type`: splitters, gradual unfreezing and the MLM head then work on it."
    ARCHS[model_type] = spec


def arch_spec(model_type: str) -> ArchSpec:
    "The spec of `model_type`, or an error that says how to add one."
    if model_type not in ARCHS:
        raise UlmfitError(
            f"no layer groups known for model type {model_type!r} (known: {', '.join(ARCHS)}); "
            "pass splitter=your_function to the learner (it returns a list of parameter lists), "
            "or describe it with ulmfit_tx.register_arch(model_type, ArchSpec(...))"
        )
    return ARCHS[model_type]


def max_positions(config) -> int:
    "The longest sequence a model with `config` accepts, special tokens included."
    spec = ARCHS.get(config.model_type)
    return getattr(config, "max_position_embeddings", 512) - (spec.pos_offset if spec else 0)


def encoder_groups(hf: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    "The embedding modules and the encoder layers of a Hugging Face model (base model or one with a head)."
    base = hf.base_model
    spec = arch_spec(hf.config.model_type)
    return [nested_attr(base, p) for p in spec.embeddings], list(nested_attr(base, spec.layers))


def _params(modules, seen: set) -> list[nn.Parameter]:
    "Parameters of `modules` not yet in `seen` (shared and tied weights are counted once)."
    out = []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _groups(model: nn.Module, emb_last: bool) -> list[list[nn.Parameter]]:
    emb, layers = encoder_groups(model.hf)
    seen: set = set()
    emb_p = _params(emb, seen)
    layer_ps = [_params([l], seen) for l in layers]
    rest = _params([model], seen)  # the head, the pooler, and anything the wrapper adds
    groups = layer_ps + [emb_p + rest] if emb_last else [emb_p] + layer_ps + [rest]
    return [g for g in groups if g]


def clas_splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    "Classifier groups: embeddings, each encoder layer, then the head (as fastai's `awd_lstm_clas_split`)."
    return _groups(model, emb_last=False)


def lm_splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """MLM groups: each encoder layer, then the embeddings together with the MLM head, whose decoder is
    tied to the word embeddings (as fastai's `awd_lstm_lm_split`): `freeze()` trains embeddings and head."""
    return _groups(model, emb_last=True)


def marge_splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """Marge groups: the encoder (with the word embeddings the decoder shares), then the decoder and beta, so
    `freeze()` trains a new decoder on a pretrained encoder first."""
    enc = set(map(id, model.hf.encoder.parameters()))
    return [list(model.hf.encoder.parameters()), [p for p in model.hf.parameters() if id(p) not in enc]]
