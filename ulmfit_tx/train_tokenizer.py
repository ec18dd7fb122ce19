"Train a fast tokenizer from scratch on a corpus with the `tokenizers` library."

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .errors import UlmfitError

__all__ = ["TOKENIZER_KINDS", "unk_token", "train_tokenizer"]

# kind: (special tokens in id order, [CLS]-like, [SEP]-like)
_SPECIALS = {
    "wordpiece": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[CLS]", "[SEP]"),
    "bpe": (["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<s>", "</s>"),
    "unigram": (["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"], "[CLS]", "[SEP]"),
}
TOKENIZER_KINDS = tuple(_SPECIALS)


def unk_token(kind: str) -> str:
    "The unknown-word token of a tokenizer `kind`."
    return "<unk>" if kind == "bpe" else _SPECIALS[kind][0][1]


def _backend(kind: str, vocab_size: int, specials: list[str]) -> tuple[Tokenizer, trainers.Trainer]:
    "An untrained tokenizer of `kind` with its trainer (BERT, RoBERTa and ALBERT conventions)."
    unk = unk_token(kind)
    if kind == "wordpiece":
        tk = Tokenizer(models.WordPiece(unk_token=unk))
        tk.normalizer = normalizers.BertNormalizer(lowercase=True)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.decoder = decoders.WordPiece()
        return tk, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    if kind == "bpe":
        tk = Tokenizer(models.BPE(unk_token=None))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tk.decoder = decoders.ByteLevel()
        return tk, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    return tk, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=unk)


def train_tokenizer(
    texts,  # Iterable of strings to learn the vocabulary from
    kind: str = "wordpiece",  # "wordpiece" (BERT), "bpe" (byte-level, RoBERTa) or "unigram" (ALBERT)
    vocab_size: int = 8000,  # Size of the vocabulary, special tokens included
) -> PreTrainedTokenizerFast:
    "A fast tokenizer trained on `texts`, with [CLS]/[SEP]-style special tokens added around each text."
    if kind not in _SPECIALS:
        raise UlmfitError(f"tokenizer kind must be one of {', '.join(TOKENIZER_KINDS)}, not {kind!r}")
    specials, cls, sep = _SPECIALS[kind]
    tk, trainer = _backend(kind, vocab_size, specials)
    tk.train_from_iterator(texts, trainer)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(t, tk.token_to_id(t)) for t in (cls, sep)],
    )
    pad, unk, mask = ("<pad>", "<unk>", "<mask>") if kind == "bpe" else (specials[0], specials[1], specials[4])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=pad,
        unk_token=unk,
        mask_token=mask,
        cls_token=cls,
        sep_token=sep,
        bos_token=cls,
        eos_token=sep,
    )
