"ulmfit_tx: the ULMFiT recipe for Hugging Face transformers inside fastai."
__version__ = "0.1.0"

from .archs import ARCHS, ArchSpec, arch_spec, clas_splitter, lm_splitter, marge_splitter, max_positions, register_arch
from .data import HFTextBlock, PadTokens, StoreLabel, StoreText, TokenSortedDL, clas_dataloaders
from .checkpoint import CheckpointCallback, Interrupted, Position
from .errors import UlmfitError
from . import encoders  # noqa: F401 (registers scratch, memxl, compressive and marge with the Auto classes)
from .encoders import CompressiveConfig, MargeConfig, MargeModel, MemXLConfig, ScratchConfig
from .export import export_bundle, is_bundle, read_bundle
from .io import iter_chunks, iter_corpus, read_corpus, read_data, read_folder, read_table
from .learner import (LAYER_DIV, ClassifierLearner, MargeLearner, MixedPrecision, MLMLearner, Stage, classifier_learner, fit_marge, fit_stages,
                      fit_mlm, fit_ulmfit, load_classifier, marge_learner, marge_stages,
                      mlm_learner, mlm_stages, cpu_has_bf16_matmul, default_precision, set_precision, ulmfit_lrs,
                      ulmfit_stages)
from .memory import MemoryCallback, SegmentDL
from .mlm import MaskedAccuracy, MaskedPerplexity, MaskTokens, fill_mask, BlockView, DocView, mask_tokens, mlm_dataloaders, mlm_loss
from .models import (MargeLM, MaskedLM, MemoryMaskedLM, PoolingClassifierHead, SequenceClassifier, classifier_model, marge_model,
                     masked_lm_model)
from .optimizer import FusedAdamW
from .pretrain import new_config, pretrain_learner
from .retrieval import Beta, Chunks, EvidenceDL, Reindexer, Retriever, embed_chunks, marge_dataloaders, top_k_neighbours
from .store import TokenStore, as_store, build_store, cached_store, default_cache
from .tokenize import HFTokenizer, find_tokenizer, load_tokenizer
from . import show  # noqa: F401 (registers show_results for text)
