"""ulmfit_tx's own encoders, registered with the Hugging Face Auto classes (importing ulmfit_tx is
enough for `AutoModel*.from_pretrained` to load their folders) and with ulmfit_tx's splitters."""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from ..archs import ArchSpec, register_arch
from .compressive import (
    CompressiveConfig,
    CompressiveForMaskedLM,
    CompressiveForSequenceClassification,
    CompressiveMemories,
    CompressiveModel,
)
from .marge import MargeConfig, MargeModel
from .memxl import MemXLConfig, MemXLForMaskedLM, MemXLForSequenceClassification, MemXLMemories, MemXLModel
from .scratch import ScratchConfig, ScratchForMaskedLM, ScratchForSequenceClassification, ScratchModel

__all__ = [
    "ScratchConfig",
    "ScratchModel",
    "ScratchForMaskedLM",
    "ScratchForSequenceClassification",
    "MemXLConfig",
    "MemXLMemories",
    "MemXLModel",
    "MemXLForMaskedLM",
    "MemXLForSequenceClassification",
    "CompressiveConfig",
    "CompressiveMemories",
    "CompressiveModel",
    "CompressiveForMaskedLM",
    "CompressiveForSequenceClassification",
    "MargeConfig",
    "MargeModel",
    "MEMORY_MODEL_TYPES",
]

FAMILIES = [
    (ScratchConfig, ScratchModel, ScratchForMaskedLM, ScratchForSequenceClassification),
    (MemXLConfig, MemXLModel, MemXLForMaskedLM, MemXLForSequenceClassification),
    (CompressiveConfig, CompressiveModel, CompressiveForMaskedLM, CompressiveForSequenceClassification),
]
MEMORY_MODEL_TYPES = {MemXLConfig.model_type, CompressiveConfig.model_type}

for config, base, mlm, clf in FAMILIES:
    AutoConfig.register(config.model_type, config, exist_ok=True)
    for auto, cls in ((AutoModel, base), (AutoModelForMaskedLM, mlm), (AutoModelForSequenceClassification, clf)):
        auto.register(config, cls, exist_ok=True)
    # embeddings (and the relative position bias) first, then each block; the rest goes with the head
    register_arch(
        config.model_type,
        ArchSpec(
            ["embed", "pos" if config is ScratchConfig else "rel_pos", "embed_norm"],
            "layers",
            lambda m, h: m.lm_head(h),
        ),
    )

AutoConfig.register(MargeConfig.model_type, MargeConfig, exist_ok=True)
AutoModel.register(MargeConfig, MargeModel, exist_ok=True)
