"""Pictures a person checks: overlay rows (image | label | prediction, as in the paper's figure 3)
and training curves. Drawn with OpenCV, so no plotting library is needed on a cluster image."""
from __future__ import annotations

import cv2
import numpy as np

GREEN = (80, 220, 80)  # label outline
RED = (60, 60, 240)  # prediction outline
TILE = 256


def _tile(gray: np.ndarray, outline: np.ndarray | None, colour, title: str) -> np.ndarray:
    scale = TILE / max(gray.shape)
    size = (max(1, int(gray.shape[1] * scale)), max(1, int(gray.shape[0] * scale)))
    canvas = np.zeros((TILE, TILE, 3), np.uint8)
    small = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    canvas[:size[1], :size[0]] = small[:, :, None]
    if outline is not None:
        mask = cv2.resize(outline.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas[:size[1], :size[0]], contours, -1, colour, 2)
    cv2.putText(canvas, title, (6, TILE - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1,
                cv2.LINE_AA)
    return canvas


def overlays(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> bytes:
    """rows of (key, image shown to the model, label mask, predicted mask) -> PNG bytes.

    The image is the prepared (desensitized) one: burned-in text never reaches a report.
    """
    lines = []
    for key, image, label, pred in rows:
        inter = np.logical_and(label, pred).sum()
        union = np.logical_or(label, pred).sum()
        iou = inter / union if union else 1.0
        lines.append(np.hstack([_tile(image, None, None, key),
                                _tile(image, label, GREEN, "label"),
                                _tile(image, pred, RED, f"prediction IoU {iou:.2f}")]))
    ok, buf = cv2.imencode(".png", np.vstack(lines))
    return buf.tobytes()


def curves(history: list[dict], keys=("train_loss", "val_n_iou", "val_n_iou_per_image")) -> bytes:
    """Per-epoch lines, each scaled to its own range, with the range written beside its name."""
    width, height, pad = 720, 360, 40
    canvas = np.full((height, width, 3), 255, np.uint8)
    colours = [(200, 60, 40), (40, 140, 40), (40, 40, 200), (150, 80, 150)]
    epochs = [row["epoch"] for row in history]
    if not epochs:
        ok, buf = cv2.imencode(".png", canvas)
        return buf.tobytes()
    x_of = lambda e: pad + (e - min(epochs)) / max(1, max(epochs) - min(epochs)) * (width - 2 * pad)
    cv2.rectangle(canvas, (pad, pad), (width - pad, height - pad), (180, 180, 180), 1)
    for n, key in enumerate(keys):
        values = [row.get(key) for row in history]
        points = [(e, v) for e, v in zip(epochs, values) if isinstance(v, (int, float))]
        if not points:
            continue
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        span = (hi - lo) or 1.0
        xy = np.array([[x_of(e), height - pad - (v - lo) / span * (height - 2 * pad)]
                       for e, v in points], np.int32)
        cv2.polylines(canvas, [xy.reshape(-1, 1, 2)], False, colours[n % 4], 2, cv2.LINE_AA)
        cv2.putText(canvas, f"{key} [{lo:.3f} .. {hi:.3f}]", (pad + 5, pad + 18 + 18 * n),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5, colours[n % 4], 1, cv2.LINE_AA)
    cv2.putText(canvas, f"epoch {min(epochs)} .. {max(epochs)}", (width // 2 - 60, height - 12),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (60, 60, 60), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", canvas)
    return buf.tobytes()
