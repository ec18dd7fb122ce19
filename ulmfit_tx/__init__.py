"ulmfit_tx: the ULMFiT recipe for Hugging Face transformers inside fastai."

from . import (
    encoders,  # noqa: F401 (registers scratch, memxl, compressive and marge with the Auto classes)
    show,  # noqa: F401 (registers show_results for text)
)
from ._version import __version__
from .adapt import SimCSELoss, TextView, ViewAccuracy, contrastive_dataloaders
from .archs import ARCHS, ArchSpec, arch_spec, clas_splitter, lm_splitter, marge_splitter, max_positions, register_arch
from .batching import PadTokens, TokenSortedDL
from .checkpoint import CheckpointCallback, Interrupted, KeepBest, Position
from .data import HFTextBlock, StoreLabel, StoreText, clas_dataloaders
from .encoders import CompressiveConfig, MargeConfig, MargeModel, MemXLConfig, ScratchConfig
from .errors import UlmfitError
from .export import export_bundle, is_bundle, read_bundle
from .io import iter_chunks, iter_corpus, read_corpus, read_data, read_folder, read_table
from .learner import (
    ClassifierLearner,
    ContrastiveLearner,
    MargeLearner,
    MLMLearner,
    classifier_learner,
    contrastive_learner,
    load_classifier,
    marge_learner,
    mlm_learner,
)
from .memory import MemoryCallback, SegmentDL
from .mlm import (
    BlockView,
    DocView,
    MaskedAccuracy,
    MaskedPerplexity,
    MaskTokens,
    fill_mask,
    mask_tokens,
    mlm_dataloaders,
    mlm_loss,
)
from .models import (
    ContrastiveEncoder,
    MargeLM,
    MaskedLM,
    MemoryMaskedLM,
    PoolingClassifierHead,
    SequenceClassifier,
    classifier_model,
    contrastive_model,
    has_mlm_head,
    marge_model,
    masked_lm_model,
)
from .optimizer import FusedAdamW
from .precision import MixedPrecision, cpu_has_bf16_matmul, default_precision, set_precision
from .pretrain import new_config, pretrain_learner
from .report import report_callbacks
from .retrieval import (
    Beta,
    Chunks,
    EvidenceDL,
    Reindexer,
    Retriever,
    embed_chunks,
    marge_dataloaders,
    top_k_neighbours,
)
from .run import Run
from .schedule import (
    LAYER_DIV,
    Stage,
    fit_marge,
    fit_mlm,
    fit_stages,
    fit_ulmfit,
    marge_stages,
    mlm_stages,
    ulmfit_lrs,
    ulmfit_stages,
)
from .selftrain import pseudo_labelled_dls, pseudo_labels, self_train
from .store import TokenStore, as_store, build_store, cached_store, default_cache
from .tasks import MULTI, REGRESSION, SINGLE, Task, class_weights, task_of
from .tokenize import HFTokenizer, TextPair, find_tokenizer, load_tokenizer
