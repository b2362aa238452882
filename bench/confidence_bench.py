"""How well does `confidence` order a review queue? Measured where the answer is known.

Out of fold: every fold model of a `raythyroid cv` RUN segments its own held-out cases (the
frames no model of that fold saw), in original geometry with the fold's chosen inference; the
test split: the shipped ensemble segments frames no fold saw. For every frame, each candidate
score is computed from what infer has in hand (the probability map and the mask) and
compared with the frame's IoU: Spearman correlation, and the share of the failures (IoU < 0.5)
that the least confident quarter holds.

    python bench/confidence_bench.py CV_RUN PREPARED [--model MODEL] [--record]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from raythyroid import imaging, metrics, model, postprocess, shards, split, storage  # noqa: E402
from raythyroid.imaging import Geometry  # noqa: E402

FAILURE_IOU = 0.5


def probabilities(net, images: np.ndarray, tta: bool) -> np.ndarray:
    """(N, H, W) nodule probabilities as infer computes them (an ensemble's mean, flip TTA)."""
    import torch

    with torch.no_grad():
        return model.nodule_probability(net, torch.from_numpy(images), torch.device("cpu"),
                                        flip_tta=tta).numpy()


def frame_record(prob: np.ndarray, row: dict, post: postprocess.PostConfig,
                 member_probs: np.ndarray | None = None) -> dict:
    """One frame's IoU and every candidate score, in original geometry as infer has them;
    with an ensemble's per-member probabilities also how far its members' masks agree."""
    geometry = Geometry.from_dict(row["geometry"])
    prob = geometry.restore(prob.astype(np.float16))  # infer keeps float16
    mask = postprocess.clean_mask(prob, post)
    label = imaging.decode_png(row["full_mask"]) > 0
    counts = metrics.counts(label, mask)
    scores = {name: score(mask, prob, post.threshold) for name, score in CANDIDATES.items()}
    if member_probs is not None:
        members = [postprocess.clean_mask(geometry.restore(p.astype(np.float16)), post)
                   for p in member_probs]
        scores[MEMBER_AGREEMENT] = float(np.mean([
            _mask_iou(a, b) for i, a in enumerate(members) for b in members[i + 1:]]))
    return {"key": row["key"],
            "iou": metrics.image_iou(counts["tp"], counts["fp"], counts["fn"]),
            "scores": scores}


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    pair = metrics.counts(a, b)
    return metrics.image_iou(pair["tp"], pair["fp"], pair["fn"])


def _mean_inside(mask: np.ndarray, prob: np.ndarray, threshold: float) -> float:
    """The score before: mean probability inside the mask (1 - max without one)."""
    return float(prob[mask].mean()) if mask.any() else float(1.0 - prob.max())


CANDIDATES = {"mean probability inside the mask (before)": _mean_inside,
              "soft IoU of mask and probabilities (now)": postprocess.confidence}
# only where an ensemble's members segment frames none of them trained on: the test split
MEMBER_AGREEMENT = "mean IoU between the members' masks"


def spearman(a, b) -> float:
    def ranks(values):
        values = np.asarray(values, float)
        order = np.argsort(values, kind="stable")
        out = np.empty(len(values))
        out[order] = np.arange(len(values))
        for v in np.unique(values):  # ties share their mean rank
            same = values == v
            out[same] = out[same].mean()
        return out

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def evaluate_scores(records: list[dict]) -> list[tuple[str, float, int, int, int]]:
    """(name, Spearman with IoU, failures in the least confident quarter, failures, the most
    the quarter can hold)."""
    iou = np.array([r["iou"] for r in records])
    failures = iou < FAILURE_IOU
    quarter = max(1, int(round(len(records) / 4)))
    out = []
    for name in records[0]["scores"]:
        values = np.array([r["scores"][name] for r in records])
        order = np.argsort(values, kind="stable")  # least confident first
        out.append((name, spearman(values, iou), int(failures[order[:quarter]].sum()),
                    int(failures.sum()), min(quarter, int(failures.sum()))))
    return out


def out_of_fold(cv_run: str, prepared: str, limit: int | None) -> list[dict]:
    import json

    manifest = shards.read_manifest(prepared)
    rows = shards.read_rows(prepared, manifest, ["train", "val"])
    folds_meta = json.loads(storage.read_text(storage.join(cv_run, "cv.json")))
    k = len(folds_meta["folds"])
    seed = folds_meta.get("config", {}).get("seed", 0)
    case_fold = split.folds((r["case_id"] for r in rows), k, seed)
    records = []
    for fold in range(k):
        net, meta = model.load(storage.join(cv_run, f"fold-{fold}", "model"))
        held = [r for r in rows if case_fold[r["case_id"]] == fold][:limit]
        post = postprocess.PostConfig.from_model(meta)
        images = np.stack([imaging.decode_png(r["image"]) for r in held])
        prob = probabilities(net, images, bool(meta.get("tta")))
        records += [frame_record(p, r, post) for p, r in zip(prob, held)]
        print(f"fold {fold}: {len(held)} held-out frames", file=sys.stderr)
    return records


def test_split(model_uri: str, prepared: str) -> list[dict]:
    manifest = shards.read_manifest(prepared)
    rows = shards.read_rows(prepared, manifest, "test")
    net, meta = model.load(model.resolve(model_uri))
    post = postprocess.PostConfig.from_model(meta)
    images = np.stack([imaging.decode_png(r["image"]) for r in rows])
    tta = bool(meta.get("tta"))
    if not isinstance(net, model.Ensemble):
        return [frame_record(p, r, post) for p, r in zip(probabilities(net, images, tta), rows)]
    # the members one by one: their mean is exactly what the ensemble computes
    members = np.stack([probabilities(m, images, tta) for m in net.members], axis=1)
    return [frame_record(p.mean(0), r, post, p) for p, r in zip(members, rows)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cv_run")
    parser.add_argument("prepared")
    parser.add_argument("--model", default="ddti", help="the ensemble scored on the test split")
    parser.add_argument("--limit", type=int, help="held-out frames per fold (a quick look)")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    args = parser.parse_args()

    found = {"cross-validation, out of fold": out_of_fold(args.cv_run, args.prepared, args.limit),
             "test split, the ensemble": test_split(args.model, args.prepared)}
    lines = ["| frames | score | Spearman with IoU | failures in the least confident quarter "
             "| the most it could hold |", "|---|---|---|---|---|"]
    for where, records in found.items():
        for name, rho, caught, failures, ceiling in evaluate_scores(records):
            lines.append(f"| {where} ({len(records)}) | {name} | {rho:.2f} | "
                         f"{caught} of {failures} ({caught / max(failures, 1):.0%}) | "
                         f"{ceiling} ({ceiling / max(failures, 1):.0%}) |")
    print("\n".join(lines))
    if args.record:
        from common import record

        record("Review-queue confidence on DDTI", lines,
               [f"a failure is a frame with IoU < {FAILURE_IOU}; the least confident quarter is "
                "the first quarter of the review queue; it cannot hold more failures than it "
                "has frames, hence the last column"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
