"""Scalar scores shared by training, evaluation and the demo."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve of ``scores`` (N,) against binary ``labels`` (N,): the probability that
    a random positive (label 1) scores above a random negative, ties counting half (the
    Mann-Whitney U statistic divided by n_pos * n_neg). Raises ValueError without both classes."""
    from scipy.stats import rankdata

    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both in-sync and off-sync pairs")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
