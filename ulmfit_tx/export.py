"""A classifier for inference without pickles, and its ONNX Runtime form.

A bundle folder holds the Hugging Face `config.json` (for the pooling head, `PoolingClassifierConfig` around the
encoder's config), the weights in `model.safetensors` (shared tensors stored once), the tokenizer's `save_pretrained`
files and `ulmfit_tx.json` (head, classes, tokenization settings). Reading it runs no code from the folder: JSON,
safetensors and the tokenizer files only. It is also a folder for `AutoModelForSequenceClassification.from_pretrained`
and `pipeline("text-classification")`: after `import ulmfit_tx`, or anywhere with `trust_remote_code=True`, as the
pooling head's code is in the bundle (`modeling_ulmfit_tx.py`, a copy of `ulmfit_tx/pooling.py`, named in
config.json's `auto_map`) for encoders of transformers' own model types.

`export_onnx` writes the classifier as an ONNX graph (`torch.onnx`, dynamic batch and length, the attention mask read
from the padding inside the graph; optionally int8 by ONNX Runtime's dynamic quantization) beside the config, tokenizer
and `ulmfit_tx.json`, and checks it against PyTorch; `OnnxClassifier` runs it as a module fastai can call."""

from __future__ import annotations

import copy
import hashlib
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

from . import pooling
from ._version import __version__
from .batching import pad_batch
from .encoders import MEMORY_MODEL_TYPES
from .errors import UlmfitError
from .files import atomic_dir, atomic_file, file_digest, temp_prefix
from .kernels import fuse_projections
from .models import PoolingClassifierConfig, SequenceClassifier, base_kwargs, label_maps
from .store import tokenizer_fingerprint
from .tasks import MULTI, REGRESSION, SINGLE, Task
from .tokenize import HFTokenizer

__all__ = [
    "BUNDLE_FORMAT",
    "META_FILE",
    "WEIGHTS_FILE",
    "ONNX_FILES",
    "is_bundle",
    "weights_fingerprint",
    "write_hf",
    "write_bundle",
    "model_card",
    "export_bundle",
    "read_bundle",
    "SAMPLE_TEXTS",
    "export_onnx",
    "OnnxClassifier",
    "read_onnx",
]

BUNDLE_FORMAT = 2
MODELING_FILE = "modeling_ulmfit_tx.py"  # the pooling head's code in a bundle (`ulmfit_tx/pooling.py`)
META_FILE, WEIGHTS_FILE = "ulmfit_tx.json", "model.safetensors"
ONNX_FILES = {False: "model.onnx", True: "model.int8.onnx"}  # int8 -> file name in a bundle


def is_bundle(path) -> bool:
    "Whether `path` is a folder with a bundle's `ulmfit_tx.json`."
    return (Path(path) / META_FILE).is_file()


def weights_fingerprint(model: nn.Module) -> str:
    "A hash of a model's weights (names and bytes): two exports of one model share it, other weights do not."
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _meta(model: SequenceClassifier, tfm: HFTokenizer, task: Task) -> dict:
    "What `ulmfit_tx.json` records: head, task, classes and the tokenization settings `predict` needs."
    head = model.head
    return {
        "format": BUNDLE_FORMAT,
        "ulmfit_tx_version": __version__,
        "model_type": model.hf.config.model_type,
        "head": "native" if head is None else "pooling",
        "pooling": None if head is None else head.config,
        **task.meta(),
        "classes": [c.item() if hasattr(c, "item") else c for c in task.classes],
        "max_len": tfm.max_len,
        "truncate": tfm.truncate,
        "head_frac": tfm.head_frac,
        "chunks": tfm.chunks,
        "pair": tfm.pair,
        "type_sep": model.type_sep,
        "padding_side": tfm.tok.padding_side,
        "vocab_size": len(tfm.tok),
        "tokenizer_fingerprint": tokenizer_fingerprint(tfm),
        "weights_fingerprint": weights_fingerprint(model),
    }


def _hf_form(model: SequenceClassifier, tfm: HFTokenizer, task: Task) -> tuple[PreTrainedConfig, nn.Module]:
    """The config and the module whose weights a bundle holds, as Hugging Face loads them: the native model itself, or
    (pooling head) a `PoolingClassifierConfig` and the classifier, whose weight names
    `PoolingForSequenceClassification` shares. The config's `problem_type` tells `pipeline()` softmax, sigmoid or
    none."""
    if model.head is None:
        model.hf.config.problem_type = task.problem_type
        return model.hf.config, model.hf
    enc = model.hf.config
    portable = type(enc).__module__.startswith("transformers.")  # (not an encoder type of ulmfit_tx's own)
    module = MODELING_FILE.removesuffix(".py")
    config = PoolingClassifierConfig(
        encoder=enc.to_dict(),
        encoder_kwargs=base_kwargs(enc.model_type),
        pooling=model.head.config,
        type_sep=model.type_sep,
        pad_token_id=tfm.pad_id,
        problem_type=task.problem_type,
        **label_maps(task.classes),
        **(
            {
                "auto_map": {
                    "AutoConfig": f"{module}.PoolingClassifierConfig",
                    "AutoModelForSequenceClassification": f"{module}.PoolingForSequenceClassification",
                }
            }
            if portable
            else {}
        ),
    )
    return config, model


def _write_config(model: SequenceClassifier, tfm: HFTokenizer, task: Task, folder: Path) -> nn.Module:
    """config.json and, for the pooling head, its code (`modeling_ulmfit_tx.py`, which `auto_map` names); returns the
    module whose weights go with that config (`_hf_form`)."""
    config, module = _hf_form(model, tfm, task)
    config.save_pretrained(folder)
    if getattr(config, "auto_map", None):
        shutil.copyfile(pooling.__file__, Path(folder) / MODELING_FILE)
    return module


def write_hf(
    model: SequenceClassifier,  # The classifier (`learn.model`)
    tfm: HFTokenizer,  # Its tokenizer transform (`learn.tokenizer`)
    task: Task,  # What it predicts: kind, output names, threshold (`learn.task`)
    folder,  # An existing folder (e.g. the temporary folder of an atomic write)
) -> Path:
    """Write the classifier as a Hugging Face folder into `folder`: `config.json`, `model.safetensors` and the
    tokenizer, what `AutoModelForSequenceClassification` and `pipeline("text-classification")` read."""
    folder = Path(folder)
    module = _write_config(model, tfm, task, folder)
    save_model(module, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    _save_tokenizer(model, tfm, folder)
    return folder


def _save_tokenizer(model: SequenceClassifier, tfm: HFTokenizer, folder):
    """The tokenizer's files; for a pair model that reads token types, a tokenizer that returns them (`pipeline()`
    gives a Hugging Face model what the tokenizer returns)."""
    tok = tfm.tok
    if model.type_sep is not None and "token_type_ids" not in tok.model_input_names:
        tok = copy.copy(tok)
        tok.model_input_names = [*tok.model_input_names, "token_type_ids"]
        tok.init_kwargs = {**tok.init_kwargs, "model_input_names": tok.model_input_names}
    tok.save_pretrained(folder)


def write_bundle(model: SequenceClassifier, tfm: HFTokenizer, task: Task, folder, metrics: dict | None = None) -> Path:
    """`write_hf`, plus `ulmfit_tx.json`: a bundle that `read_bundle` (`load_classifier`) reads, and its model card
    (README.md; `metrics`: a run's metrics.json, for the data, evaluation and training sections)."""
    write_hf(model, tfm, task, folder)
    meta = _meta(model, tfm, task)
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    (Path(folder) / "README.md").write_text(model_card(meta, metrics))
    return Path(folder)


CARD_METRICS = ("accuracy", "f1_macro", "f1_micro", "accuracy_multi", "rmse", "mae", "pearson", "spearman")


def model_card(meta: dict, metrics: dict | None = None) -> str:
    """A model card in Hugging Face's layout (YAML front matter, then description, use, labels, data, evaluation and
    training): what the bundle is, from its `ulmfit_tx.json` and, when given, its run's metrics."""
    m, kind = metrics or {}, meta.get("task", SINGLE)
    tags = ["ulmfit_tx", "fastai", "text-classification", kind.replace("_", "-")]
    front = ["---", "library_name: ulmfit_tx", "pipeline_tag: text-classification", "tags:"]
    front += [f"- {t}" for t in tags] + ["---", ""]
    names = ", ".join(f"`{c}`" for c in meta["classes"])
    pair = meta.get("pair", False)
    example = '[("the first text", "the second text")]' if pair else '["a text"]'
    pipe_in = '{"text": "the first text", "text_pair": "the second text"}' if pair else '"a text"'
    head = "ULMFiT's pooling" if meta["head"] == "pooling" else "its own"
    what = {SINGLE: f"one of {names}", MULTI: f"any of {names}", REGRESSION: f"a number (`{meta['classes'][0]}`)"}
    lines = [
        "# Text classifier (ulmfit_tx)",
        "",
        f"A `{meta['model_type']}` encoder with {head} head, trained with ulmfit_tx "
        f"{meta.get('ulmfit_tx_version', '')}: predicts {what[kind]} for {'a pair of texts' if pair else 'a text'}"
        + (f" (a class when its probability is at least {meta['threshold']})." if kind == MULTI else "."),
        "",
        "## How to use",
        "",
        "```python",
        "from ulmfit_tx import load_classifier",
        f'load_classifier("THIS_FOLDER").predict_texts({example})  # also: ulmfit-tx predict --model THIS_FOLDER',
        "```",
        "",
        "Or, with `import ulmfit_tx` first for the pooling head: "
        f'`pipeline("text-classification", model="THIS_FOLDER", top_k=None)({pipe_in})`.',
        "",
        "## Inputs",
        "",
        (
            f"- pairs of texts, up to {meta['max_len']} tokens together (the longer text cut first)"
            if pair
            else f"- up to {meta['max_len']} tokens a text ({meta['truncate']} kept)"
        )
        + (f", in up to {meta['chunks']} chunks" if meta.get("chunks", 1) > 1 else ""),
        f"- task: {kind}; outputs: {names}",
    ]
    if m:
        lines += ["", "## Training data", "", f"- {m.get('data', 'the training data')}: {m.get('n_train')} "
                  f"training rows, {m.get('n_valid')} validation rows"]  # fmt: skip
        scores = [(k, m[k]) for k in CARD_METRICS if isinstance(m.get(k), (int, float))]
        lines += ["", "## Evaluation (validation rows)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in scores]
        lines += ["", "## Training", ""] + [
            f"- {k}: {m[k]}"
            for k in ("schedule", "epochs_per_stage", "lr", "div", "bs", "precision", "keep")
            if k in m
        ]
    return "\n".join(front + lines) + "\n"


def export_bundle(model: SequenceClassifier, tfm: HFTokenizer, task: Task, path, force: bool = False) -> Path:
    "`write_bundle` into a new folder `path`, atomically (refused if it exists, unless `force`)."
    with atomic_dir(path, force) as tmp:
        write_bundle(model, tfm, task, tmp)
    return Path(path)


def _read_meta(p: Path, needs: str) -> dict:
    "`ulmfit_tx.json` of folder `p`, checked (`needs`: what the caller reads, for the error when it is missing)."
    if not p.exists():
        raise UlmfitError(f"{p}: no such model folder")
    if not is_bundle(p):
        hint = (
            " It holds only export.pkl, a pickle: loading one runs whatever code its author put in it. "
            "Load it only if you made it or trust who did (ulmfit-tx predict --trust-pickle; fastai's load_learner)."
            if (p / "export.pkl").exists()
            else ""
        )
        raise UlmfitError(
            f"{p}: not a ulmfit_tx {needs} (no {META_FILE}; train-clf and learn.export_bundle write one).{hint}"
        )
    try:
        meta = json.loads((p / META_FILE).read_text())
    except ValueError as e:
        raise UlmfitError(f"{p / META_FILE}: unreadable ({e})") from None
    if meta.get("format") != BUNDLE_FORMAT:
        raise UlmfitError(
            f"{p}: bundle format {meta.get('format')!r}; this ulmfit_tx reads format {BUNDLE_FORMAT} "
            "(export it again with this version)"
        )
    missing = [
        k
        for k in (
            "head",
            "pooling",
            "classes",
            "max_len",
            "truncate",
            "head_frac",
            "vocab_size",
            "tokenizer_fingerprint",
        )
        if k not in meta
    ]
    if missing:
        raise UlmfitError(f"{p / META_FILE}: incomplete (no {', '.join(missing)}); export the bundle again")
    return meta


def _read_tokenizer(p: Path, meta: dict, vocab_size: int | None = None) -> HFTokenizer:
    "The tokenizer transform of folder `p`, checked to be the one `meta` was written with (and to fit `vocab_size`)."
    try:
        tfm = HFTokenizer(
            p,
            meta["max_len"],
            meta["truncate"],
            meta["head_frac"],
            chunks=meta.get("chunks", 1),
            pair=meta.get("pair", False),
        )
    except UlmfitError:
        raise
    except Exception as e:
        raise UlmfitError(f"{p}: cannot read the tokenizer ({type(e).__name__}: {e})") from None
    if tokenizer_fingerprint(tfm) != meta["tokenizer_fingerprint"] or (vocab_size and len(tfm.tok) > vocab_size):
        raise UlmfitError(
            f"{p}: the tokenizer ({len(tfm.tok)} tokens) is not the one the bundle was written with "
            f"({meta['vocab_size']} tokens"
            + (f"; the model's vocabulary is {vocab_size}" if vocab_size else "")
            + "): the tokenizer files are another model's"
        )
    return tfm


def task_meta(meta: dict) -> Task:
    "The task a bundle's `ulmfit_tx.json` records (bundles written before tasks: single-label)."
    return Task(meta.get("task", SINGLE), meta["classes"], meta.get("threshold", 0.5))


def read_bundle(path) -> tuple[SequenceClassifier, HFTokenizer, Task]:
    """The classifier (eval mode), its tokenizer transform and its task (classes) from a bundle folder, each file
    checked against the others: a missing file, weights of another config, a tokenizer of another vocabulary or an
    unknown format version is refused with what is wrong."""
    p = Path(path)
    meta = _read_meta(p, "bundle")
    for f in ("config.json", WEIGHTS_FILE):
        if not (p / f).is_file():
            raise UlmfitError(f"{path}: the bundle has no {f}")
    try:
        config = AutoConfig.from_pretrained(p)  # JSON; code named in it is never run
    except Exception as e:
        raise UlmfitError(f"{path}: cannot read config.json ({type(e).__name__}: {e})") from None
    pooling = isinstance(config, PoolingClassifierConfig)
    if pooling != (meta["head"] == "pooling"):
        raise UlmfitError(
            f"{path}: config.json is a {config.model_type!r} model, not the {meta['head']} head {META_FILE} names"
        )
    tfm = _read_tokenizer(p, meta, (config.encoder_config() if pooling else config).vocab_size)
    if pooling and config.encoder_kwargs is None:  # (bundles written before the field)
        config.encoder_kwargs = base_kwargs(config.encoder["model_type"])
    hf = AutoModelForSequenceClassification.from_config(config)
    try:
        load_model(hf, str(p / WEIGHTS_FILE))
    except Exception as e:
        raise UlmfitError(
            f"{path}: {WEIGHTS_FILE} does not fit config.json and {META_FILE} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        ) from None
    sep = meta.get("type_sep")
    if pooling:
        model = SequenceClassifier(hf.hf, tfm.pad_id, hf.head, tfm.max_len if tfm.chunks > 1 else None, sep)
    else:
        model = SequenceClassifier(hf, tfm.pad_id, type_sep=sep)
    fingerprint = weights_fingerprint(model)  # (MiniLM-L6: 0.06 s)
    if meta.get("weights_fingerprint", fingerprint) != fingerprint:
        raise UlmfitError(
            f"{path}: {WEIGHTS_FILE} holds other weights than those {META_FILE} was written with (their fingerprint "
            f"is not {meta['weights_fingerprint']}): it was replaced, perhaps by another model's; put back this "
            "bundle's file, or export the bundle again"
        )
    return model.eval(), tfm, task_meta(meta)


# Texts the exported graph is checked on: one of a few words, sentences, and one longer than any max_len (truncated)
SAMPLE_TEXTS = [
    "Great.",
    "It was fine, I suppose, though the second half dragged on and on.",
    "An honest, warm and very funny film: the cast is superb and the script never talks down to its audience.",
    " ".join(["The story wanders, the jokes land one time in three, and yet the ending works."] * 60),
]


def sample_inputs(tfm: HFTokenizer) -> list:
    "`SAMPLE_TEXTS`, or for a pair model pairs of them (short with long, long with short)."
    return list(zip(SAMPLE_TEXTS, SAMPLE_TEXTS[::-1])) if tfm.pair else SAMPLE_TEXTS


def _require_onnx():
    "The `onnxruntime` module, or an error that names the optional extra."
    try:
        import onnx  # noqa: F401 (needed by the exporter; imported to check it is there)
        import onnxruntime
        import onnxscript  # noqa: F401 (likewise)
    except ImportError as e:
        raise UlmfitError(
            f"ONNX needs the optional packages onnx, onnxscript and onnxruntime ({e}): "
            "pip install 'ulmfit_tx[onnx]' (make install installs them)"
        ) from None
    return onnxruntime


@contextmanager
def _quiet():
    "Silence the exporter's and the quantizer's progress lines and notices (they log and print as they go)."
    import contextlib
    import io
    import warnings

    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


class _Linear2D(nn.Module):
    """`nn.Linear` as one matrix product of a 2-D input with the bias added in it (`addmm`): x (..., I) -> (N, I) ->
    (N, O) -> (..., O). Exported, it is a `Gemm` (bias fused) where a 3-D input gives `MatMul` then `Add`: faster in
    ONNX Runtime, and what its int8 quantizer quantizes (docs/deploy.md)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight, self.bias = lin.weight, lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, I)
        y = x2 @ self.weight.t() if self.bias is None else torch.addmm(self.bias, x2, self.weight.t())  # (N, O)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _graph_ready(model: SequenceClassifier, fused: bool = True) -> SequenceClassifier:
    """A CPU copy of `model` in eval mode for the exporter: a Hugging Face encoder's self-attentions as ONNX
    Runtime's fused `Attention` node where they can be (`fused` and `fuse_attention`), else in their plain form
    (matrix product, additive mask, softmax; SDPA's boolean-mask form exports as slow `Where`/`IsNaN` nodes); its
    other linear layers as 2-D products (`_Linear2D`), which ONNX Runtime's int8 quantizer quantizes."""
    from .onnx_attention import fuse_attention

    m = copy.deepcopy(model).cpu().eval()
    fuse_projections(m.hf, fuse=False)
    if not (fused and fuse_attention(m.hf)) and (
        getattr(m.hf.config, "_attn_implementation", None) in ("sdpa", "ulmfit_tx")
        and m.hf._supports_attention_backend
    ):
        m.hf.set_attn_implementation("eager")
    for mod in list(m.hf.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is nn.Linear:
                setattr(mod, name, _Linear2D(child))
    return m


class OnnxClassifier(nn.Module):
    """An ONNX Runtime session as a module fastai can call: ids (B, L) -> logits (B, C), on the CPU. It uses torch's
    thread count (`torch.get_num_threads()`) unless given `threads`."""

    def __init__(self, path, threads: int | None = None):
        super().__init__()
        ort = _require_onnx()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.enable_mem_pattern = (
            False  # its plans are per input shape: with batches of every length, +0.8 GB for MiniLM
        )
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise UlmfitError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0][:300]})") from None
        self.path = Path(path)
        self.cpu_marker = nn.Parameter(
            torch.empty(0), requires_grad=False
        )  # fastai reads the device of the first parameter

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"ids": ids.cpu().long().numpy()})[0])  # (B, C)


def _check_graph(
    m: SequenceClassifier, path: Path, tfm: HFTokenizer, task: Task, texts: list[str]
) -> tuple[float, float]:
    """The outputs of the ONNX model at `path` against PyTorch's on `texts` (probabilities, or regression values
    relative to their size), in batches of other sizes and lengths than the traced one (all texts together, then the
    first alone): the largest difference and the share of equal labels (decisions at the threshold, multi_label)."""
    onnx_model, ids = OnnxClassifier(path), tfm.encode_batch(texts)
    diff, same = 0.0, []
    for batch in (pad_batch(ids, tfm.pad_id, tfm.pad_first), pad_batch(ids[:1], tfm.pad_id, tfm.pad_first)):
        with torch.inference_mode():
            want = task.activation(m(batch))
        try:
            got = task.activation(onnx_model(batch))
        except Exception as e:
            raise UlmfitError(
                f"the exported graph does not run on a batch of shape {tuple(batch.shape)}: the exporter fixed "
                f"a dimension to the traced example's ({str(e).splitlines()[0][:200]})"
            ) from None
        scale = want.abs().clamp(min=1) if task.kind == REGRESSION else 1
        diff = max(diff, ((got - want).abs() / scale).max().item())
        if task.kind == SINGLE:
            same += (got.argmax(1) == want.argmax(1)).tolist()
        elif task.kind == MULTI:
            same += ((got >= task.threshold) == (want >= task.threshold)).all(1).tolist()
        else:
            same += ((got - want).abs() / scale <= 1e-3).all(1).tolist()
    return diff, sum(same) / len(same)


def _stage_beside(folder: Path, model: SequenceClassifier, tfm: HFTokenizer, task: Task, stage: Path) -> list[Path]:
    """The bundle's files but the weights (config, tokenizer, `ulmfit_tx.json`), written into `stage` to be moved into
    `folder` beside an ONNX file, so that it is usable on its own. None when `folder` is the bundle's own; a folder
    with another model's `ulmfit_tx.json`, or with files of the same names, is refused."""
    meta = _meta(model, tfm, task)
    if is_bundle(folder):
        there = json.loads((folder / META_FILE).read_text())
        if there.get("weights_fingerprint") != meta["weights_fingerprint"]:
            raise UlmfitError(
                f"{folder} holds another model's {META_FILE} (other weights): write the ONNX file into another folder"
            )
        return []
    stage.mkdir()
    _write_config(model, tfm, task, stage)
    _save_tokenizer(model, tfm, stage)
    (stage / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    clash = sorted(f.name for f in stage.iterdir() if (folder / f.name).exists())
    if clash:
        raise UlmfitError(f"{folder} already has {', '.join(clash)}: write the ONNX file into another folder")
    return list(stage.iterdir())


def _record_onnx(meta_file: Path, name: str, graph: Path):
    "Note the checksum of the ONNX file `graph` (to be named `name`) in the `ulmfit_tx.json` at `meta_file`."
    meta = json.loads(meta_file.read_text())
    meta.setdefault("onnx_digests", {})[name] = file_digest(graph)
    with atomic_file(meta_file) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")


def export_onnx(
    model: SequenceClassifier,  # The classifier (`learn.model`)
    tfm: HFTokenizer,  # Its tokenizer transform (`learn.tokenizer`)
    task: Task,  # What it predicts: kind, output names, threshold (`learn.task`)
    path,  # The .onnx file to write; config, tokenizer and ulmfit_tx.json are kept beside it
    int8: bool = False,  # Quantize the weights of the matrix products to int8 (ONNX Runtime, dynamic, per channel)
    texts: list | None = None,  # Texts (pair models: pairs) to check the graph on (default: `sample_inputs`)
    force: bool = False,  # Replace an existing file at `path`
    portable: bool = False,  # Standard ONNX operators only (attention unfused): for runtimes other than ONNX Runtime
) -> dict:
    """Write the classifier as an ONNX graph (`torch.onnx`, dynamic batch and length, the attention mask read from
    the padding inside the graph, a Hugging Face encoder's self-attention as ONNX Runtime's fused `Attention` node
    unless `portable`), check it against PyTorch on `texts` (float32: probabilities within 1e-4, else
    nothing is written), and keep the config, tokenizer and `ulmfit_tx.json` beside it. Returns the file, its
    size, the seconds taken, the largest probability difference and the share of equal labels."""
    ort = _require_onnx()
    from .onnx_attention import ONNX_TRANSLATIONS

    mt, path = model.hf.config.model_type, Path(path)
    if mt in MEMORY_MODEL_TYPES:
        raise UlmfitError(
            f"a {mt!r} encoder cannot be exported to ONNX: it reads a text segment by segment in a loop whose "
            "number of steps depends on the length, which torch.export fixes to the traced example's. "
            "Serve it from the bundle (load_classifier, predict --backend torch)"
        )
    if path.suffix != ".onnx":
        raise UlmfitError(f"{path}: an ONNX file name ends in .onnx")
    if path.exists() and not force:
        raise UlmfitError(f"{path} exists; use --force (force=True) to replace it")
    if not path.parent.is_dir():
        raise UlmfitError(f"{path.parent}: no such folder")
    t0 = time.perf_counter()
    with atomic_file(path) as tmp, tempfile.TemporaryDirectory(prefix=temp_prefix(path.name), dir=path.parent) as work:
        beside = _stage_beside(path.parent, model, tfm, task, Path(work) / "beside")
        m, fp32 = _graph_ready(model, fused=not portable), Path(work) / "model.onnx" if int8 else tmp
        example = pad_batch(
            tfm.encode_batch(sample_inputs(tfm)[1:3]), tfm.pad_id, tfm.pad_first
        )  # (2, L): sizes 0 and 1 would be fixed
        dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("length", max=tfm.max_len * tfm.chunks)},)
        try:
            with _quiet():
                torch.onnx.export(
                    m,
                    (example,),
                    input_names=["ids"],
                    output_names=["logits"],
                    dynamo=True,
                    dynamic_shapes=dims,
                    custom_translation_table=ONNX_TRANSLATIONS,
                    verbose=False,
                ).save(str(fp32))
        except Exception as e:
            raise UlmfitError(
                f"torch.onnx cannot export this {mt!r} classifier ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0][:300]})"
            ) from None
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with _quiet():
                quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
        diff, agree = _check_graph(m, tmp, tfm, task, texts or sample_inputs(tfm))
        if not int8 and diff > 1e-4:
            raise UlmfitError(
                f"the ONNX graph's outputs differ from PyTorch's by up to {diff:.2e} (more than 1e-4) on "
                f"the sample texts: not written. Report the model type ({mt!r}) and onnxruntime {ort.__version__}"
            )
        _record_onnx(Path(work) / "beside" / META_FILE if beside else path.parent / META_FILE, path.name, tmp)
        for f in beside:
            shutil.move(f, path.parent / f.name)
    return {
        "path": str(path),
        "mb": path.stat().st_size / 2**20,
        "seconds": time.perf_counter() - t0,
        "max_abs_diff": diff,
        "agreement": agree,
        "int8": int8,
    }


def read_onnx(path, int8: bool = False) -> tuple[OnnxClassifier, HFTokenizer, Task]:
    """The ONNX classifier of a bundle (or of an ONNX file with its tokenizer and `ulmfit_tx.json` beside it), its
    tokenizer transform and its task. `path`: a folder (its `model.onnx`, or `model.int8.onnx` with `int8`) or a
    .onnx file."""
    p = Path(path)
    file, folder = (p, p.parent) if p.suffix == ".onnx" else (p / ONNX_FILES[int8], p)
    if p.suffix == ".onnx" and not p.is_file():
        raise UlmfitError(f"{p}: no such file")
    meta = _read_meta(folder, "model folder")
    if not file.is_file():
        others = sorted(f.name for f in folder.glob("*.onnx"))
        if ONNX_FILES[not int8] in others:
            hint = f"it has {ONNX_FILES[not int8]}: {'drop' if int8 else 'add'} --int8 (int8={not int8} in Python)"
        elif others:
            hint = f"it has {', '.join(others)}: give that file as the model"
        else:
            flag = " --int8" if int8 else ""
            hint = f"write it with: ulmfit-tx export-onnx --model {folder}{flag} (or learn.export_onnx)"
        raise UlmfitError(f"{folder}: no {file.name}; {hint}")
    digests = meta.get("onnx_digests")  # (none in bundles exported before they were recorded)
    if digests and file_digest(file) not in digests.values():
        raise UlmfitError(
            f"{file}: not an ONNX graph exported from this folder's model (its checksum is none of those "
            f"{META_FILE} records): export it again (ulmfit-tx export-onnx --model {folder} --force)"
        )
    tfm = _read_tokenizer(folder, meta)
    return OnnxClassifier(file), tfm, task_meta(meta)
