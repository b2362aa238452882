"""Segmentation metrics from a 2x2 confusion histogram, as in the paper.

The histogram is `[[tn, fp], [fn, tp]]` (rows label, columns prediction), the paper's
fast_hist(label, pred). Per-image counts are integers, so sums over workers, blocks and resumed
runs are exact and order-independent: pooled metrics never depend on how work was divided.

A ratio whose denominator is 0 is 1.0 when the class is absent from both label and prediction
(nothing to find, nothing found) and 0.0 otherwise.
"""
from __future__ import annotations

import math

import numpy as np

METRIC_KEYS = ("b_iou", "n_iou", "miou", "pa", "precision", "recall", "f1", "f1_macro", "dice",
               "n_iou_per_image", "images", "errors", "skipped", "hist")


def confusion(label: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """2x2 int64 histogram of one image (or a stack of them)."""
    label = np.asarray(label).astype(bool).ravel()
    pred = np.asarray(pred).astype(bool).ravel()
    if label.shape != pred.shape:
        raise ValueError(f"label has {label.size} pixels, prediction {pred.size}")
    # three counts over bool arrays: several times faster than a bincount of label*2+pred
    tp = int(np.count_nonzero(label & pred))
    fn = int(np.count_nonzero(label)) - tp
    fp = int(np.count_nonzero(pred)) - tp
    return np.array([[label.size - tp - fn - fp, fp], [fn, tp]], dtype=np.int64)


def counts(label: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    """tp, fp, fn, tn of one image: the per-image columns of results tables."""
    (tn, fp), (fn, tp) = confusion(label, pred).tolist()
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _ratio(num: float, den: float, absent: bool) -> float:
    if den == 0:
        return 1.0 if absent else 0.0
    return float(num) / float(den)


def _class_scores(hit: int, false_pos: int, false_neg: int) -> dict[str, float]:
    """IoU, precision, recall and F1 of one class from its own tp/fp/fn."""
    absent = hit + false_pos + false_neg == 0
    iou = _ratio(hit, hit + false_pos + false_neg, absent)
    precision = _ratio(hit, hit + false_pos, false_neg == 0)  # nothing predicted: right if
    recall = _ratio(hit, hit + false_neg, false_pos == 0)  # there was nothing to find
    f1 = _ratio(2 * precision * recall, precision + recall, absent)
    return {"iou": iou, "precision": precision, "recall": recall, "f1": f1}


def image_iou(tp: int, fp: int, fn: int) -> float:
    return _ratio(tp, tp + fp + fn, tp + fp + fn == 0)


def summarize(tp, fp, fn, tn, errors: int = 0, skipped: int = 0) -> dict:
    """Per-image count arrays -> every metrics.json key (pooled, plus per-image mean IoU)."""
    tp, fp, fn, tn = (np.asarray(a, dtype=np.int64).ravel() for a in (tp, fp, fn, tn))
    with_nodule = (tp + fn) > 0
    # an exactly rounded sum: the result cannot depend on the order of the rows, so a resumed
    # run, a re-batched run and `evaluate` all give the same bits
    iou_sum = math.fsum((tp[with_nodule] / (tp + fp + fn)[with_nodule]).tolist())
    return from_totals(int(tn.sum()), int(fp.sum()), int(fn.sum()), int(tp.sum()), iou_sum,
                       int(with_nodule.sum()), int(tp.size), errors, skipped)


def from_totals(tn: int, fp: int, fn: int, tp: int, iou_sum: float, with_nodule: int,
                images: int, errors: int = 0, skipped: int = 0) -> dict:
    """Metrics from sums that workers can all-reduce: the pooled histogram, the sum of per-image
    IoU over images whose label has a nodule, and the count of such images."""
    out = scores(np.array([[tn, fp], [fn, tp]], dtype=np.int64))
    out["n_iou_per_image"] = iou_sum / with_nodule if with_nodule else None
    out["images"] = int(images)
    out["errors"] = int(errors)
    out["skipped"] = int(skipped)  # inputs that are not images (DICOM reports, plans...)
    return out


def scores(hist: np.ndarray) -> dict:
    """The paper's table from a pooled histogram; n_iou_per_image needs per-image counts."""
    (tn, fp), (fn, tp) = np.asarray(hist, dtype=np.int64).tolist()
    nodule = _class_scores(tp, fp, fn)
    background = _class_scores(tn, fn, fp)
    total = tn + fp + fn + tp
    return {
        "b_iou": background["iou"],
        "n_iou": nodule["iou"],
        "miou": (background["iou"] + nodule["iou"]) / 2,
        "pa": _ratio(tp + tn, total, total == 0),
        "precision": nodule["precision"],
        "recall": nodule["recall"],
        "f1": nodule["f1"],
        "f1_macro": (background["f1"] + nodule["f1"]) / 2,
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, tp + fp + fn == 0),
        "n_iou_per_image": None,
        "images": None,
        "errors": 0,
        "hist": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


def table(metrics: dict, title: str = "") -> str:
    """The paper's results table, plus the per-image IoU the challenges rank by."""
    columns = [("b_IoU", "b_iou"), ("n_IoU", "n_iou"), ("mIoU", "miou"), ("PA", "pa"),
               ("Precision", "precision"), ("Recall", "recall"), ("F1", "f1_macro"),
               ("Dice", "dice"), ("n_IoU/img", "n_iou_per_image")]
    head = " | ".join(f"{name:>9}" for name, _ in columns)
    cells = []
    for _, key in columns:
        value = metrics.get(key)
        cells.append(f"{value:9.4f}" if isinstance(value, (int, float)) else f"{'-':>9}")
    lines = [title] if title else []
    lines += [head, "-" * len(head), " | ".join(cells),
              f"images: {metrics.get('images')}  errors: {metrics.get('errors')}  "
              f"(F1 is the mean over both classes, as in the paper; Dice is the nodule's)"]
    return "\n".join(lines)
