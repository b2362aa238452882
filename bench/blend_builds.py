"""Two builds' fold models averaged, scored out of fold: what would one ensemble of both builds
add over either build's own?

Both builds dealt the same cases into the same folds (the same seed, read from each; the
held-out counts are checked too). Fold k of each build held out the same frames, so averaging
the two fold-k models' probabilities gives, for every held-out frame, a two-model ensemble
none of whose members saw it. Every model gets the first build's ensemble inference (its TTA,
zoomed-out view, threshold and components kept), so only the weights differ.

What it measures is one model against two on each frame. A shipped build serves five members
and the blend ten, and averaging gains less the more members there already are: the gain here
is an upper bound on the blend's. Averaging any two models gains something, so a second build
of the same recipe (another seed) is the control that tells a recipe's gain from averaging's.
Also the review queue ordered by the two models' agreement, which one build's folds cannot give
(each of its members but one trained on the frame).

Each build is a model cv built (`ddti`), a `raythyroid cv` RUN, or the cv RUN of a
`bench/ship_ddti.sh` WORKDIR that is still running: the folds both builds have finished are
scored.

    python bench/blend_builds.py FIRST SECOND PREPARED [--names A B] [--record]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confidence_bench import (FAILURE_IOU, MEMBER_AGREEMENT, evaluate_scores,  # noqa: E402
                              fold_models, frame_record, pooled, views)

from raythyroid import imaging, metrics, model, postprocess, shards, split, storage  # noqa: E402


BOTH = "both"


def inference_of(source: str) -> dict:
    """The model.json whose inference every model gets: the ensemble's (a cv RUN's own model,
    or a model cv built), not a fold's (chosen on that fold's held-out frames)."""
    import json

    folder = (storage.join(source, "model") if storage.exists(storage.join(source, "cv.json"))
              else model.resolve(source))
    return json.loads(storage.read_text(storage.join(folder, model.MODEL_JSON)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", help="a model cv built (ddti) or a cv RUN")
    parser.add_argument("second", help="the same, or a cv RUN still running")
    parser.add_argument("prepared", help="the prepared DDTI shards both builds used")
    parser.add_argument("--names", nargs=2, default=["first", "second"])
    parser.add_argument("--limit", type=int, help="held-out frames per fold (a quick look)")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    args = parser.parse_args()
    if len({*args.names, BOTH}) != 3:
        parser.error(f"--names: two different names, neither {BOTH!r}")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit: at least 1")

    seed, k, first, first_held = fold_models(args.first)
    if k is None:
        raise SystemExit(f"blend_builds: {args.first} is a cv still running; give it second")
    second_seed, second_k, second, second_held = fold_models(args.second)
    if second_seed != seed or second_k not in (None, k) or max(second) >= k:
        raise SystemExit(f"blend_builds: {args.first} dealt {k} folds with seed {seed}, "
                         f"{args.second} {second_k or 'at least ' + str(max(second) + 1)} with "
                         f"seed {second_seed}: their folds hold other frames")
    common = sorted(set(first) & set(second))
    rows = shards.read_rows(args.prepared, shards.read_manifest(args.prepared), ["train", "val"])
    case_fold = split.folds((r["case_id"] for r in rows), k, seed)
    meta = inference_of(args.first)
    post = postprocess.PostConfig.from_model(meta)
    tta, zoom = bool(meta.get("tta")), model.tta_zoom(meta)
    found = {name: [] for name in (*args.names, BOTH)}
    for fold in common:
        held = [r for r in rows if case_fold[r["case_id"]] == fold]
        if {first_held[fold], second_held[fold]} - {None, len(held)}:
            raise SystemExit(f"blend_builds: {args.prepared} deals fold {fold} {len(held)} "
                             f"frames where the builds held out {first_held[fold]} and "
                             f"{second_held[fold]}: not the folds they were trained on")
        held = held[:args.limit]
        images = np.stack([imaging.decode_png(r["image"]) for r in held])
        pair = np.stack([views(first[fold][0], images, zoom), views(second[fold][0], images, zoom)])
        for i, row in enumerate(held):
            for name, member in zip(args.names, pair[:, :, i]):
                found[name].append(frame_record(member, row, images[i], post, tta, None))
            found[BOTH].append(frame_record(pair[:, :, i].mean(0), row, images[i], post, tta,
                                              None, pair[:, :, i]))
        print(f"fold {fold}: {len(held)} held-out frames", file=sys.stderr)

    frames = len(found[BOTH])
    lines = [f"| models | pooled n_IoU | n_IoU/img | Dice/img | failures (IoU < {FAILURE_IOU}) |",
             "|---|---|---|---|---|"]
    for name, records in found.items():
        whole = pooled(records)
        dice = np.mean([metrics.image_dice(r["counts"]["tp"], r["counts"]["fp"],
                                           r["counts"]["fn"]) for r in records])
        failures = sum(r["iou"] < FAILURE_IOU for r in records)
        label = "both: the two fold models averaged" if name == BOTH else f"{name} alone"
        lines.append(f"| {label} | {whole['n_iou']:.4f} | {whole['n_iou_per_image'] or 0:.4f} | "
                     f"{dice:.4f} | {failures} |")
    lines += ["", "| both builds' queue, ordered by | Spearman with IoU | failures in the least "
              "confident quarter |", "|---|---|---|"]
    for name, rho, caught, failures, _ in evaluate_scores(found[BOTH]):
        if name == MEMBER_AGREEMENT or "(now)" in name:
            lines.append(f"| {name} | {rho:.2f} | {caught} of {failures} "
                         f"({caught / max(failures, 1):.0%}) |")
    print("\n".join(lines))
    if args.record:
        from common import record

        record(f"bundled DDTI model: {args.names[0]} and {args.names[1]} averaged, out of fold",
               lines, [f"folds {', '.join(map(str, common))}: {frames} held-out frames, each "
                       f"segmented by fold models that never saw it (one against two: an upper "
                       f"bound on what ten members add over five); every model with "
                       f"{args.names[0]}'s inference ({model.describe_tta(tta, zoom)}, "
                       f"threshold {post.threshold}, keep {post.keep_largest or 'all'}), "
                       f"in original geometry, fp32"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
