"""The modules fastai trains: Hugging Face models wrapped to take `TensorText` ids (the attention
mask is read from the padding), and ULMFiT's pooling classifier head (also as a Hugging Face
`...ForSequenceClassification` model, registered with the Auto classes)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedConfig,
    PreTrainedModel,
)

from .archs import ARCHS
from .encoders import MEMORY_MODEL_TYPES
from .errors import UlmfitError
from .io import model_source
from .kernels import use_fast_kernels
from .pooling import (
    PoolingClassifierConfig,
    PoolingClassifierHead,
    PoolingForSequenceClassification,
    pair_types,
)

__all__ = [
    "load_hf",
    "PortableHF",
    "MaskedLM",
    "MemoryMaskedLM",
    "MargeLM",
    "ContrastiveEncoder",
    "PoolingClassifierHead",
    "PoolingClassifierConfig",
    "PoolingForSequenceClassification",
    "SequenceClassifier",
    "pair_types",
    "type_sep",
    "masked_lm_model",
    "classifier_model",
    "marge_model",
    "contrastive_model",
    "load_config",
    "has_mlm_head",
    "default_clf_max_len",
    "base_kwargs",
]

AUTO = {
    "base": AutoModel,
    "masked_lm": AutoModelForMaskedLM,
    "sequence_classification": AutoModelForSequenceClassification,
}


def load_hf(src, family: str = "base", **kwargs) -> PreTrainedModel:
    "Load a model folder or hub name with the Auto class of `family` (base, masked_lm, sequence_classification)."
    if isinstance(src, PreTrainedModel):
        return src
    src = model_source(src)
    try:
        return AUTO[family].from_pretrained(src, **kwargs)
    except Exception as e:
        where = "model folder" if Path(src).exists() else "local folder, nor a hub model reachable from here"
        raise UlmfitError(
            f"{src}: cannot be loaded as a {where} ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None


def base_kwargs(model_type: str) -> dict:
    "Keyword arguments that build a base model without the pooler we do not use."
    spec = ARCHS.get(model_type)
    return {"add_pooling_layer": False} if spec and spec.has_pooler else {}


class PortableHF(nn.Module):
    """Base of the modules that wrap a Hugging Face model as `self.hf`. They pickle it (in
    `learn.export()`) as its config and weights and rebuild it on load with the Auto classes, so an
    export does not depend on pickled transformers objects. `_call` calls the model and keeps its
    auxiliary loss (Compressive Transformer) as `self.aux_loss` for `MemoryCallback`. The model's
    attention and dropout are switched to ulmfit_tx's CPU kernels (`use_fast_kernels`)."""

    hf_family, hf_kwargs = "base", {}
    aux_loss = None

    def _call(self, module: nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kwargs):
        out = module(input_ids=ids, attention_mask=mask, **kwargs)
        self.aux_loss = getattr(out, "aux_loss", None)
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("aux_loss", None)
        state.pop("memories", None)
        modules = dict(state["_modules"])
        hf = modules.pop("hf")
        state["_modules"] = modules
        state["_hf"] = {"config": hf.config.to_dict(), "weights": hf.state_dict()}
        return state

    def __setstate__(self, state):
        saved = state.pop("_hf")
        super().__setstate__(state)
        cfg = saved["config"]
        config = CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
        hf = AUTO[self.hf_family].from_config(config, **self.hf_kwargs)
        hf.load_state_dict(saved["weights"])
        self.hf = use_fast_kernels(hf).eval()


class MaskedLM(PortableHF):
    "A Hugging Face masked-LM model that takes ids; given `labels`, it runs the MLM head only where labels != -100."

    hf_family = "masked_lm"
    new_head = False  # `masked_lm_model` sets it: the checkpoint had no MLM head, this one starts from scratch

    def __init__(
        self,
        hf: PreTrainedModel,  # An `AutoModelForMaskedLM` model
        pad_id: int,  # The tokenizer's padding id: attention is masked there
    ):
        super().__init__()
        self.hf, self.pad_id = use_fast_kernels(hf), pad_id

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        mask = ids != self.pad_id  # (B, L) True at real tokens
        spec = ARCHS.get(self.hf.config.model_type)
        if labels is None or spec is None or spec.mlm_head is None:  # all logits (then gathered if labelled)
            logits = self._call(self.hf, ids, mask).logits  # (B, L, V)
            return logits if labels is None else logits[labels != -100]  # (N, V)
        h = self._call(self.hf.base_model, ids, mask).last_hidden_state  # (B, L, H)
        return spec.mlm_head(self.hf, h[labels != -100])  # (N, V): the head on chosen tokens only


class MemoryMaskedLM(MaskedLM):
    """`MaskedLM` for a memory encoder (memxl, compressive): each batch continues the documents of the
    previous one row by row (`SegmentDL`), so the memories of one call are passed to the next.
    `MemoryCallback` resets them between epochs and for rows that start a new document."""

    memories = None

    def _call(self, module: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
        if self.memories is not None and self.memories.mem_mask.shape[0] != len(ids):
            self.memories = None
        out = module(input_ids=ids, attention_mask=mask, memories=self.memories)
        self.memories, self.aux_loss = out.memories, out.aux_loss
        return out

    def reset(self, rows: torch.Tensor | None = None):
        "Forget everything (`rows` None), or what the rows where `rows` (B,) is True remember."
        if rows is None or self.memories is None:
            self.memories = None
        elif rows.any():
            self.memories = self.hf.base_model.reset_memories(self.memories, rows.to(self.memories.mem_mask.device))


class ContrastiveEncoder(PortableHF):
    """An encoder that embeds each text twice with different dropout masks, SimCSE's two views: ids (B, L) -> (2B, D),
    rows i and B + i the views of text i. Long texts' two dropout views are matched without effort, so two stronger
    augmentations: with `deletion` the second view leaves out that share of the text's tokens; with `halves` the first
    view reads the first half of the text and the second view the second half (they share its topic and tone, not
    its tokens, as DeCLUTR's spans). Special tokens are always read. The augmentations stay on in validation (the
    held-out loss measures the training task)."""

    def __init__(
        self,
        hf: PreTrainedModel,  # A base model (`AutoModel`)
        pad_id: int,  # The tokenizer's padding id: attention is masked there
        pooling: str = "mean",  # "mean": masked mean of the token states (sentence-transformers'); "cls": first token
        deletion: float = 0.0,  # Share of the tokens the second view leaves out (0: dropout alone, as SimCSE)
        special_ids: list[int] | None = None,  # Token ids never left out ([CLS], [SEP], ...)
        halves: bool = False,  # The views read the first and the second half of each text
    ):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise UlmfitError(f"pooling must be 'mean' or 'cls', not {pooling!r}")
        if not 0 <= deletion < 1:
            raise UlmfitError(f"deletion must be in [0, 1), not {deletion}")
        self.hf, self.pad_id, self.pooling, self.deletion, self.halves = (
            use_fast_kernels(hf),
            pad_id,
            pooling,
            deletion,
            halves,
        )
        self.register_buffer("special_ids", torch.tensor(special_ids or [], dtype=torch.long), persistent=False)
        self.hf_kwargs = base_kwargs(hf.config.model_type)

    def embed(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        "One embedding per text: ids (B, L), tokens to read (default: all but padding) -> (B, D)."
        mask = ids != self.pad_id if mask is None else mask  # (B, L) True at the tokens read
        h = self._call(self.hf, ids, mask).last_hidden_state  # (B, L, D)
        if self.pooling == "cls":
            return h[:, 0]  # (B, D)
        m = mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)  # (B, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        was_training = self.hf.training
        self.hf.train()  # the dropout masks make the views
        try:
            mask = torch.cat([ids, ids]) != self.pad_id  # (2B, L)
            special = torch.isin(ids, self.special_ids) if self.halves or self.deletion else None  # (B, L)
            if self.halves:
                real = ids != self.pad_id
                first = real.cumsum(1) <= real.sum(1, keepdim=True) // 2  # (B, L) the first half of the real tokens
                mask[: len(ids)] &= first | special
                mask[len(ids) :] &= ~first | special
            if self.deletion:
                drop = torch.rand(ids.shape, device=ids.device) < self.deletion  # (B, L)
                mask[len(ids) :] &= ~drop | special  # the second views read fewer tokens
            return self.embed(torch.cat([ids, ids]), mask)  # (2B, D): one forward, two dropout masks per text
        finally:
            self.hf.train(was_training)


class MargeLM(PortableHF):
    """A `MargeModel` as fastai trains it: (targets, their mask, evidence, its mask, next-token labels) -> the logits
    (N, V) at the labelled positions only (the vocabulary projection is skipped elsewhere), for `mlm_loss`."""

    def __init__(self, hf: PreTrainedModel):  # A `MargeModel`
        super().__init__()
        use_fast_kernels(hf.encoder)
        self.hf = use_fast_kernels(hf)

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, ev_ids: torch.Tensor, ev_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        h, _ = self.hf.decode(ids, mask, ev_ids, ev_mask)  # (B, T, D)
        return self.hf.logits(h[labels != -100])  # (N, V)


def type_sep(config: PreTrainedConfig, sep: int | None) -> int | None:
    "The separator `pair_types` reads for an encoder that has token types (`sep`: a pair tokenizer's; None: no pair)."
    return sep if sep is not None and getattr(config, "type_vocab_size", 1) > 1 else None


AutoConfig.register(PoolingClassifierConfig.model_type, PoolingClassifierConfig, exist_ok=True)
AutoModelForSequenceClassification.register(PoolingClassifierConfig, PoolingForSequenceClassification, exist_ok=True)


class SequenceClassifier(PortableHF):
    "A Hugging Face encoder with ULMFiT's pooling head, or a `...ForSequenceClassification` model with its own head."

    chunk_len = type_sep = None  # (classifiers pickled before chunk-and-pool and pairs)

    def __init__(
        self,
        hf: PreTrainedModel,  # A base model (with `head`) or a sequence-classification model (without)
        pad_id: int,  # The tokenizer's padding id: attention is masked there
        head: nn.Module | None = None,  # f(states (B, L, H), mask (B, L)) -> logits; None: the model's native head
        chunk_len: int | None = None,  # Chunk-and-pool: inputs are chunks of this many tokens (`HFTokenizer(chunks=)`)
        type_sep: int | None = None,  # Pairs of texts: token types are 1 after this separator (`pair_types`)
    ):
        super().__init__()
        if chunk_len is not None and (head is None or hf.config.model_type in MEMORY_MODEL_TYPES):
            raise UlmfitError(
                "chunk-and-pool needs the pooling head and an encoder without memory (memory encoders read long "
                f"texts segment by segment already), not the {'native head' if head is None else 'memory encoder'}"
            )
        self.hf, self.pad_id, self.head, self.chunk_len = use_fast_kernels(hf), pad_id, head, chunk_len
        self.type_sep = type_sep
        self.hf_family = "base" if head is not None else "sequence_classification"
        self.hf_kwargs = base_kwargs(hf.config.model_type) if head is not None else {}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.chunk_len is not None:
            return self._chunk_and_pool(ids)
        mask = ids != self.pad_id  # (B, L) True at real tokens
        types = {} if self.type_sep is None else {"token_type_ids": pair_types(ids, self.type_sep, mask)}  # (B, L)
        if self.head is None:
            return self._call(self.hf, ids, mask, **types).logits  # (B, C)
        h = self._call(self.hf, ids, mask, **types).last_hidden_state  # (B, L, H): memory encoders read it by segments
        return self.head(h, mask)  # (B, C)

    def _chunk_and_pool(self, ids: torch.Tensor) -> torch.Tensor:
        "Every chunk of each text encoded on its own, the head pooling over all their tokens together."
        B, T = ids.shape
        L = torch.sym_min(T, self.chunk_len)  # a batch of short texts stays one chunk as long as its longest
        ids = nn.functional.pad(ids, (0, (L - T % L) % L), value=self.pad_id).reshape(-1, L)  # (B*C, L)
        mask = ids != self.pad_id  # (B*C, L)
        empty = ~mask.any(1, keepdim=True)  # (B*C, 1): chunks of padding only (the texts shorter than the longest)
        attend = mask | (empty & (torch.arange(L, device=ids.device) == 0))  # they attend to one token: finite states
        h = self._call(self.hf, ids, attend).last_hidden_state  # (B*C, L, H)
        return self.head(h.reshape(B, -1, h.shape[-1]), mask.reshape(B, -1))  # pooled over (B, C*L) -> (B, n_out)


def _check_vocab(hf: PreTrainedModel, tok, src):
    if len(tok) > hf.config.vocab_size:
        raise UlmfitError(
            f"{src}: the tokenizer has {len(tok)} tokens but the model's vocabulary {hf.config.vocab_size}; "
            "use the tokenizer saved with this model"
        )


def masked_lm_model(src, tok) -> MaskedLM:
    """A `MaskedLM` from a model folder, hub name or model. The MLM head is new if the checkpoint has none (a
    sentence-embedding model, an encoder saved without it); `.new_head` says so."""
    if isinstance(src, PreTrainedModel):
        hf, missing = src, ()
    else:
        hf, info = load_hf(src, "masked_lm", output_loading_info=True)
        missing = info["missing_keys"]
    _check_vocab(hf, tok, src)
    model = (MemoryMaskedLM if hf.config.model_type in MEMORY_MODEL_TYPES else MaskedLM)(hf, tok.pad_token_id)
    model.new_head = any(not k.startswith(hf.base_model_prefix + ".") for k in missing)  # weights outside the encoder
    return model


def label_maps(labels) -> dict:
    "`id2label` and `label2id` of a Hugging Face config for class names in output order."
    names = {i: str(c) for i, c in enumerate(labels)}
    return {"id2label": names, "label2id": {v: k for k, v in names.items()}}


def classifier_model(
    src,
    tok,
    n_out: int,
    head: str = "pooling",
    labels=None,
    chunk_len: int | None = None,
    pair_sep: int | None = None,
    **head_kwargs,
) -> SequenceClassifier:
    """A `SequenceClassifier` whose encoder comes from `src` (e.g. the MLM fine-tuned folder: ULMFiT's hand-off);
    `chunk_len`: chunk-and-pool inputs of chunks of that many tokens; `pair_sep`: inputs are pairs of texts split by
    this token (given token types where the encoder has them)."""
    if head not in ("pooling", "native"):
        raise UlmfitError(f"head must be 'pooling' or 'native', not {head!r}")
    if head == "native":
        hf = load_hf(
            src,
            "sequence_classification",
            num_labels=n_out,
            **label_maps(labels if labels is not None else range(n_out)),
        )
        _check_vocab(hf, tok, src)
        return SequenceClassifier(hf, tok.pad_token_id, chunk_len=chunk_len, type_sep=type_sep(hf.config, pair_sep))
    hf = src if isinstance(src, PreTrainedModel) else load_hf(src, "base", **base_kwargs(load_config(src).model_type))
    _check_vocab(hf, tok, src)
    head = PoolingClassifierHead(hf.config.hidden_size, n_out, **head_kwargs)
    return SequenceClassifier(hf, tok.pad_token_id, head, chunk_len, type_sep(hf.config, pair_sep))


def marge_model(
    src,  # Marge folder (continue), encoder folder / hub name / model, or an encoder config
    tok,  # The tokenizer (its vocabulary must fit the encoder's)
    from_config: bool = False,  # Build the encoder of `src`'s config with fresh weights
    **kwargs,  # MargeConfig fields for a new decoder: retrieval_layer, self_layers, cross_layers, ...
) -> MargeLM:
    """A `MargeLM`: a saved Marge model, or a new decoder on the encoder of `src` (pretrained weights, or fresh ones
    from its config). `retrieval_layer` defaults to half the encoder's layers."""
    from .encoders import MargeConfig, MargeModel

    config = src if isinstance(src, PreTrainedConfig) else load_config(src)
    if config.model_type == MargeConfig.model_type:
        if from_config or kwargs:
            raise UlmfitError(
                f"{src} is a Marge model already: its decoder settings are its own "
                f"(not {', '.join(kwargs) or 'from_config'})"
            )
        hf = load_hf(src)
    else:
        if config.model_type in MEMORY_MODEL_TYPES:
            raise UlmfitError(
                f"{src}: a {config.model_type!r} encoder reads segment by segment and cannot be Marge's encoder"
            )
        fresh = from_config or isinstance(src, PreTrainedConfig)
        enc = (
            AutoModel.from_config(config, **base_kwargs(config.model_type))
            if fresh
            else load_hf(src, "base", **base_kwargs(config.model_type))
        )
        kwargs.setdefault("retrieval_layer", max(1, config.num_hidden_layers // 2))
        try:
            hf = MargeModel.from_encoder(enc, **kwargs)
        except ValueError as e:
            raise UlmfitError(f"{src}: {e}") from None
    _check_vocab(hf, tok, src)
    return MargeLM(hf)


def contrastive_model(
    src, tok, pooling: str = "mean", deletion: float = 0.0, halves: bool = True
) -> ContrastiveEncoder:
    "A `ContrastiveEncoder` around the base model of a model folder, hub name or model (any head is dropped)."
    hf = load_hf(src, "base", **base_kwargs(load_config(src).model_type))
    if hf.config.model_type in MEMORY_MODEL_TYPES:
        raise UlmfitError(
            f"{src}: memory encoders read texts segment by segment; contrastive adaptation needs one pass"
        )
    _check_vocab(hf, tok, src)
    return ContrastiveEncoder(hf, tok.pad_token_id, pooling, deletion, tok.all_special_ids, halves)


def load_config(src):
    "The config of a model folder or hub name (or model), without loading weights."
    if isinstance(src, PreTrainedModel):
        return src.config
    src = model_source(src)
    try:
        return AutoConfig.from_pretrained(src)
    except Exception as e:
        where = "its config" if Path(src).exists() else "the config of a hub model from here (no such local folder)"
        raise UlmfitError(f"{src}: cannot read {where} ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def default_clf_max_len(model) -> int:
    "Classifier tokens per text: 256, or up to 2048 for memory encoders (they read long texts segment by segment)."
    config = load_config(model)
    return min(2048, config.max_position_embeddings) if config.model_type in MEMORY_MODEL_TYPES else 256


def has_mlm_head(src) -> bool:
    """Whether the checkpoint `src` was saved with a masked-LM head, by its config's `architectures` (`...ForMaskedLM`,
    `...ForPreTraining`); a sentence-embedding model or an encoder saved alone (`BertModel`) has none. A config
    that does not say is taken to have one."""
    archs = getattr(load_config(src), "architectures", None)
    return not archs or any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs)
