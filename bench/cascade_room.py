"""How much could a two-stage cascade add on a dataset? Measured from its labels alone.

A cascade's second stage segments the square around the first stage's nodule, widened by a
margin, at its own input size; what it can add over one whole-frame model is resolution: the
nodule drawn over more of the model's pixels. For every labelled frame this takes the square
around the labelled nodule (the best case: a perfect first stage) and compares the second
stage's pixels per frame pixel with the first stage's (its input size over the scan region's
larger side, as `imaging.prepare` crops it). Pooled n_IoU weighs each frame by its nodule's
pixels, so the table also gives the share of all nodule pixels in frames that would gain.

    python bench/cascade_room.py IMAGES MASKS [--size 256] [--margin 0.25] [--record]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raythyroid import imaging  # noqa: E402
from raythyroid.imaging import PrepConfig  # noqa: E402

GAINS = (1.25, 1.5, 2.0)
SECOND_STAGE_SIZES = (256, 384, 512)


def frame_room(image: np.ndarray, mask: np.ndarray, size: int, margin: float
               ) -> tuple[float, float, float, int]:
    """(the nodule's larger side and the square's, each over the scan region's larger side,
    the second stage's resolution over the first's at `size` px, nodule pixels)."""
    _, region = imaging.prepare(image, PrepConfig(size=size))
    rows, cols = np.nonzero(mask)
    nodule_side = max(np.ptp(rows), np.ptp(cols)) + 1
    square = min(math.ceil(nodule_side * (1 + 2 * margin)), max(region.w, region.h))
    region_side = max(region.w, region.h)
    return (nodule_side / region_side, square / region_side, region_side / square,
            int(mask.sum()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images")
    parser.add_argument("masks")
    parser.add_argument("--size", type=int, default=256, help="the first stage's input side")
    parser.add_argument("--margin", type=float, default=0.25,
                        help="share of the nodule's larger side added on each side")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    args = parser.parse_args()

    found = []
    for path in sorted(Path(args.images).iterdir()):
        mask_path = Path(args.masks) / f"{path.stem}.png"
        if not mask_path.exists():
            continue
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) > 0
        if mask.any():
            found.append(frame_room(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), mask,
                                    args.size, args.margin))
    nodule, square, gain, pixels = (np.array(column, float) for column in zip(*found))
    nodule_q, square_q = np.percentile(nodule, [25, 50, 75]), np.percentile(square, [25, 50, 75])
    lines = [f"{len(found)} frames with a nodule; over the scan region's larger side, the "
             f"nodule's larger side: quartiles {', '.join(f'{q:.2f}' for q in nodule_q)}; the "
             f"square around it with the margin: {', '.join(f'{q:.2f}' for q in square_q)}", "",
             "| second stage input | median resolution over the first stage | "
             + " | ".join(f"nodule pixels in frames gaining >= {g}x" for g in GAINS) + " |",
             "|---|---|" + "---|" * len(GAINS)]
    for second in SECOND_STAGE_SIZES:
        relative = gain * second / args.size
        lines.append(f"| {second} px | {np.median(relative):.2f}x | " + " | ".join(
            f"{pixels[relative >= g].sum() / pixels.sum():.0%}" for g in GAINS) + " |")
    print("\n".join(lines))
    if args.record:
        from common import record

        record("cascade: the room a second stage has on DDTI", lines, [
            f"first stage: {args.size} px over the scan region (the bundled model); second "
            f"stage: the square around the labelled nodule widened by {args.margin} of its "
            f"larger side on each side, cut to the scan region (a perfect first stage)"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
