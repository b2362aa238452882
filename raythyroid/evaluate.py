"""Masks against labels: labels by key, per-image counts, scoring a whole mask folder.

Infer scores each frame it segments with `label_counts`; `raythyroid evaluate` scores any mask
folder with `evaluate_folders`; both with the same counting code as training's validation
(metrics.Totals).
"""
from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import imaging, metrics, storage
from .errors import UserError
from .pixels import DEFAULT_MAX_PIXELS, DecodeError

LABEL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
READ_THREADS = 8


def index_labels(labels_uri: str) -> dict[str, str]:
    root = storage.normalize(labels_uri)
    return {storage.safe_key(posixpath.splitext(storage.relative(u, root))[0]): u
            for page in storage.list_pages(root, LABEL_SUFFIXES) for u in page}


def read_label(label_uri: str, shape: tuple[int, ...], max_pixels: int) -> np.ndarray:
    """A label mask (bool) that must match the predicted mask's frame size."""
    label = imaging.decode_mask(storage.read_bytes(label_uri), max_pixels)
    if label.shape != shape:
        raise DecodeError(f"label is {label.shape[1]}x{label.shape[0]}, "
                          f"image is {shape[1]}x{shape[0]}")
    return label > 0


def label_counts(label: np.ndarray, mask: np.ndarray) -> dict:
    """tp, fp, fn, tn, iou and dice of one mask against its label."""
    counts = metrics.counts(label, mask)
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    counts["iou"] = metrics.image_iou(tp, fp, fn)
    counts["dice"] = metrics.image_dice(tp, fp, fn)
    return counts


def evaluate_folders(pred_uri: str, labels_uri: str, max_pixels: int = DEFAULT_MAX_PIXELS
                     ) -> tuple[dict, list[dict]]:
    """Two mask folders matched by key -> (metrics, per-image rows). Predictions without a
    label, labels without a prediction and size mismatches are counted as errors."""
    preds = index_labels(pred_uri)
    labels = index_labels(labels_uri)
    if not preds:
        raise UserError(f"no mask images under {pred_uri}")

    def score(key):
        try:
            if key not in labels:
                raise DecodeError("no label for this prediction")
            pred = imaging.decode_mask(storage.read_bytes(preds[key]), max_pixels)
            counts = label_counts(read_label(labels[key], pred.shape, max_pixels),
                                  pred)
            return dict(counts, key=key, status="ok", error=None)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, DecodeError) else storage.describe_error(exc)
            return {"key": key, "status": "error", "error": reason}

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        rows = list(pool.map(score, sorted(preds)))
    rows += [{"key": k, "status": "error", "error": "no prediction for this label"}
             for k in sorted(set(labels) - set(preds))]
    ok = [r for r in rows if r["status"] == "ok"]
    result = metrics.summarize([r["tp"] for r in ok], [r["fp"] for r in ok],
                               [r["fn"] for r in ok], [r["tn"] for r in ok],
                               errors=len(rows) - len(ok))
    return result, rows


def score_prepared(net, inference, images: np.ndarray, labels: list[np.ndarray],
                   geometries: list, bf16: bool = False, batch_size: int = 16
                   ) -> list[dict[str, int]]:
    """Prepared frames -> one model's confusion counts per frame against its original-size
    label, each frame as infer segments it: the model applied with the inference it chose
    (`model.Inference`) in batches of one shape (short ones padded), each probability map
    taken back to its frame (float16, as infer keeps it) and cleaned as infer cleans it."""
    import torch

    from . import model as model_lib, postprocess

    counted = []
    for start in range(0, len(images), batch_size):
        part = images[start:start + batch_size]
        padded = np.zeros((batch_size,) + images.shape[1:], images.dtype)
        padded[:len(part)] = part
        with torch.no_grad():
            prob = model_lib.nodule_probability(
                net, torch.from_numpy(padded), torch.device("cpu"), bf16,
                flip_tta=inference.tta, zoom=inference.tta_zoom).numpy()[:len(part)]
        for p, label, geometry in zip(prob, labels[start:], geometries[start:]):
            mask = postprocess.clean_mask(geometry.restore_as_infer_keeps(p), inference.post)
            counted.append(metrics.counts(label, mask))
    return counted
