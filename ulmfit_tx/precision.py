"""Training precision: what `precision="auto"` means on a device, and fastai's `MixedPrecision` on any device
(bf16 autocast on the CPU too), for the training batches only."""

from __future__ import annotations

import torch
from fastai.callback import fp16
from fastai.learner import Learner
from fastcore.foundation import L

from .errors import UlmfitError

__all__ = ["PRECISIONS", "cpu_has_bf16_matmul", "default_precision", "MixedPrecision", "set_precision", "precision_of"]

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware: Intel AMX tiles (Sapphire Rapids and later) or
    AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake). Without them torch emulates bf16 products, no faster
    than float32."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False  # a torch without the checks


def default_precision(device: torch.device | str | None = None) -> str:
    """What `precision="auto"` means on `device` (default: CUDA if there is one, else the CPU): bf16 mixed precision
    on a CUDA GPU that has it, fp16 on other CUDA GPUs; on the CPU, bf16 where it has bf16 matrix instructions
    (`cpu_has_bf16_matmul`: AMX or AVX512-BF16), else float32."""
    kind = torch.device(device).type if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if kind == "cpu" and cpu_has_bf16_matmul() else "fp32"


def _check_amp(precision: str, kind: str):
    "Refuse a mixed precision that device `kind` cannot run."
    if precision == "fp16" and kind != "cuda":
        raise UlmfitError(f"precision fp16 needs a CUDA GPU, not {kind}: use bf16 or fp32")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise UlmfitError("this GPU has no bf16: use fp16 or fp32")


class MixedPrecision(fp16.MixedPrecision):
    """fastai's `MixedPrecision` on the model's device, not only CUDA (bf16 autocast on the CPU), for the training
    batches only: weights, gradients and optimizer state stay float32, and validation, `get_preds` and `predict` run
    in float32, so the metrics of a fit agree with the exported bundle, ONNX graph and Hugging Face folder."""

    def before_fit(self):
        kind, half = next(self.model.parameters()).device.type, self.amp_mode == fp16.AMPMode.FP16
        _check_amp(self.amp_mode.value, kind)  # again here: the learner may have moved since `set_precision`
        self.autocast = torch.autocast(kind, dtype=torch.float16 if half else torch.bfloat16)
        self.learn.scaler = torch.amp.GradScaler(kind, enabled=half, **self.kwargs)  # fp16 only: bf16 has fp32's range
        self.scales = L()

    def before_batch(self):
        if self.training:
            self.autocast.__enter__()

    def after_loss(self):
        if self.training:
            self.autocast.__exit__(None, None, None)


def set_precision(learn: Learner, precision: str = "auto") -> Learner:
    """Train `learn` in `precision`: 'auto' (`default_precision` of its data's device), 'fp32', 'fp16' (CUDA) or
    'bf16' (CUDA, or a CPU: fast with AMX or AVX512-BF16, slow emulation without), with `MixedPrecision`."""
    if precision not in PRECISIONS:
        raise UlmfitError(f"precision must be auto, fp32, fp16 or bf16, not {precision!r}")
    kind = torch.device(learn.dls.device or "cpu").type
    precision = default_precision(kind) if precision == "auto" else precision
    _check_amp(precision, kind)
    if precision == "fp32":
        return learn
    return learn.add_cb(MixedPrecision(amp_mode=precision))


def precision_of(learn: Learner) -> str:
    "The precision `learn`'s training batches run in: its `MixedPrecision`'s 'bf16' or 'fp16', else 'fp32'."
    amp = [cb for cb in learn.cbs if isinstance(cb, fp16.MixedPrecision)]
    return amp[0].amp_mode.value if amp else "fp32"
