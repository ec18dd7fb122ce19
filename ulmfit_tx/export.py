"""A classifier for inference without pickles, and its ONNX Runtime form.

A bundle folder holds the Hugging Face `config.json` (for the pooling head, `PoolingClassifierConfig` around the
encoder's config), the weights in `model.safetensors` (shared tensors stored once), the tokenizer's `save_pretrained`
files and `ulmfit_tx.json` (head, classes, tokenization settings). Reading it runs no code from the folder: JSON,
safetensors and the tokenizer files only. After `import ulmfit_tx` it is also a folder for
`AutoModelForSequenceClassification.from_pretrained` and `pipeline("text-classification")`.

`export_onnx` writes the classifier as an ONNX graph (`torch.onnx`, dynamic batch and length, the attention mask read
from the padding inside the graph; optionally int8 by ONNX Runtime's dynamic quantization) beside the tokenizer and
`ulmfit_tx.json`, and checks it against PyTorch; `OnnxClassifier` runs it as a module fastai can call."""
from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedConfig

from .archs import max_positions
from .data import PadTokens
from .encoders import MEMORY_MODEL_TYPES
from .errors import UlmfitError
from .io import atomic_dir, atomic_file
from .models import PoolingClassifierConfig, SequenceClassifier
from .store import tokenizer_fingerprint
from .tokenize import HFTokenizer

__all__ = ["BUNDLE_FORMAT", "META_FILE", "WEIGHTS_FILE", "ONNX_FILES", "is_bundle", "write_hf", "write_bundle", "export_bundle",
           "read_bundle", "export_onnx", "OnnxClassifier", "read_onnx"]

BUNDLE_FORMAT = 2
META_FILE, WEIGHTS_FILE = "ulmfit_tx.json", "model.safetensors"
ONNX_FILES = {False: "model.onnx", True: "model.int8.onnx"}   # int8 -> file name in a bundle


def is_bundle(path) -> bool:
    "Whether `path` is a folder with a bundle's `ulmfit_tx.json`."
    return (Path(path) / META_FILE).is_file()


def _meta(model: SequenceClassifier, tfm: HFTokenizer, classes: list) -> dict:
    "What `ulmfit_tx.json` records: head, classes and the tokenization settings `predict` needs."
    from . import __version__
    head = model.head
    return {"format": BUNDLE_FORMAT, "ulmfit_tx_version": __version__, "model_type": model.hf.config.model_type,
            "head": "native" if head is None else "pooling", "pooling": None if head is None else head.config,
            "classes": [c.item() if hasattr(c, "item") else c for c in classes], "max_len": tfm.max_len,
            "truncate": tfm.truncate, "head_frac": tfm.head_frac, "padding_side": tfm.tok.padding_side,
            "vocab_size": len(tfm.tok), "tokenizer_fingerprint": tokenizer_fingerprint(tfm)}


def _hf_form(model: SequenceClassifier, tfm: HFTokenizer, classes: list) -> tuple[PreTrainedConfig, nn.Module]:
    """The config and the module whose weights a bundle holds, as Hugging Face loads them: the native model itself,
    or (pooling head) a `PoolingClassifierConfig` and the classifier, whose weight names `PoolingForSequenceClassification`
    shares."""
    if model.head is None: return model.hf.config, model.hf
    names = {i: str(c) for i, c in enumerate(classes)}
    return PoolingClassifierConfig(encoder=model.hf.config.to_dict(), pooling=model.head.config, id2label=names,
                                   label2id={v: k for k, v in names.items()}, pad_token_id=tfm.pad_id), model


def write_hf(
    model: SequenceClassifier,   # The classifier (`learn.model`)
    tfm: HFTokenizer,            # Its tokenizer transform (`learn.tokenizer`)
    classes: list,               # Class names in the order of the model's outputs (`learn.dls.vocab`)
    folder,                      # An existing folder (e.g. the temporary folder of an atomic write)
) -> Path:
    """Write the classifier as a Hugging Face folder into `folder`: `config.json`, `model.safetensors` and the
    tokenizer, what `AutoModelForSequenceClassification` and `pipeline("text-classification")` read."""
    folder = Path(folder)
    config, module = _hf_form(model, tfm, classes)
    config.save_pretrained(folder)
    save_model(module, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    tfm.tok.save_pretrained(folder)
    return folder


def write_bundle(model: SequenceClassifier, tfm: HFTokenizer, classes: list, folder) -> Path:
    "`write_hf`, plus `ulmfit_tx.json`: a bundle that `read_bundle` (`load_classifier`) reads."
    write_hf(model, tfm, classes, folder)
    (Path(folder) / META_FILE).write_text(json.dumps(_meta(model, tfm, classes), indent=1) + "\n")
    return Path(folder)


def export_bundle(model: SequenceClassifier, tfm: HFTokenizer, classes: list, path, force: bool = False) -> Path:
    "`write_bundle` into a new folder `path`, atomically (refused if it exists, unless `force`)."
    with atomic_dir(path, force) as tmp: write_bundle(model, tfm, classes, tmp)
    return Path(path)


def _read_meta(p: Path, needs: str) -> dict:
    "`ulmfit_tx.json` of folder `p`, checked (`needs`: what the caller reads, for the error when it is missing)."
    if not p.exists(): raise UlmfitError(f"{p}: no such model folder")
    if not is_bundle(p):
        hint = (" It holds only export.pkl, a pickle: loading one runs whatever code its author put in it. Load it only if "
                "you made it or trust who did (ulmfit-tx predict --trust-pickle; fastai's load_learner)."
                if (p / "export.pkl").exists() else "")
        raise UlmfitError(f"{p}: not a ulmfit_tx {needs} (no {META_FILE}; train-clf and learn.export_bundle write one).{hint}")
    try: meta = json.loads((p / META_FILE).read_text())
    except ValueError as e: raise UlmfitError(f"{p / META_FILE}: unreadable ({e})") from None
    if meta.get("format") != BUNDLE_FORMAT:
        raise UlmfitError(f"{p}: bundle format {meta.get('format')!r}; this ulmfit_tx reads format {BUNDLE_FORMAT} "
                          "(export it again with this version)")
    missing = [k for k in ("head", "pooling", "classes", "max_len", "truncate", "head_frac", "vocab_size",
                           "tokenizer_fingerprint") if k not in meta]
    if missing: raise UlmfitError(f"{p / META_FILE}: incomplete (no {', '.join(missing)}); export the bundle again")
    return meta


def _read_tokenizer(p: Path, meta: dict, vocab_size: int | None = None) -> HFTokenizer:
    "The tokenizer transform of folder `p`, checked to be the one `meta` was written with (and to fit `vocab_size`)."
    try: tfm = HFTokenizer(p, meta["max_len"], meta["truncate"], meta["head_frac"])
    except UlmfitError: raise
    except Exception as e: raise UlmfitError(f"{p}: cannot read the tokenizer ({type(e).__name__}: {e})") from None
    if tokenizer_fingerprint(tfm) != meta["tokenizer_fingerprint"] or (vocab_size and len(tfm.tok) > vocab_size):
        raise UlmfitError(f"{p}: the tokenizer ({len(tfm.tok)} tokens) is not the one the bundle was written with "
                          f"({meta['vocab_size']} tokens" + (f"; the model's vocabulary is {vocab_size}" if vocab_size else "")
                          + "): the tokenizer files are another model's")
    return tfm


def read_bundle(path) -> tuple[SequenceClassifier, HFTokenizer, list]:
    """The classifier (eval mode), its tokenizer transform and its classes from a bundle folder, each file checked
    against the others: a missing file, weights of another config, a tokenizer of another vocabulary or an unknown
    format version is refused with what is wrong."""
    p = Path(path)
    meta = _read_meta(p, "bundle")
    for f in ("config.json", WEIGHTS_FILE):
        if not (p / f).is_file(): raise UlmfitError(f"{path}: the bundle has no {f}")
    try: config = AutoConfig.from_pretrained(p)                         # JSON; code named in it is never run
    except Exception as e: raise UlmfitError(f"{path}: cannot read config.json ({type(e).__name__}: {e})") from None
    pooling = isinstance(config, PoolingClassifierConfig)
    if pooling != (meta["head"] == "pooling"):
        raise UlmfitError(f"{path}: config.json is a {config.model_type!r} model, not the {meta['head']} head {META_FILE} names")
    tfm = _read_tokenizer(p, meta, (config.encoder_config() if pooling else config).vocab_size)
    hf = AutoModelForSequenceClassification.from_config(config)
    try: load_model(hf, str(p / WEIGHTS_FILE))
    except Exception as e:
        raise UlmfitError(f"{path}: {WEIGHTS_FILE} does not fit config.json and {META_FILE} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    model = SequenceClassifier(hf.hf, tfm.pad_id, hf.head) if pooling else SequenceClassifier(hf, tfm.pad_id)
    return model.eval(), tfm, meta["classes"]
