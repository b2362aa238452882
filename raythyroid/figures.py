"""Pictures a person checks, drawn from arrays: overlay rows (image | label | prediction, as in the
paper's figure 3) and review thumbnails with OpenCV; training curves and the distributions of a
run's findings with matplotlib (its figure API on the Agg canvas: no display, no global state)."""
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


def curves(history: list[dict], best_epoch: int | None = None) -> bytes:
    """Training curves as PNG: loss on one axis, validation IoU on another, epochs on x, the
    best epoch (by validation n_IoU unless given) marked."""
    import io

    # the figure API with the Agg canvas: no pyplot global state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [row for row in history if isinstance(row.get("epoch"), (int, float))
            and "train_loss" in row]
    figure = Figure(figsize=(10, 6.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axis, iou_axis = figure.subplots(2, 1, sharex=True)
    epochs = [row["epoch"] for row in rows]
    if best_epoch is None:
        scored = [row for row in rows if isinstance(row.get("val_n_iou"), (int, float))]
        best_epoch = max(scored, key=lambda r: r["val_n_iou"])["epoch"] if scored else None
    loss_axis.plot(epochs, [row["train_loss"] for row in rows], marker=".", color="tab:red",
                   label="training loss")
    loss_axis.set_ylabel("loss")
    for key, label, colour in (("val_n_iou", "validation n_IoU (pooled)", "tab:green"),
                               ("val_n_iou_per_image", "validation n_IoU per image",
                                "tab:blue")):
        points = [(row["epoch"], row[key]) for row in rows
                  if isinstance(row.get(key), (int, float))]
        if points:
            iou_axis.plot(*zip(*points), marker=".", color=colour, label=label)
    iou_axis.set_ylabel("IoU")
    iou_axis.set_ylim(0, 1)  # the same scale for every run, so two runs' curves compare
    iou_axis.set_xlabel("epoch")
    iou_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if best_epoch is not None:
        for axis in (loss_axis, iou_axis):
            axis.axvline(best_epoch, color="0.4", linestyle="--", linewidth=1,
                         label=f"best epoch ({best_epoch})" if axis is iou_axis else None)
    for axis in (loss_axis, iou_axis):
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            # beside the plot area, so the legend never hides a line
            axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                        fontsize="small")
    loss_axis.set_title("training")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# ---------------------------------------------------------------- review overlays

THUMB = 160  # px: a review queue of 24 is a page of small pictures, not an archive copy


def thumbnail(image: np.ndarray, prediction: np.ndarray, label: np.ndarray | None = None
              ) -> bytes:
    """The frame the model saw (desensitized, cropped, equalised: no burned-in text) with the
    predicted outline in red and, when labelled, the label's in green, as a small JPEG."""
    small = cv2.resize(image, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    canvas = cv2.cvtColor(small, cv2.COLOR_GRAY2BGR)
    for outline, colour in ((label, GREEN), (prediction, RED)):
        if outline is None:
            continue
        resized = cv2.resize(outline.astype(np.uint8), (THUMB, THUMB),
                             interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(resized, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, colour, 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 88])
    return buf.tobytes()


# ---------------------------------------------------------------- a run's findings

def _figure(rows: int, columns: int, size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns, squeeze=False)


def _png(figure) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _histogram(axis, values: np.ndarray, title: str, xlabel: str, bins=40) -> None:
    values = values[np.isfinite(values)]
    if len(values):
        axis.hist(values, bins=bins, color="tab:blue", alpha=0.85)
    else:
        axis.text(0.5, 0.5, "no frame", ha="center", va="center", transform=axis.transAxes)
    axis.set_title(f"{title} ({len(values):,} frames)", fontsize="medium")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("frames")
    axis.grid(True, alpha=0.3)


def distributions(area: np.ndarray, area_unit: str, aspect: np.ndarray, confidence: np.ndarray,
                  components: np.ndarray) -> bytes:
    """Four panels of a run's findings: nodule area, aspect ratio (the taller-than-wide line at
    1 marked), confidence and components per frame."""
    figure, axes = _figure(2, 2, (11, 7.5))
    _histogram(axes[0][0], area, "nodule area", area_unit)
    _histogram(axes[0][1], aspect, "aspect ratio (height / width)", "height / width")
    axes[0][1].axvline(1.0, color="tab:red", linestyle="--", linewidth=1.2,
                       label="1: taller than wide beyond it")
    axes[0][1].legend(loc="upper right", frameon=False, fontsize="small")
    _histogram(axes[1][0], confidence, "confidence", "confidence", bins=np.linspace(0, 1, 41))
    counts = np.bincount(np.clip(components.astype(np.int64), 0, 5), minlength=6)
    axes[1][1].bar([str(i) for i in range(5)] + ["5+"], counts, color="tab:blue", alpha=0.85)
    axes[1][1].set_title(f"components per frame ({int(counts.sum()):,} frames)",
                         fontsize="medium")
    axes[1][1].set_xlabel("nodule components in the mask")
    axes[1][1].set_ylabel("frames")
    axes[1][1].grid(True, alpha=0.3, axis="y")
    return _png(figure)


def iou_histogram(iou: np.ndarray, failure_below: float) -> bytes:
    """Per-image IoU against the labels, the failure line marked."""
    figure, axes = _figure(1, 1, (8, 3.8))
    _histogram(axes[0][0], iou, "IoU per labelled frame", "IoU", bins=np.linspace(0, 1, 41))
    axes[0][0].axvline(failure_below, color="tab:red", linestyle="--", linewidth=1.2,
                       label=f"failure: IoU < {failure_below}")
    axes[0][0].legend(loc="upper left", frameon=False, fontsize="small")
    return _png(figure)


def fold_curves(histories: dict[str, list[dict]]) -> bytes:
    """Validation n_IoU by epoch, one line per fold: where folds agree and where one strays."""
    figure, axes = _figure(1, 1, (10, 4.5))
    axis = axes[0][0]
    for name, rows in histories.items():
        points = [(r["epoch"], r["val_n_iou"]) for r in rows
                  if isinstance(r.get("val_n_iou"), (int, float))]
        if points:
            axis.plot(*zip(*points), marker=".", label=name)
    axis.set_ylim(0, 1)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation n_IoU (pooled)")
    axis.grid(True, alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                    fontsize="small")
    return _png(figure)
