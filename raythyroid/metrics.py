"""Segmentation metrics from a 2x2 confusion histogram, as in the paper.

The histogram is `[[tn, fp], [fn, tp]]` (rows label, columns prediction), the paper's
fast_hist(label, pred). Per-image counts are integers, so sums over workers, blocks and resumed
runs are exact and order-independent: pooled metrics never depend on how work was divided.

A ratio whose denominator is 0 is 1.0 when the class is absent from both label and prediction
(nothing to find, nothing found) and 0.0 otherwise. With no image scored at all every ratio is
null: an empty run found nothing, it did not score perfectly.
"""
from __future__ import annotations

import math
from dataclasses import asdict, astuple, dataclass

import numpy as np

METRIC_KEYS = ("b_iou", "n_iou", "miou", "pa", "precision", "recall", "f1", "f1_macro", "dice",
               "n_iou_per_image", "images", "errors", "skipped", "hist")
RATIO_KEYS = METRIC_KEYS[:METRIC_KEYS.index("images")]


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


def image_dice(tp: int, fp: int, fn: int) -> float:
    return _ratio(2 * tp, 2 * tp + fp + fn, tp + fp + fn == 0)


NEARLY_ALL = 0.8
# how a mask that fails sits against its label, in the order a report lists them
MISSED, NO_LABEL, AWAY, OUTLINE_OFF, TOO_SMALL, TOO_LARGE = range(6)
FAILURE_KINDS = ("no mask: the nodule missed", "a mask where the label has none",
                 "a mask away from the nodule", "outline off the nodule",
                 "inside the nodule, too small", "covers the nodule, too large")


def failure_kinds(tp, fp, fn) -> np.ndarray:
    """Per image (arrays of its counts), the index into FAILURE_KINDS that describes its mask
    against its label: a mask holding nearly all of the nodule but much more (the model
    outlined the gland lobe, or several nodules as one) asks for another remedy than a mask
    that missed the nodule or cut it short. Meaningful for failing images only."""
    tp, fp, fn = (np.asarray(v, np.int64) for v in (tp, fp, fn))
    mask, label = tp + fp, tp + fn
    return np.select(
        [mask == 0, label == 0, tp == 0, tp >= NEARLY_ALL * label, tp >= NEARLY_ALL * mask],
        [MISSED, NO_LABEL, AWAY, TOO_LARGE, TOO_SMALL], default=OUTLINE_OFF)


def failures_by_kind(tp, fp, fn, failed, queued) -> list[tuple[str, int, int]]:
    """(kind, failing images of that kind, how many of them are `queued`) for the kinds of
    FAILURE_KINDS that occur, in that order; all arguments per image."""
    kinds = failure_kinds(tp, fp, fn)
    failed, queued = np.asarray(failed, bool), np.asarray(queued, bool)
    tally = [(name, int((failed & (kinds == k)).sum()), int((failed & queued & (kinds == k)).sum()))
             for k, name in enumerate(FAILURE_KINDS)]
    return [row for row in tally if row[1]]


@dataclass
class Totals:
    """Confusion totals over many images: the one record training all-reduces across workers,
    infer sums over results rows and `evaluate` sums over mask files.

    Besides the pooled histogram it keeps the sum of per-image nodule IoU over images whose
    label has a nodule (and their count), for `n_iou_per_image`.
    """

    tn: int = 0
    fp: int = 0
    fn: int = 0
    tp: int = 0
    iou_sum: float = 0.0
    with_nodule: int = 0
    images: int = 0

    def add(self, label: np.ndarray, pred: np.ndarray) -> dict[str, int]:
        """Count one image in; returns its own tp, fp, fn, tn."""
        one = counts(label, pred)
        self.add_counts(one["tp"], one["fp"], one["fn"], one["tn"])
        return one

    def add_counts(self, tp: int, fp: int, fn: int, tn: int) -> None:
        self.tn, self.fp, self.fn, self.tp = self.tn + tn, self.fp + fp, self.fn + fn, self.tp + tp
        if tp + fn > 0:
            self.iou_sum += image_iou(tp, fp, fn)
            self.with_nodule += 1
        self.images += 1

    def __add__(self, other: "Totals") -> "Totals":
        return Totals.from_vector([a + b for a, b in zip(self.to_vector(), other.to_vector())])

    def to_vector(self) -> list[float]:
        """As numbers in a fixed order, for an all-reduce; files keep `to_record`."""
        return [float(v) for v in astuple(self)]

    def to_record(self) -> dict:
        """By field name: what history rows, fold records and model.json keep."""
        return asdict(self)

    @classmethod
    def read(cls, kept: "dict | list") -> "Totals":
        """Totals as a file kept them: by name, or as the bare vector (tn, fp, fn, tp, iou_sum,
        with_nodule, images) versions before named fields wrote."""
        return cls(**kept) if isinstance(kept, dict) else cls.from_vector(kept)

    @classmethod
    def from_vector(cls, values) -> "Totals":
        tn, fp, fn, tp, iou_sum, with_nodule, images = values
        return cls(int(tn), int(fp), int(fn), int(tp), float(iou_sum), int(with_nodule),
                   int(images))

    @classmethod
    def from_arrays(cls, tp, fp, fn, tn) -> "Totals":
        """Per-image count columns (results rows) -> totals."""
        tp, fp, fn, tn = (np.asarray(a, dtype=np.int64).ravel() for a in (tp, fp, fn, tn))
        has = (tp + fn) > 0
        # an exactly rounded sum: the result cannot depend on the order of the rows, so a
        # resumed run, a re-batched run and `evaluate` all give the same bits
        iou_sum = math.fsum((tp[has] / (tp + fp + fn)[has]).tolist())
        return cls(int(tn.sum()), int(fp.sum()), int(fn.sum()), int(tp.sum()), iou_sum,
                   int(has.sum()), int(tp.size))

    def metrics(self, errors: int = 0, skipped: int = 0) -> dict:
        """Every metrics.json key."""
        out = scores(np.array([[self.tn, self.fp], [self.fn, self.tp]], dtype=np.int64))
        if not self.images:
            out.update({key: None for key in RATIO_KEYS})
        out["n_iou_per_image"] = self.iou_sum / self.with_nodule if self.with_nodule else None
        out["images"] = self.images
        out["errors"] = int(errors)
        out["skipped"] = int(skipped)  # inputs that are not images (DICOM reports, plans...)
        return out


def summarize(tp, fp, fn, tn, errors: int = 0, skipped: int = 0) -> dict:
    """Per-image count arrays -> every metrics.json key (pooled, plus per-image mean IoU)."""
    return Totals.from_arrays(tp, fp, fn, tn).metrics(errors, skipped)


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
        "dice": image_dice(tp, fp, fn),
        "n_iou_per_image": None,
        "images": None,
        "errors": 0,
        "hist": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


# the paper's table (its F1 is the mean over both classes), then the nodule's Dice and the
# per-image IoU the challenges rank by: (heading, metrics key)
TABLE_COLUMNS = [("b_IoU", "b_iou"), ("n_IoU", "n_iou"), ("mIoU", "miou"), ("PA", "pa"),
                 ("Precision", "precision"), ("Recall", "recall"), ("F1", "f1_macro"),
                 ("Dice", "dice"), ("n_IoU/img", "n_iou_per_image")]


def table(metrics: dict, title: str = "") -> str:
    """The paper's results table, plus the per-image IoU the challenges rank by."""
    columns = TABLE_COLUMNS
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
