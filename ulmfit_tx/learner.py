"""fastai Learners for transformers: the MLM learner (ULMFiT's stage 2), the classifier learner
(stage 3) and the gradual-unfreezing schedule with discriminative learning rates."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import fastai.callback.all  # noqa: F401 (patches fit_one_cycle, lr_find, to_fp16/to_bf16 onto Learner)
from fastai.callback import fp16
import numpy as np
import pandas as pd
import torch
from fastai.data.core import Datasets
from fastai.data.transforms import Categorize, ColReader
from fastai.callback.core import TrainEvalCallback
from fastai.callback.progress import ProgressCallback
from fastai.learner import CastToTensor, Learner, Recorder
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import norm_types
from fastcore.basics import noop
from fastcore.foundation import L
from torch import nn

from .archs import clas_splitter, lm_splitter, marge_splitter, max_positions
from .checkpoint import CheckpointCallback, Position
from .distributed import ShardedTrainer, is_rank0
from .encoders import MEMORY_MODEL_TYPES, MargeConfig
from .data import PadTokens, TokenSortedDL, pad_batch
from .errors import UlmfitError, check_max_len
from .export import export_bundle, export_onnx, read_bundle, read_onnx, write_hf
from .io import atomic_dir
from .memory import MemoryCallback
from .mlm import MaskedAccuracy, MaskedPerplexity, fill_mask, mlm_loss
from .models import MargeLM, MaskedLM, SequenceClassifier, classifier_model, marge_model, masked_lm_model
from .retrieval import Beta, Reindexer
from .optimizer import FusedAdamW
from .store import TokenStore
from .tokenize import HFTokenizer, find_tokenizer

__all__ = ["LAYER_DIV", "cpu_has_bf16_matmul", "default_precision", "MixedPrecision", "set_precision", "precision_of", "norm_and_bias_params", "HFLearner", "MLMLearner",
           "ClassifierLearner", "MargeLearner", "mlm_learner", "classifier_learner", "marge_learner", "load_classifier", "ulmfit_lrs", "Stage", "ulmfit_stages", "fit_stages",
           "fit_ulmfit", "mlm_stages", "fit_mlm", "marge_stages", "fit_marge"]


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware: Intel AMX tiles (Sapphire Rapids and later) or
    AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake). There bf16 mixed precision trained MiniLM-L6 1.4-1.7x (AMX)
    and about 2x (Zen 4) faster than float32 in a bare Hugging Face step (bench/README.md). Without them, torch
    emulates bf16 products and they are no faster."""
    try: return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError: return False   # a torch without the checks


def default_precision(device: torch.device | str | None = None) -> str:
    """What `precision="auto"` means on `device` (default: CUDA if there is one, else the CPU): bf16 mixed precision
    on a CUDA GPU that has it, fp16 on other CUDA GPUs; on the CPU, bf16 where it has bf16 matrix instructions
    (`cpu_has_bf16_matmul`: AMX or AVX512-BF16), else float32."""
    kind = torch.device(device).type if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda": return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if kind == "cpu" and cpu_has_bf16_matmul() else "fp32"


def _check_amp(precision: str, kind: str):
    "Refuse a mixed precision that device `kind` cannot run."
    if precision == "fp16" and kind != "cuda": raise UlmfitError(f"precision fp16 needs a CUDA GPU, not {kind}: use bf16 or fp32")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise UlmfitError("this GPU has no bf16: use fp16 or fp32")


class MixedPrecision(fp16.MixedPrecision):
    """fastai's `MixedPrecision` on the model's device, not only CUDA (bf16 autocast on the CPU), for the training
    batches only: weights, gradients and optimizer state stay float32, and validation, `get_preds` and `predict` run
    in float32, so the metrics of a fit agree with the exported bundle, ONNX graph and Hugging Face folder."""

    def before_fit(self):
        kind, half = next(self.model.parameters()).device.type, self.amp_mode == fp16.AMPMode.FP16
        _check_amp(self.amp_mode.value, kind)   # again here: the learner may have moved since `set_precision`
        self.autocast = torch.autocast(kind, dtype=torch.float16 if half else torch.bfloat16)
        self.learn.scaler = torch.amp.GradScaler(kind, enabled=half, **self.kwargs)   # fp16 only: bf16 has fp32's range
        self.scales = L()

    def before_batch(self):
        if self.training: self.autocast.__enter__()

    def after_loss(self):
        if self.training: self.autocast.__exit__(None, None, None)


def set_precision(learn: Learner, precision: str = "auto") -> Learner:
    """Train `learn` in `precision`: 'auto' (`default_precision` of its data's device), 'fp32', 'fp16' (CUDA) or
    'bf16' (CUDA, or a CPU: fast with AMX or AVX512-BF16, slow emulation without), with `MixedPrecision`."""
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise UlmfitError(f"precision must be auto, fp32, fp16 or bf16, not {precision!r}")
    kind = torch.device(learn.dls.device or "cpu").type
    precision = default_precision(kind) if precision == "auto" else precision
    _check_amp(precision, kind)
    if precision == "fp32": return learn
    return learn.add_cb(MixedPrecision(amp_mode=precision))


def precision_of(learn: Learner) -> str:
    "The precision `learn`'s training batches run in: its `MixedPrecision`'s 'bf16' or 'fp16', else 'fp32'."
    amp = [cb for cb in learn.cbs if isinstance(cb, fp16.MixedPrecision)]
    return amp[0].amp_mode.value if amp else "fp32"


def norm_and_bias_params(m: nn.Module, with_bias: bool = True) -> L:
    """fastai's `norm_bias_params`, also counting RMSNorm and the norm classes of Hugging Face models
    (any module whose class name has "Norm"): they get no weight decay."""
    if isinstance(m, norm_types) or "Norm" in type(m).__name__: return L(m.parameters())
    res = L(m.children()).map(norm_and_bias_params, with_bias=with_bias).concat()
    if with_bias and getattr(m, "bias", None) is not None: res.append(m.bias)
    return res


class HFLearner(Learner):
    "A `Learner` whose model wraps a Hugging Face model (`learn.model.hf`) and whose data carry an `HFTokenizer`."

    def _bn_bias_state(self, with_bias: bool): return norm_and_bias_params(self.model, with_bias).map(self.opt.state)

    @property
    def tokenizer(self) -> HFTokenizer: return find_tokenizer(self.dls)

    def to_distributed(self, sync_bn: bool = True, **kwargs):
        "fastai's `to_distributed` (used by `learn.distrib_ctx()`) with `ShardedTrainer`: see `ulmfit_tx.distributed`."
        self.add_cb(ShardedTrainer(sync_bn))
        if not is_rank0(): self.remove_cb(ProgressCallback)
        return self

    def detach_distributed(self):
        "Remove `ShardedTrainer` (fastai's `detach_distributed` looks for its own trainer class only)."
        if not self.cbs.filter(lambda cb: isinstance(cb, ShardedTrainer)): return self
        self.remove_cbs(self.cbs.filter(lambda cb: isinstance(cb, ShardedTrainer)))
        if not is_rank0() and not hasattr(self, "progress"): self.add_cb(ProgressCallback())
        return self

    def write_pretrained(self, folder, model=None) -> Path:
        "Write `model` (default: the learner's Hugging Face model) and the tokenizer into `folder` (safetensors)."
        (self.model.hf if model is None else model).save_pretrained(folder)
        self.tokenizer.tok.save_pretrained(folder)
        return Path(folder)

    def save_pretrained(self, path, force: bool = False, model=None) -> Path:
        "`write_pretrained` into a new folder `path`, atomically (refused if it exists, unless `force`)."
        with atomic_dir(path, force) as tmp: self.write_pretrained(tmp, model)
        return Path(path)


class MLMLearner(HFLearner):
    "Learner for masked-language-model fine-tuning."

    def fill_mask(self, text: str, k: int = 5) -> list[list[tuple[str, float]]]:
        "Top-`k` tokens with probabilities for every [MASK] (or <mask>) in `text`."
        return fill_mask(self.model, self.tokenizer, text, k)


class ClassifierLearner(HFLearner):
    "Learner for text classification; `predict` and `predict_texts` take raw text."

    def predict_texts(self, texts, bs: int = 64) -> pd.DataFrame:
        """Labels and class probabilities of many texts (or of the documents of a `TokenStore` made with this model's
        tokenizer): tokenized in one call, run in length-sorted batches, returned in input order."""
        tfm = self.tokenizer
        if isinstance(texts, TokenStore):
            texts.check_tokenizer(tfm)
            ids = [tfm.wrap(texts.doc(i)) for i in range(len(texts))]
        else: ids = tfm.encode_batch(texts.tolist() if isinstance(texts, pd.Series) else list(texts))
        probs = self._probs(ids, bs)
        vocab, p = list(self.dls.vocab), probs.numpy()
        return pd.DataFrame({"label": np.array(vocab, dtype=object)[p.argmax(1)], **{f"prob_{c}": p[:, i] for i, c in enumerate(vocab)}})

    def _probs(self, ids: list, bs: int) -> torch.Tensor:
        """Class probabilities of token id sequences, in input order: `get_preds` on a length-sorted `test_dl`. A learner
        with only fastai's default callbacks (as `load_classifier` builds) and `MixedPrecision` runs the same length-sorted batches without
        fastai's DataLoader and events (about 4 ms a call, a quarter of MiniLM's forward pass on a short review)."""
        if not len(ids): return torch.empty(0, len(self.dls.vocab))
        if any(type(cb) not in (TrainEvalCallback, Recorder, CastToTensor, ProgressCallback, MixedPrecision) for cb in self.cbs):
            return self.get_preds(dl=self.dls.test_dl(ids, bs=bs, val_res=[len(o) for o in ids]))[0]
        act, tfm = getattr(self.loss_func, "activation", noop), self.tokenizer
        order = np.argsort([-len(o) for o in ids], kind="stable")      # longest first, as `TokenSortedDL`
        self.model.eval()
        with torch.inference_mode():
            preds = torch.cat([act(self.model(pad_batch([ids[i] for i in order[k:k + bs]], tfm.pad_id, tfm.pad_first)
                                              .to(self.dls.device))).cpu() for k in range(0, len(ids), bs)])
        return preds[torch.as_tensor(order).argsort()]                 # back in input order

    def export_bundle(self, path, force: bool = False) -> Path:
        """The classifier as a bundle folder that `load_classifier` reads without unpickling anything (config, weights
        in safetensors, tokenizer, `ulmfit_tx.json`); `export()` stays for fastai's `load_learner`."""
        return export_bundle(self.model, self.tokenizer, list(self.dls.vocab), path, force)

    def export_onnx(self, path, int8: bool = False, texts: list[str] | None = None, force: bool = False) -> dict:
        """The classifier as an ONNX file at `path` (int8: quantized weights) with the tokenizer and `ulmfit_tx.json`
        beside it, checked against PyTorch on `texts`; `load_classifier(folder, backend="onnx")` serves it. See
        `ulmfit_tx.export.export_onnx`."""
        return export_onnx(self.model, self.tokenizer, list(self.dls.vocab), path, int8, texts, force)

    def write_pretrained(self, folder, model=None) -> Path:
        """Write the classifier into `folder` as a Hugging Face folder for `AutoModelForSequenceClassification` and
        `pipeline("text-classification")` (the pooling head as `PoolingForSequenceClassification`)."""
        return write_hf(self.model if model is None else model, self.tokenizer, list(self.dls.vocab), folder)


class MargeLearner(HFLearner):
    """Learner for Marge pretraining (`marge_learner`): `save_pretrained` writes the adapted encoder as a Hugging Face
    folder that `classifier_learner`, `mlm_learner`, `train-clf` and `finetune-lm` read; `save_marge` the whole model."""

    def reindex(self) -> dict:
        "Rebuild the embeddings and the neighbour table now (`learn.reindexer`, the callback); returns their statistics."
        self.reindexer.rebuild()
        return self.reindexer.history[-1]

    def write_pretrained(self, folder, model=None) -> Path:
        "Write `model` (default: the encoder) and the tokenizer into `folder`."
        return super().write_pretrained(folder, self.model.hf.encoder if model is None else model)

    def save_marge(self, path, force: bool = False) -> Path:
        "The whole Marge model (encoder, decoder, beta) and the tokenizer, to continue training with `marge_learner`."
        return self.save_pretrained(path, force, self.model.hf)


def load_classifier(
    path,                     # A bundle folder (train-clf's output, or `learn.export_bundle`); with onnx also a .onnx file
    bs: int = 64,             # Batch size of `predict_texts` and `get_preds`
    device=None,              # Default: a GPU if there is one (torch backend; onnx runs on the CPU)
    backend: str = "torch",   # "torch": the bundle's weights; "onnx": its ONNX graph on ONNX Runtime (`export_onnx`)
    int8: bool = False,       # onnx: the int8 graph (model.int8.onnx)
) -> ClassifierLearner:
    """An inference `ClassifierLearner` rebuilt from a bundle without unpickling: `predict`, `predict_texts`,
    `get_preds(dl=learn.dls.test_dl(...))` and `show_results` on new labelled data work as on the learner that wrote it,
    with either backend."""
    if backend not in ("torch", "onnx"): raise UlmfitError(f"backend must be 'torch' or 'onnx', not {backend!r}")
    if int8 and backend != "onnx": raise UlmfitError("int8 is a property of the ONNX graph: use backend='onnx'")
    model, tfm, classes = read_bundle(path) if backend == "torch" else read_onnx(path, int8)
    if backend == "onnx": device = "cpu"
    tfm.text_col = "text"   # the pipeline is set up on one placeholder row, then emptied: the data are yours (test_dl)
    row = pd.DataFrame({"text": [""], "label": [classes[0]]})
    dsets = Datasets(row, tfms=[[tfm], [ColReader("label"), Categorize(vocab=classes, sort=False)]], splits=[[0], [0]])
    dls = dsets.dataloaders(bs=bs, num_workers=0, dl_type=TokenSortedDL, before_batch=PadTokens(tfm.pad_id, tfm.pad_first),
                            device=device).new_empty()
    learn = ClassifierLearner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                              cbs=_callbacks(dls, model, None) if backend == "torch" else None)
    learn.model.eval()
    return learn


def _check_len(tfm: HFTokenizer, model):
    check_max_len(tfm.max_len, max_positions(model.hf.config), f"model type {model.hf.config.model_type!r}")


def _callbacks(dls, model, cbs) -> L:
    "The user's callbacks, plus `MemoryCallback` for a memory encoder or data read in segments."
    cbs = L(cbs)
    if model.hf.config.model_type in MEMORY_MODEL_TYPES or getattr(dls.train, "has_resets", False):
        cbs.append(MemoryCallback())
    return cbs


def mlm_learner(
    dls,                           # DataLoaders from `mlm_dataloaders`
    model,                         # Model folder, hub name, Hugging Face model, or `MaskedLM`
    precision: str = "auto",       # 'auto' (`default_precision`: bf16/fp16 on CUDA, bf16 on a CPU with AMX/AVX512-BF16, else fp32), 'fp32', 'fp16' or 'bf16'
    splitter=lm_splitter,          # Parameter groups: layers, then embeddings with the tied MLM head
    metrics=None,                  # Default: masked-token accuracy and perplexity
    opt_func=FusedAdamW,         # fastai optimizer; the default is fastai's AdamW on torch's fused kernel
    wd: float = 0.01,              # AdamW weight decay (never on biases and LayerNorm weights)
    cbs=None,                      # fastai callbacks (`MemoryCallback` is added for memory encoders)
    **kwargs,                      # Passed to `Learner`
) -> MLMLearner:
    "A fastai Learner that fine-tunes a masked language model on `dls`."
    tfm = find_tokenizer(dls)
    if not isinstance(model, MaskedLM): model = masked_lm_model(model, tfm.tok)
    _check_len(tfm, model)
    metrics = [MaskedAccuracy(), MaskedPerplexity()] if metrics is None else metrics
    learn = MLMLearner(dls, model, loss_func=mlm_loss, opt_func=opt_func, splitter=splitter, metrics=metrics, wd=wd,
                       wd_bn_bias=False, train_bn=False, cbs=_callbacks(dls, model, cbs), **kwargs)
    return set_precision(learn, precision)


def classifier_learner(
    dls,                           # DataLoaders from `clas_dataloaders` (or a DataBlock with `HFTextBlock`)
    model,                         # Model folder (e.g. the MLM fine-tuned one), hub name, or `SequenceClassifier`
    head: str = "pooling",         # 'pooling': ULMFiT's concat-pooling head; 'native': the architecture's own head
    precision: str = "auto",       # 'auto' (`default_precision`: bf16/fp16 on CUDA, bf16 on a CPU with AMX/AVX512-BF16, else fp32), 'fp32', 'fp16' or 'bf16'
    splitter=clas_splitter,        # Parameter groups: embeddings, each layer, head
    metrics=accuracy,              # fastai metrics
    opt_func=FusedAdamW,         # fastai optimizer; the default is fastai's AdamW on torch's fused kernel
    wd: float = 0.01,              # AdamW weight decay (never on biases and LayerNorm weights)
    lin_ftrs: list | None = None,  # Pooling head: hidden layer sizes (default [50])
    ps: list | None = None,        # Pooling head: dropout per hidden layer
    output_p: float = 0.1,         # Pooling head: dropout on the pooled features
    freeze: bool = True,           # Start with only the head trainable, as fastai's `text_classifier_learner`
    cbs=None,                      # fastai callbacks (`MemoryCallback` is added for memory encoders)
    **kwargs,                      # Passed to `Learner`
) -> ClassifierLearner:
    """A fastai Learner that classifies texts with a transformer encoder, ready for `fit_ulmfit`, or for
    `fit_one_cycle` (head only while frozen; call `learn.unfreeze()` to train every layer)."""
    tfm = find_tokenizer(dls)
    if not isinstance(model, SequenceClassifier):
        head_kw = dict(lin_ftrs=lin_ftrs, ps=ps, output_p=output_p) if head == "pooling" else {}
        model = classifier_model(model, tfm.tok, len(dls.vocab), head, labels=dls.vocab, **head_kw)
    _check_len(tfm, model)
    learn = ClassifierLearner(dls, model, opt_func=opt_func, splitter=splitter, metrics=metrics, wd=wd,
                              wd_bn_bias=False, train_bn=False, cbs=_callbacks(dls, model, cbs), **kwargs)
    if freeze: learn.freeze()
    return set_precision(learn, precision)


def marge_learner(
    dls,                           # DataLoaders from `marge_dataloaders`
    model,                         # Encoder folder / hub name / model (a new decoder is added), Marge folder, or `MargeLM`
    from_config: bool = False,     # Build the encoder from `model`'s config with fresh weights (pretraining from nothing)
    reindex_every: int | None = None,  # Training steps between neighbour-table rebuilds (None: at the start of each fit)
    precision: str = "auto",       # 'auto' (`default_precision`: bf16/fp16 on CUDA, bf16 on a CPU with AMX/AVX512-BF16, else fp32), 'fp32', 'fp16' or 'bf16'
    splitter=marge_splitter,       # Parameter groups: encoder, then decoder and beta (`freeze()` trains the decoder)
    metrics=None,                  # Default: beta
    opt_func=FusedAdamW,           # fastai optimizer; the default is fastai's AdamW on torch's fused kernel
    wd: float = 0.01,              # AdamW weight decay (never on biases and norm weights)
    cbs=None,                      # fastai callbacks (a `Reindexer` is added)
    progress: bool = True,         # Progress bar and a line per reindex
    **kwargs,                      # MargeConfig fields of a new decoder (retrieval_layer, self_layers, cross_layers, beta_init,
                                   # dropouts), then `Learner` arguments
) -> MargeLearner:
    """A fastai Learner that adapts an encoder to the corpus of `dls` with Marge: `fit_one_cycle`, `lr_find`, then
    `save_pretrained` for the classifier stage."""
    tfm = find_tokenizer(dls)
    names = {k for cls in MargeConfig.__mro__ for k in getattr(cls, "__annotations__", {})}  # MargeConfig's fields
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    if not isinstance(model, MargeLM): model = marge_model(model, tfm.tok, from_config, **fields)
    check_max_len(tfm.max_len, min(max_positions(model.hf.encoder.config), model.hf.config.max_position_embeddings),
                  f"model type {model.hf.encoder.config.model_type!r}")
    learn = MargeLearner(dls, model, loss_func=mlm_loss, opt_func=opt_func, splitter=splitter,
                         metrics=[Beta()] if metrics is None else metrics, wd=wd, wd_bn_bias=False, train_bn=False,
                         cbs=L(cbs) + [Reindexer(reindex_every, progress=progress)], **kwargs)
    return set_precision(learn, precision)


# Default discriminative factor between consecutive parameter groups. ULMFiT's 2.6 suits AWD-LSTM's 5 groups; a
# transformer has one group per layer (8 for MiniLM-L6), where 2.6 leaves the embeddings at lr/800 and the lower
# layers nearly frozen. On IMDb with MiniLM-L6 (bench/README.md, run 6) 1.2 took the classifier from 83.50% to
# 85.90% with 1,000 labels and from 73.55% to 82.55% with 100; 1.0 (run 7) scored within noise of 1.2.
LAYER_DIV = 1.2


def ulmfit_lrs(learn: Learner, lr: float, div: float = LAYER_DIV) -> np.ndarray:
    "One learning rate per parameter group: `lr` for the last, divided by `div` for each group below it."
    if div <= 0: raise UlmfitError(f"div must be positive (1: the same rate for every group), not {div}")
    if learn.opt is None: learn.create_opt()
    n = len(learn.opt.param_lists)
    return lr / div ** np.arange(n - 1, -1, -1)


@dataclass(frozen=True)
class Stage:
    "One `fit_one_cycle` of a schedule: how many groups train (None: all), epochs, rate, discriminative factor."
    depth: int | None      # Parameter groups trained, counted from the top (`freeze_to(-depth)`); None: `unfreeze()`
    epochs: int            # Epochs of this stage's one-cycle schedule
    lr: float              # Learning rate (of the last group when `div` is set)
    div: float | None = None  # Discriminative factor between groups (`ulmfit_lrs`); None: one rate for every group


def ulmfit_stages(lr: float = 2e-3, epochs=(1, 1, 1, 2), depths=(1, 2, 3, None), div: float = LAYER_DIV,
                  stage_div: float = 2.0) -> list[Stage]:
    "ULMFiT's gradual unfreezing as stages: depths from the top, each stage's rate the previous one's / `stage_div`."
    epochs = [epochs] * len(depths) if isinstance(epochs, int) else list(epochs)
    if len(epochs) != len(depths): raise UlmfitError(f"{len(epochs)} epoch counts for {len(depths)} stages")
    return [Stage(n, e, lr / stage_div ** i, div) for i, (n, e) in enumerate(zip(depths, epochs))]


def fit_stages(learn: Learner, stages: list[Stage], **kwargs) -> Learner:
    """Run `stages` one after the other (freeze to the stage's depth, then `fit_one_cycle`). With a
    `CheckpointCallback` that loaded a checkpoint (`resume=True`), the stages already done are skipped and the
    interrupted one continues from its epoch and step with the saved weights, optimizer and random states."""
    ckpt = next((cb for cb in learn.cbs if isinstance(cb, CheckpointCallback)), None)
    start = ckpt.position if ckpt is not None and ckpt.loaded is not None else Position()
    try:
        for i, st in enumerate(stages):
            if i < start.stage: continue
            if st.depth is None: learn.unfreeze()
            else: learn.freeze_to(-st.depth)
            if ckpt is not None:
                ckpt.stage, ckpt.last_stage = i, i == len(stages) - 1
                if i == start.stage and ckpt.loaded is not None: ckpt.restore(learn)
            lr = st.lr if st.div is None else ulmfit_lrs(learn, st.lr, st.div)
            learn.fit_one_cycle(st.epochs, lr, start_epoch=start.epoch if i == start.stage else 0, **kwargs)
    finally:
        if ckpt is not None: ckpt.release_signals()   # also when a stage raised
    if ckpt is not None and ckpt.loaded is not None:                      # the checkpoint was taken after the last stage
        learn.unfreeze() if stages[-1].depth is None else learn.freeze_to(-stages[-1].depth)
        ckpt.restore(learn)
        ckpt.loaded = None
    return learn


def fit_ulmfit(
    learn: Learner,
    lr: float = 2e-3,              # Learning rate of the last group in the first stage
    epochs=(1, 1, 1, 2),           # Epochs of each stage (an int: the same for every stage)
    depths=(1, 2, 3, None),        # Groups trained in each stage, from the top; None: all (`unfreeze`)
    div: float = LAYER_DIV,        # Discriminative factor between consecutive groups (ULMFiT's AWD-LSTM used 2.6)
    stage_div: float = 2.0,        # Each stage's `lr` is the previous one's divided by this
    **kwargs,                      # Passed to `fit_one_cycle` (e.g. `moms`, `cbs`)
) -> Learner:
    """ULMFiT's gradual unfreezing: train the last group, then the last two, then three, then all,
    each with `fit_one_cycle` and discriminative learning rates. The same as running, per stage,
    `learn.freeze_to(-n); learn.fit_one_cycle(e, ulmfit_lrs(learn, lr))`. Resumable with a `CheckpointCallback`."""
    return fit_stages(learn, ulmfit_stages(lr, epochs, depths, div, stage_div), **kwargs)


def mlm_stages(lr: float = 1e-4, epochs: int = 1, warmup_epochs: int = 1, warmup_lr: float | None = None,
               div: float | None = None) -> list[Stage]:
    """MLM fine-tuning as stages: the MLM head with the word embeddings tied to it first, on the frozen encoder layers
    (`warmup_epochs` at `warmup_lr`, default `10 * lr`: fastai's language-model recipe trains a new head before
    unfreezing; 0 skips it), then every layer for `epochs` at `lr`, or with ULMFiT's discriminative rates when `div`
    is set (`lr` for the head and embeddings, each encoder layer below `div` times lower). On IMDb with MiniLM the
    warm-up gave a lower MLM loss and a better classifier than the same epoch of every layer without it (README,
    "Is stage 2 worth it?")."""
    if warmup_epochs < 0: raise UlmfitError(f"warmup_epochs must be 0 or more, not {warmup_epochs}")
    warm = [Stage(1, warmup_epochs, 10 * lr if warmup_lr is None else warmup_lr)] if warmup_epochs else []
    return warm + [Stage(None, epochs, lr, div)]


def fit_mlm(
    learn: Learner,
    lr: float = 1e-4,                  # Learning rate of the stage that trains every layer (its top group with `div`)
    epochs: int = 1,                   # Its epochs
    warmup_epochs: int = 1,            # Epochs training the MLM head and embeddings alone first (0: none)
    warmup_lr: float | None = None,    # Their learning rate (default 10 * lr)
    div: float | None = None,          # Discriminative factor between layer groups in that stage (None: one rate)
    **kwargs,                          # Passed to `fit_one_cycle`
) -> Learner:
    "`mlm_stages` with `fit_stages` (one `fit_one_cycle` per stage; resumable with a `CheckpointCallback`)."
    return fit_stages(learn, mlm_stages(lr, epochs, warmup_epochs, warmup_lr, div), **kwargs)


def marge_stages(lr: float = 3e-3, warmup_epochs: int = 1, epochs: int = 1, div: float = 3.0,
                 encoder_div: float = 10.0) -> list[Stage]:
    """Marge's schedule: the decoder alone on the frozen encoder (`warmup_epochs` at `lr`), then every layer for
    `epochs`, the decoder at `lr / div` and the encoder `encoder_div` times lower (1: the same rate; suits an encoder
    trained from nothing). Without the warm-up, a new decoder that cannot yet use its evidence sends the retriever
    noise, and its neighbours degrade (README, Marge)."""
    return ([Stage(1, warmup_epochs, lr)] if warmup_epochs else []) + [Stage(None, epochs, lr / div, encoder_div)]


def fit_marge(
    learn: Learner,
    lr: float = 3e-3,              # Learning rate of the warm-up
    warmup_epochs: int = 1,        # Epochs training the decoder alone (0: none)
    epochs: int = 1,               # Epochs training everything
    div: float = 3.0,              # The second stage's decoder rate is `lr / div`
    encoder_div: float = 10.0,     # ...and its encoder's rate `encoder_div` times lower still (1 for a fresh encoder)
    **kwargs,                      # Passed to `fit_one_cycle`
) -> Learner:
    "`marge_stages` with `fit_stages` (one `fit_one_cycle` per stage; resumable with a `CheckpointCallback`)."
    return fit_stages(learn, marge_stages(lr, warmup_epochs, epochs, div, encoder_div), **kwargs)
