"""fastai Learners for transformers and their factories: the MLM learner (ULMFiT's stage 2), the classifier learner
(stage 3, and `load_classifier` that rebuilds one from a bundle) and the Marge learner. Their schedules are in
`schedule.py`, their precision in `precision.py`."""

from __future__ import annotations

from pathlib import Path

import fastai.callback.all  # noqa: F401 (patches fit_one_cycle, lr_find, to_fp16/to_bf16 onto Learner)
import numpy as np
import pandas as pd
import torch
from fastai.callback.core import TrainEvalCallback
from fastai.callback.progress import ProgressCallback
from fastai.data.core import Datasets
from fastai.data.transforms import ColReader
from fastai.learner import CastToTensor, Learner, Recorder
from fastai.torch_core import norm_types
from fastcore.foundation import L
from torch import nn

from .adapt import SimCSELoss, ViewAccuracy
from .archs import clas_splitter, lm_splitter, marge_splitter, max_positions
from .batching import PadTokens, TokenSortedDL, pad_batch
from .distributed import ShardedTrainer, is_rank0
from .encoders import MEMORY_MODEL_TYPES, MargeConfig
from .errors import UlmfitError, check_max_len
from .export import export_bundle, export_onnx, read_bundle, read_onnx, write_hf
from .files import atomic_dir
from .memory import MemoryCallback
from .mlm import MaskedAccuracy, MaskedPerplexity, fill_mask, mlm_loss
from .models import (
    ContrastiveEncoder,
    MargeLM,
    MaskedLM,
    SequenceClassifier,
    classifier_model,
    contrastive_model,
    marge_model,
    masked_lm_model,
)
from .optimizer import FusedAdamW
from .precision import MixedPrecision, set_precision
from .retrieval import Beta, Reindexer
from .store import TokenStore
from .tasks import MULTI, REGRESSION, SINGLE, Task, choose_threshold, class_weights, task_of, validation_report
from .tokenize import HFTokenizer, find_tokenizer

__all__ = [
    "norm_and_bias_params",
    "HFLearner",
    "MLMLearner",
    "ClassifierLearner",
    "MargeLearner",
    "ContrastiveLearner",
    "mlm_learner",
    "classifier_learner",
    "marge_learner",
    "contrastive_learner",
    "load_classifier",
]


def norm_and_bias_params(m: nn.Module, with_bias: bool = True) -> L:
    """fastai's `norm_bias_params`, also counting RMSNorm and the norm classes of Hugging Face models
    (any module whose class name has "Norm"): they get no weight decay."""
    if isinstance(m, norm_types) or "Norm" in type(m).__name__:
        return L(m.parameters())
    res = L(m.children()).map(norm_and_bias_params, with_bias=with_bias).concat()
    if with_bias and getattr(m, "bias", None) is not None:
        res.append(m.bias)
    return res


class HFLearner(Learner):
    "A `Learner` whose model wraps a Hugging Face model (`learn.model.hf`) and whose data carry an `HFTokenizer`."

    def _bn_bias_state(self, with_bias: bool):
        return norm_and_bias_params(self.model, with_bias).map(self.opt.state)

    @property
    def tokenizer(self) -> HFTokenizer:
        return find_tokenizer(self.dls)

    def to_distributed(self, sync_bn: bool = True, **kwargs):
        "fastai's `to_distributed` (used by `learn.distrib_ctx()`) with `ShardedTrainer`: see `ulmfit_tx.distributed`."
        self.add_cb(ShardedTrainer(sync_bn))
        if not is_rank0():
            self.remove_cb(ProgressCallback)
        return self

    def detach_distributed(self):
        "Remove `ShardedTrainer` (fastai's `detach_distributed` looks for its own trainer class only)."
        if not self.cbs.filter(lambda cb: isinstance(cb, ShardedTrainer)):
            return self
        self.remove_cbs(self.cbs.filter(lambda cb: isinstance(cb, ShardedTrainer)))
        if not is_rank0() and not hasattr(self, "progress"):
            self.add_cb(ProgressCallback())
        return self

    def write_pretrained(self, folder, model=None) -> Path:
        "Write `model` (default: the learner's Hugging Face model) and the tokenizer into `folder` (safetensors)."
        (self.model.hf if model is None else model).save_pretrained(folder)
        self.tokenizer.tok.save_pretrained(folder)
        return Path(folder)

    def save_pretrained(self, path, force: bool = False, model=None) -> Path:
        "`write_pretrained` into a new folder `path`, atomically (refused if it exists, unless `force`)."
        with atomic_dir(path, force) as tmp:
            self.write_pretrained(tmp, model)
        return Path(path)


class MLMLearner(HFLearner):
    "Learner for masked-language-model fine-tuning."

    def fill_mask(self, text: str, k: int = 5) -> list[list[tuple[str, float]]]:
        "Top-`k` tokens with probabilities for every [MASK] (or <mask>) in `text`."
        return fill_mask(self.model, self.tokenizer, text, k)


class ClassifierLearner(HFLearner):
    """Learner for text classification (single-label, multi-label or regression: `learn.task`); `predict` and
    `predict_texts` take raw text."""

    @property
    def task(self) -> Task:
        "What the classifier predicts: its kind, output names and (multi_label) decision threshold."
        return task_of(self.dls, getattr(self.loss_func, "thresh", None))

    @property
    def threshold(self) -> float:
        "multi_label: the probability at which a class is predicted (`predict`, `predict_texts`, the bundle)."
        return self.task.threshold

    @threshold.setter
    def threshold(self, value: float):
        if self.task.kind != MULTI:
            raise UlmfitError(f"a decision threshold is for multi_label classifiers, not {self.task.kind}")
        self.loss_func.thresh = Task(MULTI, self.task.classes, value).threshold  # (checked there)

    def predict_texts(self, texts, bs: int = 64, delim: str = ";") -> pd.DataFrame:
        """Predictions of many texts (or of the documents of a `TokenStore` made with this model's tokenizer; a pair
        classifier: `TextPair`s, (text, text) tuples or a two-column DataFrame): tokenized in one call, run in
        length-sorted batches, returned in input order. Columns by task: `label` and `prob_<class>`; `labels` (joined
        by `delim`) and `prob_<class>`; or `prediction`."""
        tfm = self.tokenizer
        if isinstance(texts, TokenStore):
            texts.check_tokenizer(tfm)
            texts.check_pair(tfm)
            ids = [tfm.wrap(texts.doc(i), first=texts.first(i)) for i in range(len(texts))]
        else:
            ids = tfm.encode_batch(texts if isinstance(texts, pd.DataFrame) else list(texts))
        return self.task.table(self._probs(ids, bs).float().numpy(), delim)

    def _probs(self, ids: list, bs: int) -> torch.Tensor:
        """The task's outputs (class probabilities, or regression values) of token id sequences, in input order:
        `get_preds` on a length-sorted `test_dl`. A learner with only fastai's default callbacks (as `load_classifier`
        builds) and `MixedPrecision` runs the same length-sorted batches without fastai's DataLoader and events, which
        cost as much as a short text's forward pass."""
        task = self.task
        if not len(ids):
            return torch.empty(0, task.n_out)
        if any(
            type(cb) not in (TrainEvalCallback, Recorder, CastToTensor, ProgressCallback, MixedPrecision)
            for cb in self.cbs
        ):
            return self.get_preds(dl=self.dls.test_dl(ids, bs=bs, val_res=[len(o) for o in ids]))[0]
        tfm = self.tokenizer
        order = np.argsort([-len(o) for o in ids], kind="stable")  # longest first, as `TokenSortedDL`
        self.model.eval()
        with torch.inference_mode():
            preds = torch.cat(
                [
                    task.activation(
                        self.model(
                            pad_batch([ids[i] for i in order[k : k + bs]], tfm.pad_id, tfm.pad_first).to(
                                self.dls.device
                            )
                        )
                    ).cpu()
                    for k in range(0, len(ids), bs)
                ]
            )
        return preds[torch.as_tensor(order).argsort()]  # back in input order

    def validation_report(self, tune_threshold: bool = False, outputs: tuple | None = None) -> dict:
        """`tasks.validation_report` of the current weights on the validation set (per-class precision, recall and F1,
        macro F1, confusion counts; regression errors and correlations), from `outputs` (activated outputs and
        targets, e.g. of a `ValidationOutputs` callback) or one prediction pass. With `tune_threshold` (multi_label)
        the decision threshold is first set to the one with the best micro F1 there (`tasks.choose_threshold`)."""
        if outputs is None:
            out, targets = self.get_preds(ds_idx=1)  # activated: probabilities, or regression values
            outputs = out.float().numpy(), targets.numpy()
        out, targets = outputs
        if tune_threshold and self.task.kind == MULTI:
            self.threshold = choose_threshold(out, targets)
        return validation_report(self.task, out, targets)

    def export_bundle(self, path, force: bool = False) -> Path:
        """The classifier as a bundle folder that `load_classifier` reads without unpickling anything (config, weights
        in safetensors, tokenizer, `ulmfit_tx.json`); `export()` stays for fastai's `load_learner`."""
        return export_bundle(self.model, self.tokenizer, self.task, path, force)

    def export_onnx(
        self, path, int8: bool = False, texts: list[str] | None = None, force: bool = False, portable: bool = False
    ) -> dict:
        """The classifier as an ONNX file at `path` (int8: quantized weights; portable: standard operators only) with
        the tokenizer and `ulmfit_tx.json` beside it, checked against PyTorch on `texts`;
        `load_classifier(folder, backend="onnx")` serves it. See `ulmfit_tx.export.export_onnx`."""
        return export_onnx(self.model, self.tokenizer, self.task, path, int8, texts, force, portable)

    def write_pretrained(self, folder, model=None) -> Path:
        """Write the classifier into `folder` as a Hugging Face folder for `AutoModelForSequenceClassification` and
        `pipeline("text-classification")` (the pooling head as `PoolingForSequenceClassification`)."""
        return write_hf(self.model if model is None else model, self.tokenizer, self.task, folder)


class MargeLearner(HFLearner):
    """Learner for Marge pretraining (`marge_learner`): `save_pretrained` writes the adapted encoder as a Hugging Face
    folder that `classifier_learner`, `mlm_learner`, `train-clf` and `finetune-lm` read; `save_marge` the whole
    model."""

    def reindex(self) -> dict:
        """Rebuild the embeddings and the neighbour table now (`learn.reindexer`, the callback); returns their
        statistics."""
        self.reindexer.rebuild()
        return self.reindexer.history[-1]

    def write_pretrained(self, folder, model=None) -> Path:
        "Write `model` (default: the encoder) and the tokenizer into `folder`."
        return super().write_pretrained(folder, self.model.hf.encoder if model is None else model)

    def save_marge(self, path, force: bool = False) -> Path:
        "The whole Marge model (encoder, decoder, beta) and the tokenizer, to continue training with `marge_learner`."
        return self.save_pretrained(path, force, self.model.hf)


class ContrastiveLearner(HFLearner):
    """Learner for contrastive adaptation (`contrastive_learner`): `save_pretrained` writes the adapted encoder as a
    Hugging Face folder that `classifier_learner` and `train-clf` read."""


def load_classifier(
    path,  # A bundle folder (train-clf's output, or `learn.export_bundle`); with onnx also a .onnx file
    bs: int = 64,  # Batch size of `predict_texts` and `get_preds`
    device=None,  # Default: a GPU if there is one (torch backend; onnx runs on the CPU)
    backend: str = "torch",  # "torch": the bundle's weights; "onnx": its ONNX graph on ONNX Runtime (`export_onnx`)
    int8: bool = False,  # onnx: the int8 graph (model.int8.onnx)
) -> ClassifierLearner:
    """An inference `ClassifierLearner` rebuilt from a bundle without unpickling: `predict`, `predict_texts`,
    `get_preds(dl=learn.dls.test_dl(...))` and `show_results` on new labelled data work as on the learner that
    wrote it, with either backend."""
    if backend not in ("torch", "onnx"):
        raise UlmfitError(f"backend must be 'torch' or 'onnx', not {backend!r}")
    if int8 and backend != "onnx":
        raise UlmfitError("int8 is a property of the ONNX graph: use backend='onnx'")
    model, tfm, task = read_bundle(path) if backend == "torch" else read_onnx(path, int8)
    if backend == "onnx":
        device = "cpu"
    # the pipeline is set up on one placeholder row, then emptied: the data are yours (test_dl)
    tfm.text_col = ["text", "text_pair"] if tfm.pair else "text"
    label = {SINGLE: task.classes[0], MULTI: [task.classes[0]], REGRESSION: 0.0}[task.kind]
    row = pd.DataFrame({"text": [""], "text_pair": [""], "label": [label]})
    dsets = Datasets(row, tfms=[[tfm], [ColReader("label"), *task.target_tfms()]], splits=[[0], [0]])
    dls = dsets.dataloaders(
        bs=bs, num_workers=0, dl_type=TokenSortedDL, before_batch=PadTokens(tfm.pad_id, tfm.pad_first), device=device
    ).new_empty()
    learn = ClassifierLearner(
        dls,
        model,
        loss_func=task.loss_func(),
        metrics=task.metrics(),
        cbs=_callbacks(dls, model, None) if backend == "torch" else None,
    )
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
    dls,  # DataLoaders from `mlm_dataloaders`
    model,  # Model folder, hub name, Hugging Face model, or `MaskedLM`
    precision: str = "auto",  # 'auto' (`default_precision` of the data's device), 'fp32', 'fp16' or 'bf16'
    splitter=lm_splitter,  # Parameter groups: layers, then embeddings with the tied MLM head
    metrics=None,  # Default: masked-token accuracy and perplexity
    opt_func=FusedAdamW,  # fastai optimizer; the default is fastai's AdamW on torch's fused kernel
    wd: float = 0.01,  # AdamW weight decay (never on biases and LayerNorm weights)
    cbs=None,  # fastai callbacks (`MemoryCallback` is added for memory encoders)
    **kwargs,  # Passed to `Learner`
) -> MLMLearner:
    "A fastai Learner that fine-tunes a masked language model on `dls`."
    tfm = find_tokenizer(dls)
    if not isinstance(model, MaskedLM):
        model = masked_lm_model(model, tfm.tok)
    _check_len(tfm, model)
    metrics = [MaskedAccuracy(), MaskedPerplexity()] if metrics is None else metrics
    learn = MLMLearner(
        dls,
        model,
        loss_func=mlm_loss,
        opt_func=opt_func,
        splitter=splitter,
        metrics=metrics,
        wd=wd,
        wd_bn_bias=False,
        train_bn=False,
        cbs=_callbacks(dls, model, cbs),
        **kwargs,
    )
    return set_precision(learn, precision)


def classifier_learner(
    dls,  # DataLoaders from `clas_dataloaders` (or a DataBlock with `HFTextBlock`)
    model,  # Model folder (e.g. the MLM fine-tuned one), hub name, or `SequenceClassifier`
    head: str = "pooling",  # 'pooling': ULMFiT's concat-pooling head; 'native': the architecture's own head
    precision: str = "auto",  # 'auto' (`default_precision` of the data's device), 'fp32', 'fp16' or 'bf16'
    splitter=clas_splitter,  # Parameter groups: embeddings, each layer, head
    metrics=None,  # fastai metrics (default: the task's, `Task.metrics`; single-label: accuracy)
    class_weights=None,  # Loss weights: "balanced", a {class: weight} dict, or a JSON/CSV file of them
    threshold: float = 0.5,  # multi_label: the probability at which a class is predicted
    opt_func=FusedAdamW,  # fastai optimizer; the default is fastai's AdamW on torch's fused kernel
    wd: float = 0.01,  # AdamW weight decay (never on biases and LayerNorm weights)
    lin_ftrs: list | None = None,  # Pooling head: hidden layer sizes (default [50])
    ps: list | None = None,  # Pooling head: dropout per hidden layer
    output_p: float = 0.1,  # Pooling head: dropout on the pooled features
    freeze: bool = True,  # Start with only the head trainable, as fastai's `text_classifier_learner`
    cbs=None,  # fastai callbacks (`MemoryCallback` is added for memory encoders)
    **kwargs,  # Passed to `Learner`
) -> ClassifierLearner:
    """A fastai Learner that classifies texts with a transformer encoder, ready for `fit_ulmfit`, or for
    `fit_one_cycle` (head only while frozen; call `learn.unfreeze()` to train every layer). The task (single-label,
    multi-label or regression) comes from the data's targets; it picks the loss, the metrics and the outputs."""
    tfm, task = find_tokenizer(dls), task_of(dls)
    if task.kind == MULTI:
        task = Task(MULTI, task.classes, threshold)  # (the threshold checked there)
    chunk_len = tfm.max_len if tfm.chunks > 1 else None  # chunk-and-pool when the data are chunked
    if not isinstance(model, SequenceClassifier):
        head_kw = dict(lin_ftrs=lin_ftrs, ps=ps, output_p=output_p) if head == "pooling" else {}
        sep = tfm.between[0] if tfm.pair else None
        model = classifier_model(model, tfm.tok, task.n_out, head, task.classes, chunk_len, sep, **head_kw)
    elif model.chunk_len != chunk_len:
        raise UlmfitError(
            f"the model reads chunks of {model.chunk_len} tokens but the data are chunks of {chunk_len} "
            "(None: one sequence); build both with the same max_len and chunks"
        )
    _check_len(tfm, model)
    weights = None if class_weights is None else class_weights_of(dls, task, class_weights)
    learn = ClassifierLearner(
        dls,
        model,
        loss_func=task.loss_func(weights),
        opt_func=opt_func,
        splitter=splitter,
        metrics=task.metrics(f1=False) if metrics is None else metrics,
        wd=wd,
        wd_bn_bias=False,
        train_bn=False,
        cbs=_callbacks(dls, model, cbs),
        **kwargs,
    )
    if freeze:
        learn.freeze()
    return set_precision(learn, precision)


def class_weights_of(dls, task: Task, spec) -> torch.Tensor:
    "`tasks.class_weights` of `spec` over the training targets of `dls`, on their device."
    targets = dls.train_ds.tls[-1]  # the target pipeline alone: texts are not read
    y = np.stack([np.asarray(targets[i]) for i in range(len(targets))])
    return class_weights(spec, task, y).to(dls.device)


def marge_learner(
    dls,  # DataLoaders from `marge_dataloaders`
    model,  # Encoder folder / hub name / model (a new decoder is added), Marge folder, or `MargeLM`
    from_config: bool = False,  # Build the encoder from `model`'s config with fresh weights (pretraining from nothing)
    reindex_every: int
    | None = None,  # Training steps between neighbour-table rebuilds (None: at the start of each fit)
    precision: str = "auto",  # 'auto' (`default_precision` of the data's device), 'fp32', 'fp16' or 'bf16'
    splitter=marge_splitter,  # Parameter groups: encoder, then decoder and beta (`freeze()` trains the decoder)
    metrics=None,  # Default: beta
    opt_func=FusedAdamW,  # fastai optimizer; the default is fastai's AdamW on torch's fused kernel
    wd: float = 0.01,  # AdamW weight decay (never on biases and norm weights)
    cbs=None,  # fastai callbacks (a `Reindexer` is added)
    progress: bool = True,  # Progress bar and a line per reindex
    **kwargs,  # MargeConfig fields of a new decoder (retrieval_layer, self_layers, cross_layers, beta_init,
    # dropouts), then `Learner` arguments
) -> MargeLearner:
    """A fastai Learner that adapts an encoder to the corpus of `dls` with Marge: `fit_one_cycle`, `lr_find`, then
    `save_pretrained` for the classifier stage."""
    tfm = find_tokenizer(dls)
    names = {k for cls in MargeConfig.__mro__ for k in getattr(cls, "__annotations__", {})}  # MargeConfig's fields
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    if not isinstance(model, MargeLM):
        model = marge_model(model, tfm.tok, from_config, **fields)
    check_max_len(
        tfm.max_len,
        min(max_positions(model.hf.encoder.config), model.hf.config.max_position_embeddings),
        f"model type {model.hf.encoder.config.model_type!r}",
    )
    learn = MargeLearner(
        dls,
        model,
        loss_func=mlm_loss,
        opt_func=opt_func,
        splitter=splitter,
        metrics=[Beta()] if metrics is None else metrics,
        wd=wd,
        wd_bn_bias=False,
        train_bn=False,
        cbs=L(cbs) + [Reindexer(reindex_every, progress=progress)],
        **kwargs,
    )
    return set_precision(learn, precision)


def contrastive_learner(
    dls,  # DataLoaders from `contrastive_dataloaders`
    model,  # Model folder, hub name, Hugging Face model, or `ContrastiveEncoder`
    temperature: float = 0.05,  # Softmax temperature of the InfoNCE loss (SimCSE's 0.05)
    pooling: str = "mean",  # Text embedding: "mean" of the token states (sentence-transformers') or "cls"
    deletion: float = 0.0,  # Share of the tokens the second view leaves out (0: dropout alone, as SimCSE)
    halves: bool = True,  # The two views read the first and the second half of each text (False: SimCSE's views)
    precision: str = "auto",  # 'auto' (`default_precision` of the data's device), 'fp32', 'fp16' or 'bf16'
    splitter=clas_splitter,  # Parameter groups: embeddings, then each layer
    metrics=None,  # Default: `ViewAccuracy`
    opt_func=FusedAdamW,  # fastai optimizer; the default is fastai's AdamW on torch's fused kernel
    wd: float = 0.01,  # AdamW weight decay (never on biases and norm weights)
    cbs=None,  # fastai callbacks
    **kwargs,  # Passed to `Learner`
) -> ContrastiveLearner:
    """A fastai Learner that adapts a (sentence-embedding) encoder to the texts of `dls` with SimCSE's unsupervised
    contrastive objective: `fit_one_cycle`, then `save_pretrained` for the classifier stage."""
    tfm = find_tokenizer(dls)
    if not isinstance(model, ContrastiveEncoder):
        model = contrastive_model(model, tfm.tok, pooling, deletion, halves)
    _check_len(tfm, model)
    learn = ContrastiveLearner(
        dls,
        model,
        loss_func=SimCSELoss(temperature),
        opt_func=opt_func,
        splitter=splitter,
        metrics=[ViewAccuracy()] if metrics is None else metrics,
        wd=wd,
        wd_bn_bias=False,
        train_bn=False,
        cbs=cbs,
        **kwargs,
    )
    return set_precision(learn, precision)
