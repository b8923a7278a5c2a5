"""Classification metrics as pure functions of integer labels and predictions (N rows, K classes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_recall_fscore_support


def classification_metrics(labels: np.ndarray, preds: np.ndarray, *, classes: Sequence[str]) -> dict:
    """top1, balanced_accuracy, f1_macro and per_class {class: recall, precision, f1, support}.

    Balanced accuracy and macro F1 average over the classes present in ``labels`` (a class
    with no test rows has no recall to average).
    """
    labels, preds = np.asarray(labels), np.asarray(preds)
    k = len(classes)
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=np.arange(k), zero_division=0)
    present = np.unique(labels)
    return {
        "n": int(len(labels)),
        "top1": float(accuracy_score(labels, preds)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, preds)),
        "f1_macro": float(f1_score(labels, preds, labels=present, average="macro", zero_division=0)),
        "per_class": {
            c: {"recall": float(r[i]), "precision": float(p[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)
        },
    }
