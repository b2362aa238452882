"""Probability map -> clean nodule mask -> the numbers a radiologist reads off it.

Threshold, drop components too small to be a nodule, fill holes; then area (px and mm^2 where
the pixel spacing is known), bounding box, aspect ratio (height / width: > 1 is the TI-RADS
"taller-than-wide" sign) and a confidence (what orders the report's review queue).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class PostConfig:
    threshold: float = 0.5
    min_area_fraction: float = 0.0005  # of the frame: a 560x360 frame drops blobs under ~100 px
    fill_holes: bool = True
    keep_largest: int = 0  # keep only the N largest components (0: keep all)

    def to_dict(self) -> dict:
        return asdict(self)


def clean_mask(prob: np.ndarray, config: PostConfig = PostConfig()) -> np.ndarray:
    """(H, W) float probability -> bool mask."""
    binary = (prob >= config.threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    min_area = max(1, int(config.min_area_fraction * prob.size))
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = [i + 1 for i, area in enumerate(areas) if area >= min_area]
    if config.keep_largest:
        keep = sorted(keep, key=lambda i: -stats[i, cv2.CC_STAT_AREA])[: config.keep_largest]
    mask = np.isin(labels, keep) if keep else np.zeros(prob.shape, bool)
    if config.fill_holes and mask.any():
        mask = fill_holes(mask)
    return mask


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background not reachable from the frame border is a hole in a nodule."""
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, np.zeros((flood.shape[0] + 2, flood.shape[1] + 2), np.uint8), (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return mask | holes


def describe(mask: np.ndarray, prob: np.ndarray, spacing_mm: tuple[float, float] | None,
             threshold: float = 0.5) -> dict:
    """Results-table columns for one frame's mask (`threshold`: the one that drew it)."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    area = int(mask.sum())
    row = {"nodule": area > 0, "n_components": int(count - 1), "area_px": area,
           "area_mm2": None, "bbox_x": None, "bbox_y": None, "bbox_w": None, "bbox_h": None,
           "aspect_ratio": None}
    if area:
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        w, h = int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1
        row.update(bbox_x=x0, bbox_y=y0, bbox_w=w, bbox_h=h)
        if spacing_mm:
            row["area_mm2"] = float(area * spacing_mm[0] * spacing_mm[1])
            row["aspect_ratio"] = float((h * spacing_mm[0]) / (w * spacing_mm[1]))
        else:
            row["aspect_ratio"] = float(h / w)
    row["confidence"] = confidence(mask, prob, threshold)
    return row


def confidence(mask: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> float:
    """The IoU the model expects its mask to have, were the truth drawn from its own
    probabilities: the soft IoU of the mask with the probability map, counting probabilities
    from half the threshold up (below that is background noise, whose sum over a large frame
    would weigh the frame's size in). Fuzzy edges, probability left outside the mask and a
    second candidate region lower it; the mean probability inside the mask (the score before)
    sees none of these and ordered a review queue worse on DDTI's held-out folds
    (bench/confidence_bench.py). With no mask: how far below the threshold the strongest
    evidence stayed (a near miss is as unsure as it gets, a clean frame scores near 1)."""
    if not prob.size:
        return 1.0
    if not mask.any():
        return float(max(0.0, 1.0 - float(prob.max()) / threshold))
    counted = np.where(prob >= threshold / 2, prob, 0.0)
    inside = float(counted[mask].sum(dtype=np.float64))
    return inside / (float(counted.sum(dtype=np.float64)) + int(mask.sum()) - inside)
