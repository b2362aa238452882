"""What TTA is worth to a fold's models, out of fold: every model of FOLDS (a cv RUN, a
`distill --folds` RUN, or a model cv built) segments its own held-out frames with no TTA, with
flip TTA, and with flip + the zoomed-out view, each frame in its own geometry with the model's
threshold and components; the folds' frames pooled. With --against (the teacher of a distill
RUN), its fold models the same way on the same frames, side by side: what a student with TTA
costs and gains against its teachers. The passes a frame: 1, 2 and 4.

    python bench/tta_bench.py FOLDS PREPARED [--against MODEL] [--zoom 0.8] [--record]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import held_out_by_fold, portable, record, views  # noqa: E402

from raythyroid import imaging, metrics, postprocess  # noqa: E402

VARIANTS = (("none", 1), ("flip", 2), ("flip + zoom", 4))


def fold_totals(source: str, prepared: str, zoom: float) -> tuple[list[dict], list[int], int]:
    """Per fold, {variant: metrics.Totals} over its held-out frames; the frames per fold; the
    seed that dealt the folds."""
    found, frames = [], []
    seed, folds = held_out_by_fold(source, prepared)
    for fold, (net, info, held) in enumerate(folds):
        images = np.stack([imaging.decode_png(r["image"]) for r in held])
        found_views = views(net, images, zoom)  # (3, N, H, W): frame, mirror, zoomed out
        probs = {"none": found_views[0], "flip": found_views[:2].mean(0),
                 "flip + zoom": (found_views[:2].mean(0) + found_views[2]) / 2}
        totals = {name: metrics.Totals() for name in probs}
        for i, r in enumerate(held):
            geometry = imaging.Geometry.from_dict(r["geometry"])
            label = imaging.decode_png(r["full_mask"]) > 0
            for name, prob in probs.items():
                restored = geometry.restore(prob[i].astype(np.float16))  # as infer keeps it
                totals[name].add(label, postprocess.clean_mask(restored, info.inference.post))
        found.append(totals)
        frames.append(len(held))
        print(f"{source}: fold {fold}, {len(held)} held-out frames", file=sys.stderr)
    return found, frames, seed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folds", help="a cv or distill --folds RUN, or a model cv built")
    parser.add_argument("prepared")
    parser.add_argument("--against", help="the teacher's folds (ddti), scored the same way")
    parser.add_argument("--zoom", type=float, default=0.8, help="the zoomed-out view's scale")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    args = parser.parse_args()

    sets = {portable(args.folds): fold_totals(args.folds, args.prepared, args.zoom)}
    if args.against:
        sets[portable(args.against)] = fold_totals(args.against, args.prepared, args.zoom)
    if len({(tuple(frames), seed) for _, frames, seed in sets.values()}) > 1:
        raise SystemExit("tta_bench: the two dealt other folds (seed or frames per fold): "
                         "side by side they would score other frames")
    frames = next(iter(sets.values()))[1]
    lines = ["| fold | frames | " + " | ".join(
        f"{name}, TTA {variant} ({passes} pass{'es' if passes > 1 else ''})"
        for name in sets for variant, passes in VARIANTS) + " |",
        "| ---: | ---: | " + " | ".join("---:" for _ in sets for _ in VARIANTS) + " |"]
    for fold, count in enumerate(frames):
        lines.append(f"| {fold} | {count} | " + " | ".join(
            f"{totals[fold][variant].metrics()['n_iou']:.4f}"
            for totals, _, _ in sets.values() for variant, _ in VARIANTS) + " |")
    pooled = []
    for totals, _, _ in sets.values():
        for variant, _ in VARIANTS:
            whole = sum((fold[variant] for fold in totals), metrics.Totals())
            pooled.append(f"{whole.metrics()['n_iou']:.4f}")
    lines.append(f"| pooled | {sum(frames)} | " + " | ".join(pooled) + " |")
    print("\n".join(lines))
    if args.record:
        record("TTA out of fold: " + " against ".join(sets), lines,
               ["pooled n_IoU of each fold model's own held-out frames, in their original "
                "geometry, the model's threshold and components; the zoomed-out view at "
                f"{args.zoom:g} averaged equally with the flip pair, as infer does"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
