"""A classifier for inference without pickles: a bundle folder holding the Hugging Face `config.json`, the weights in
`model.safetensors` (encoder and head; shared tensors stored once), the tokenizer's `save_pretrained` files and
`ulmfit_tx.json` (head, classes, tokenization settings). Reading it runs no code from the folder: JSON, safetensors
and the tokenizer files only."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .errors import UlmfitError
from .io import atomic_dir
from .models import PoolingClassifierHead, SequenceClassifier, _base_kwargs
from .store import tokenizer_fingerprint
from .tokenize import HFTokenizer

__all__ = ["BUNDLE_FORMAT", "META_FILE", "WEIGHTS_FILE", "is_bundle", "write_bundle", "export_bundle", "read_bundle"]

BUNDLE_FORMAT = 1
META_FILE, WEIGHTS_FILE = "ulmfit_tx.json", "model.safetensors"


def is_bundle(path) -> bool:
    "Whether `path` is a folder with a bundle's `ulmfit_tx.json`."
    return (Path(path) / META_FILE).is_file()


def write_bundle(
    model: SequenceClassifier,   # The classifier (`learn.model`)
    tfm: HFTokenizer,            # Its tokenizer transform (`learn.tokenizer`)
    classes: list,               # Class names in the order of the model's outputs (`learn.dls.vocab`)
    folder,                      # An existing folder (e.g. the temporary folder of an atomic write)
) -> Path:
    "Write a classifier's bundle files into `folder`: config, weights, tokenizer and `ulmfit_tx.json`."
    from . import __version__
    folder, head = Path(folder), model.head
    meta = {"format": BUNDLE_FORMAT, "ulmfit_tx_version": __version__, "model_type": model.hf.config.model_type,
            "head": "native" if head is None else "pooling", "pooling": None if head is None else head.config,
            "classes": [c.item() if hasattr(c, "item") else c for c in classes], "max_len": tfm.max_len,
            "truncate": tfm.truncate, "head_frac": tfm.head_frac, "padding_side": tfm.tok.padding_side,
            "vocab_size": len(tfm.tok), "tokenizer_fingerprint": tokenizer_fingerprint(tfm)}
    model.hf.config.save_pretrained(folder)
    tfm.tok.save_pretrained(folder)
    save_model(model, str(folder / WEIGHTS_FILE))
    (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def export_bundle(model: SequenceClassifier, tfm: HFTokenizer, classes: list, path, force: bool = False) -> Path:
    "`write_bundle` into a new folder `path`, atomically (refused if it exists, unless `force`)."
    with atomic_dir(path, force) as tmp: write_bundle(model, tfm, classes, tmp)
    return Path(path)


def read_bundle(path) -> tuple[SequenceClassifier, HFTokenizer, list]:
    """The classifier (eval mode), its tokenizer transform and its classes from a bundle folder, each file checked
    against the others: a missing file, weights of another config, a tokenizer of another vocabulary or an unknown
    format version is refused with what is wrong."""
    p = Path(path)
    if not p.exists(): raise UlmfitError(f"{path}: no such model folder")
    if not is_bundle(p):
        hint = (" It holds only export.pkl, a pickle: loading one runs whatever code its author put in it. Load it only if "
                "you made it or trust who did (ulmfit-tx predict --trust-pickle; fastai's load_learner)."
                if (p / "export.pkl").exists() else "")
        raise UlmfitError(f"{path}: not a ulmfit_tx bundle (no {META_FILE}; train-clf and learn.export_bundle write one).{hint}")
    try: meta = json.loads((p / META_FILE).read_text())
    except ValueError as e: raise UlmfitError(f"{p / META_FILE}: unreadable ({e})") from None
    if meta.get("format") != BUNDLE_FORMAT:
        raise UlmfitError(f"{path}: bundle format {meta.get('format')!r}; this ulmfit_tx reads format {BUNDLE_FORMAT}")
    missing = [k for k in ("head", "pooling", "classes", "max_len", "truncate", "head_frac", "vocab_size",
                           "tokenizer_fingerprint") if k not in meta]
    if missing: raise UlmfitError(f"{p / META_FILE}: incomplete (no {', '.join(missing)}); export the bundle again")
    for f in ("config.json", WEIGHTS_FILE):
        if not (p / f).is_file(): raise UlmfitError(f"{path}: the bundle has no {f}")
    try:
        config = AutoConfig.from_pretrained(p)                           # JSON; code named in it is never run
        tfm = HFTokenizer(p, meta["max_len"], meta["truncate"], meta["head_frac"])
    except UlmfitError: raise
    except Exception as e: raise UlmfitError(f"{path}: cannot read the config or tokenizer ({type(e).__name__}: {e})") from None
    if tokenizer_fingerprint(tfm) != meta["tokenizer_fingerprint"] or len(tfm.tok) > config.vocab_size:
        raise UlmfitError(f"{path}: the tokenizer ({len(tfm.tok)} tokens) is not the one the bundle was written with "
                          f"({meta['vocab_size']} tokens; the model's vocabulary is {config.vocab_size}): the tokenizer files "
                          "are another model's")
    if meta["head"] == "pooling":
        hf = AutoModel.from_config(config, **_base_kwargs(config.model_type))
        model = SequenceClassifier(hf, tfm.pad_id, PoolingClassifierHead(**meta["pooling"]))
    else: model = SequenceClassifier(AutoModelForSequenceClassification.from_config(config), tfm.pad_id)
    try: load_model(model, str(p / WEIGHTS_FILE))
    except Exception as e:
        raise UlmfitError(f"{path}: {WEIGHTS_FILE} does not fit config.json and {META_FILE} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    return model.eval(), tfm, meta["classes"]
