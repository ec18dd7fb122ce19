"""Self-training after the classifier (ULMFiT's stage 4 for few labels): the classifier labels unlabelled texts, the
texts it is confident about join the labelled training rows, and it trains again on both; repeated for a few rounds.
Pseudo-labels are balanced across classes so that one class cannot take over.

    learn.fit_ulmfit(2e-3, (1, 1, 1, 10))
    history = learn.self_train(unlabelled_texts, rounds=2, threshold=0.9)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from fastai.data.core import DataLoaders, Datasets
from fastai.data.transforms import Categorize, ColReader
from fastai.learner import Learner
from fastcore.basics import patch

from .batching import PadTokens, TokenSortedDL
from .errors import UlmfitError
from .schedule import LAYER_DIV, ulmfit_lrs
from .tasks import SINGLE, task_of
from .tokenize import IDS_COL

__all__ = ["pseudo_labels", "pseudo_labelled_dls", "self_train"]

LABEL_COL = "label"


def pseudo_labels(
    learn: Learner,  # A trained `ClassifierLearner`
    texts,  # Unlabelled texts (list or Series of str)
    threshold: float = 0.9,  # Keep a text only when its top class probability is at least this
    per_class: int | None = None,  # At most this many texts per class (default: no cap besides balancing)
    bs: int = 64,  # Batch size of the predictions
    ids: list | None = None,  # The texts' model inputs when already tokenized (`learn.tokenizer.encode_batch`)
) -> pd.DataFrame:
    """The confident predictions of `learn` on `texts`, class-balanced: every class keeps as many texts as the class
    with the fewest confident ones (its most confident first). Columns: text, label, confidence; and input_ids, the
    texts' model inputs, so training does not tokenize them again."""
    if not 0 < threshold < 1:
        raise UlmfitError(f"threshold must be between 0 and 1 (a class probability), not {threshold}")
    if task_of(learn.dls).kind != SINGLE:
        raise UlmfitError(
            f"self-training pseudo-labels one class a text: a single_label task, not {task_of(learn.dls).kind}"
        )
    if learn.tokenizer.pair:
        raise UlmfitError("self-training pseudo-labels single texts; this classifier reads pairs of texts")
    texts = pd.Series(list(texts), dtype=object)
    if texts.empty:
        raise UlmfitError("no unlabelled texts to pseudo-label")
    bad = texts.map(lambda t: not isinstance(t, str) or not t.strip())
    if bad.any():
        raise UlmfitError(
            f"{int(bad.sum())} unlabelled texts are empty or not strings (positions {list(bad[bad].index[:5])})"
        )
    ids = learn.tokenizer.encode_batch(texts.tolist()) if ids is None else ids
    probs = learn._probs(ids, bs).float().numpy()  # (N, C)
    vocab = np.array(list(learn.dls.vocab), dtype=object)
    df = pd.DataFrame({"text": texts, LABEL_COL: vocab[probs.argmax(1)], "confidence": probs.max(1), IDS_COL: ids})
    df = df[df.confidence >= threshold]
    counts = df[LABEL_COL].value_counts()
    n = 0 if len(counts) < len(vocab) else int(counts.min())
    n = n if per_class is None else min(n, per_class)
    return (
        df.sort_values("confidence", ascending=False, kind="stable")
        .groupby(LABEL_COL, sort=False)
        .head(n)
        .reset_index(drop=True)
    )


def pseudo_labelled_dls(learn: Learner, pseudo: pd.DataFrame, bs: int | None = None) -> DataLoaders:
    """`learn`'s DataLoaders with the `pseudo_labels` rows added to the training set (the labelled training rows read
    back from its current training set, so any source works); the validation set is the same."""
    dls, tfm = learn.dls, learn.tokenizer
    train = [dls.train_ds[i] for i in range(len(dls.train_ds))]  # (ids, label index) of the labelled rows
    vocab = list(dls.vocab)
    labelled = pd.DataFrame(
        {IDS_COL: [np.asarray(x, dtype=np.int32) for x, _ in train], LABEL_COL: [vocab[int(y)] for _, y in train]}
    )
    items = pd.concat([labelled, pseudo[[IDS_COL, LABEL_COL]]], ignore_index=True)
    dsets = Datasets(items, tfms=[[tfm], [ColReader(LABEL_COL), Categorize(vocab=vocab, sort=False)]])
    train_dl = TokenSortedDL(
        dsets, bs=bs or dls.train.bs, shuffle=True, drop_last=dls.train.drop_last, num_workers=0,
        before_batch=PadTokens(tfm.pad_id, tfm.pad_first), device=dls.device,
    )  # fmt: skip
    return DataLoaders(train_dl, dls.valid, path=dls.path, device=dls.device)


def self_train(
    learn: Learner,  # A trained `ClassifierLearner` (after `fit_ulmfit`)
    texts,  # Unlabelled texts of the target domain (never the texts it is scored on)
    rounds: int = 1,  # Rounds of pseudo-labelling then training
    threshold: float = 0.9,  # Top class probability a pseudo-label needs
    per_class: int | None = None,  # At most this many pseudo-labels per class and round
    epochs: int = 2,  # Epochs of each round's `fit_one_cycle` (every layer trains)
    lr: float = 2.5e-4,  # Rate of the last group (the default `fit_ulmfit`'s last stage rate)
    div: float = LAYER_DIV,  # Discriminative factor between groups (`ulmfit_lrs`)
    bs: int | None = None,  # Batch size (default: the training DataLoader's)
) -> list[dict]:
    """Rounds of self-training: `pseudo_labels` on `texts` with the current weights, then `fit_one_cycle` on the
    labelled and pseudo-labelled rows together. `learn.dls` keeps the labelled data at the end. Returns one record per
    round: pseudo-labels kept, then the validation values."""
    if rounds < 1 or epochs < 1:
        raise UlmfitError(f"rounds and epochs must be at least 1 (got rounds={rounds}, epochs={epochs})")
    labelled, history = learn.dls, []
    texts = list(texts)
    ids = learn.tokenizer.encode_batch(texts)  # once, for every round
    try:
        for r in range(rounds):
            learn.dls = labelled  # pseudo-label with the labelled DataLoaders' vocab and device
            pseudo = pseudo_labels(learn, texts, threshold, per_class, ids=ids)
            if pseudo.empty:
                raise UlmfitError(
                    f"round {r + 1}: no class has a prediction with probability >= {threshold} on every class; "
                    "lower the threshold or train the classifier longer"
                )
            learn.dls = pseudo_labelled_dls(learn, pseudo, bs)
            learn.unfreeze()
            learn.fit_one_cycle(epochs, ulmfit_lrs(learn, lr, div))
            values = learn.validate()
            history.append(
                {
                    "round": r + 1,
                    "pseudo_labels": len(pseudo),
                    "per_class": pseudo[LABEL_COL].value_counts().to_dict(),
                    "min_confidence": float(pseudo.confidence.min()),
                    **dict(zip(learn.recorder.metric_names[2:-1], map(float, values))),
                }
            )
    finally:
        learn.dls = labelled
    return history


patch(self_train)  # learn.self_train(texts, rounds=2), as fastai's learn.fit_one_cycle
