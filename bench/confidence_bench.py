"""How well does `confidence` order a review queue? Measured where the answer is known.

Out of fold: every fold model of a `raythyroid cv` RUN segments its own held-out cases (the
frames no model of that fold saw), in original geometry with the fold's chosen inference (from
a bundled model, the ensemble's: see FOLDS below); the
test split: the shipped ensemble segments frames no fold saw. For every frame, each candidate
score is computed from what infer has in hand (the probability map and the mask) and
compared with the frame's IoU: Spearman correlation, and the share of the failures (IoU < 0.5)
that the least confident quarter holds. The candidates: the scores infer has had, the flip TTA
views' agreement, the agreement of the masks made from brighter, darker and smaller copies of
the frame, the ensemble members' agreement (test split only), and a logistic regression over
the out-of-fold scores and the mask's shape, fit on the other folds (the tuning the folds
allow; for the test split, fit on every out-of-fold frame). Two scores look at the frame
itself rather than the model: whether the outline runs along edges of the image, and whether
the mask differs in brightness from the ring around it. Last, the out-of-fold failures by how
their mask sits against the label (too large, too small, outline off...), and how many of
each the queue holds.

FOLDS is a `raythyroid cv` RUN, or a model cv built (the bundled `ddti`): its members are the
fold models in fold order, so the out-of-fold frames need no cv run kept on disk.

With `--teacher` (a student's: FOLDS a `raythyroid distill --folds` RUN, MODEL its student),
one more candidate: how far the student's mask agrees with its teacher's. Out of fold, fold k's
teacher is the teacher's fold-k model (which never saw fold k, as in distill's CV); on the test
split, the whole teacher with its own inference. A second network pass a frame, not twenty.

    python bench/confidence_bench.py FOLDS PREPARED [--model MODEL] [--teacher TEACHER] [--record]
"""
from __future__ import annotations

import argparse
import sys

import cv2
import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from common import every_fold, held_out_by_fold, record, views  # noqa: E402

from raythyroid import imaging, metrics, model, postprocess, report, shards  # noqa: E402
from raythyroid.imaging import Geometry  # noqa: E402

FAILURE_IOU = report.FAILURE_IOU  # what the report counts as a failure


def as_infer(views: np.ndarray, tta: bool) -> np.ndarray:
    """The probabilities infer has for a frame, from its views (see `views`): flip TTA averages
    the frame and its mirror, and that average weighs equally with a zoomed-out view."""
    if not tta:
        return views[0]
    return views[:2].mean(0) if len(views) == 2 else (views[:2].mean(0) + views[2]) / 2


# The copies stay inside the training augmentation's ranges (augment.AugmentConfig: gamma
# 0.7-1.5, scale 0.85-1.15): views the model has learned to treat as the same frame.
def _gamma(value: float):
    table = np.round((np.arange(256) / 255.0) ** value * 255).astype(np.uint8)
    return lambda images: table[images]


ZOOM_OUT = 0.85


def _zoom_box(side: int) -> tuple[int, int]:
    """(side, offset) of the shrunk frame inside the blank one."""
    small = int(round(side * ZOOM_OUT))
    return small, (side - small) // 2


def _zoom_out(images: np.ndarray) -> np.ndarray:
    """The frame shrunk to 85% in the middle of a blank one (the blank is what desensitizing
    leaves outside a scan region)."""
    small, at = _zoom_box(images.shape[-1])
    out = np.zeros_like(images)
    for i, image in enumerate(images):
        out[i, at:at + small, at:at + small] = cv2.resize(image, (small, small),
                                                          interpolation=cv2.INTER_AREA)
    return out


def _zoom_back(probs: np.ndarray) -> np.ndarray:
    side = probs.shape[-1]
    small, at = _zoom_box(side)
    return np.stack([cv2.resize(p[at:at + small, at:at + small], (side, side),
                                interpolation=cv2.INTER_LINEAR) for p in probs])


# (change the frame, map the probabilities back): what an uncertain outline moves under
PERTURBATIONS = ((_gamma(0.7), lambda p: p), (_gamma(1.4), lambda p: p), (_zoom_out, _zoom_back))


def perturbed_views(net, images: np.ndarray, tta: bool, zoom: float) -> np.ndarray:
    """(P, N, H, W): the nodule probabilities of brighter, darker and smaller copies of the
    frames, mapped back onto the frames; with the TTA the frame's own mask has, so an unchanged
    copy would agree with that mask exactly."""
    import torch

    cpu = torch.device("cpu")
    with torch.no_grad():
        return np.stack([undo(model.nodule_probability(
            net, torch.from_numpy(np.ascontiguousarray(change(images))), cpu,
            flip_tta=tta, zoom=zoom).numpy()) for change, undo in PERTURBATIONS])


def frame_record(pair: np.ndarray, row: dict, image: np.ndarray, post: postprocess.PostConfig,
                 tta: bool, perturbed: np.ndarray | None,
                 member_pairs: np.ndarray | None = None,
                 teacher_mask: np.ndarray | None = None) -> dict:
    """One frame's IoU and every candidate score, in original geometry as infer has them,
    from its views' probabilities (2 or 3, H, W: see `views`), its prepared image (the model's
    input) and its perturbed copies' probabilities (P, H, W); with an ensemble's per-member
    views also how far its members' masks agree; with a teacher's mask (original geometry),
    how far the mask agrees with it. Where TTA has a zoomed-out view, also the
    counts without it ("flip_counts"): what that view adds. Without perturbed copies (None),
    no score from them."""
    geometry = Geometry.from_dict(row["geometry"])

    def restored(views: np.ndarray) -> np.ndarray:  # infer keeps float16
        return geometry.restore(as_infer(views, tta).astype(np.float16))

    prob = restored(pair)
    mask = postprocess.clean_mask(prob, post)
    label = imaging.decode_png(row["full_mask"]) > 0
    counts = metrics.counts(label, mask)
    flip_counts = (metrics.counts(label, postprocess.clean_mask(restored(pair[:2]), post))
                   if len(pair) == 3 else counts)
    scores = {name: score(mask, prob, post.threshold) for name, score in CANDIDATES.items()}
    scores.update(image_evidence(mask, geometry.restore(image)))
    plain, mirrored = (postprocess.clean_mask(geometry.restore(v.astype(np.float16)), post)
                       for v in pair[:2])
    scores[FLIP_AGREEMENT] = _mask_iou(plain, mirrored) if plain.any() or mirrored.any() else 1.0
    if perturbed is not None:
        moved = [postprocess.clean_mask(geometry.restore(v.astype(np.float16)), post)
                 for v in perturbed]
        scores[PERTURBED_AGREEMENT] = float(np.mean([
            _mask_iou(mask, m) if mask.any() or m.any() else 1.0 for m in moved]))
    if member_pairs is not None:
        members = [postprocess.clean_mask(restored(p), post) for p in member_pairs]
        scores[MEMBER_AGREEMENT] = float(np.mean([
            _mask_iou(a, b) for i, a in enumerate(members) for b in members[i + 1:]]))
    if teacher_mask is not None:
        scores[TEACHER_AGREEMENT] = (_mask_iou(mask, teacher_mask)
                                     if mask.any() or teacher_mask.any() else 1.0)
    return {"key": row["key"], "counts": counts, "flip_counts": flip_counts,
            "iou": metrics.image_iou(counts["tp"], counts["fp"], counts["fn"]),
            "scores": scores, "shape": _shape(mask, prob, post.threshold)}


def _shape(mask: np.ndarray, prob: np.ndarray, threshold: float) -> list[float]:
    """What a learned score may use beside the scores: the results row infer writes for the
    mask (area as a share of the frame and its log, components, aspect ratio, how much of its
    box it fills), the strongest probability, and the outline's length squared over the area."""
    row = postprocess.describe(mask, prob, None, threshold)
    share = row["area_px"] / mask.size
    fill = compactness = 0.0
    if row["area_px"]:
        fill = row["area_px"] / (row["bbox_w"] * row["bbox_h"])
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        compactness = float((mask & ~inner).sum()) ** 2 / row["area_px"]
    return [share, float(np.log(share + 1e-4)), float(row["n_components"]),
            row["aspect_ratio"] or 0.0, fill, float(prob.max()), compactness]


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    pair = metrics.counts(a, b)
    return metrics.image_iou(pair["tp"], pair["fp"], pair["fn"])


def _mean_inside(mask: np.ndarray, prob: np.ndarray, threshold: float) -> float:
    """The score before: mean probability inside the mask (1 - max without one)."""
    return float(prob[mask].mean()) if mask.any() else float(1.0 - prob.max())


def _outline_bands(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bands just inside and just outside the mask's outline, each about 8% of the
    mask's side wide (at least 2 px): where a mask whose outline is off is unsure."""
    width = max(2, int(round(0.08 * np.sqrt(mask.sum()))))
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    as_byte = mask.astype(np.uint8)
    inner = mask & ~cv2.erode(as_byte, kernel).astype(bool)
    outer = cv2.dilate(as_byte, kernel).astype(bool) & ~mask
    return inner, outer


def _outline_margin(mask: np.ndarray, prob: np.ndarray, threshold: float) -> float:
    """How far from undecided (|2p - 1|) the probabilities are across the outline's bands."""
    if not mask.any():
        return float(1.0 - prob.max())
    inner, outer = _outline_bands(mask)
    return float(np.abs(2 * prob[inner | outer].astype(np.float32) - 1).mean())


def _left_outside(mask: np.ndarray, prob: np.ndarray, threshold: float) -> float:
    """1 - the mean probability in the band just outside the mask (nodule left out)."""
    if not mask.any():
        return float(1.0 - prob.max())
    return float(1.0 - prob[_outline_bands(mask)[1]].astype(np.float32).mean())


CANDIDATES = {"mean probability inside the mask (before)": _mean_inside,
              "soft IoU of mask and probabilities (now)": postprocess.confidence,
              "probability margin across the outline": _outline_margin,
              "probability left just outside the mask": _left_outside}
EDGES_ON_OUTLINE = "image edges along the outline against edges inside the mask"
CONTRAST_ACROSS_OUTLINE = "brightness contrast between the mask and the ring around it"


def image_evidence(mask: np.ndarray, image: np.ndarray) -> dict[str, float]:
    """What the prepared frame (as infer feeds the model, in original geometry) says of the
    outline: a nodule's edge is a change of echo texture, so an outline in the right place
    should run along the frame's stronger edges (against the band just inside it, the outline
    included) and enclose a region brighter or darker than its surroundings. Without a mask,
    1 (nothing to doubt)."""
    if not mask.any():
        return {EDGES_ON_OUTLINE: 1.0, CONTRAST_ACROSS_OUTLINE: 1.0}
    smooth = cv2.GaussianBlur(image.astype(np.float32), (5, 5), 1.5)
    edges = np.hypot(cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1))
    as_byte = mask.astype(np.uint8)
    width = max(2, int(round(0.15 * np.sqrt(mask.sum()))))
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    outline = mask & ~cv2.erode(as_byte, np.ones((3, 3), np.uint8)).astype(bool)
    inner = mask & ~cv2.erode(as_byte, kernel).astype(bool)
    ring = cv2.dilate(as_byte, kernel).astype(bool) & ~mask & (image > 0)  # scan region only
    around = image[ring] if ring.any() else image[image > 0]
    spread = float(np.concatenate([image[mask], around]).std()) + 1e-3
    return {EDGES_ON_OUTLINE: float(edges[outline].mean() / (edges[inner].mean() + 1e-3)),
            CONTRAST_ACROSS_OUTLINE: abs(float(image[mask].mean()) - float(around.mean()))
            / spread}


# the mask of the frame against the mask of its mirror image (flip TTA's two views)
FLIP_AGREEMENT = "IoU between the masks of the frame and of its mirror image"
PERTURBED_AGREEMENT = ("mean IoU between the frame's mask and the masks of its brighter, "
                       "darker and smaller copies")
# only where an ensemble's members segment frames none of them trained on: the test split
MEMBER_AGREEMENT = "mean IoU between the members' masks"
# a distilled student against the teacher it learned from (out of fold: the fold's teacher)
TEACHER_AGREEMENT = "IoU between the student's mask and its teacher's"


LEARNED = "logistic regression on the scores above and the mask's shape, fit on other frames"


def _features(record: dict, names: list[str]) -> list[float]:
    return [record["scores"][n] for n in names] + record["shape"]


def _fit_failure(x: np.ndarray, failed: np.ndarray, l2: float = 1.0):
    """A logistic regression of failure on standardized features (gradient descent: a dozen
    features, a few hundred frames); returns the learned score, high where it expects no
    failure."""
    mean, sd = x.mean(0), x.std(0) + 1e-9

    def design(rows: np.ndarray) -> np.ndarray:
        return np.column_stack([(rows - mean) / sd, np.ones(len(rows))])

    z, w = design(x), np.zeros(x.shape[1] + 1)
    for _ in range(3000):
        p = 1 / (1 + np.exp(-z @ w))
        w -= 0.5 * (z.T @ (p - failed) + l2 * np.r_[w[:-1], 0]) / len(x)
    return lambda rows: -(design(rows) @ w)


def add_learned(records: list[dict], folds: list[int], test: list[dict]) -> None:
    """LEARNED for every out-of-fold frame from a fit on the other folds' frames (the tuning
    the folds allow, measured where it was not fit), and for the test split from a fit on
    every out-of-fold frame."""
    names = list(records[0]["scores"])
    x = np.array([_features(r, names) for r in records])
    failed = np.array([r["iou"] < FAILURE_IOU for r in records], float)
    folds = np.asarray(folds)
    for held in np.unique(folds):
        score = _fit_failure(x[folds != held], failed[folds != held])
        for i, value in zip(np.nonzero(folds == held)[0], score(x[folds == held])):
            records[i]["scores"][LEARNED] = float(value)
    score = _fit_failure(x, failed)
    for r, value in zip(test, score(np.array([_features(r, names) for r in test]))):
        r["scores"][LEARNED] = float(value)


def pooled(records: list[dict], counts: str = "counts") -> dict:
    """The frames' metrics as one set (their counts summed): the figure a pooled score on new
    frames estimates."""
    return metrics.Totals.from_arrays(*([r[counts][k] for r in records]
                                        for k in ("tp", "fp", "fn", "tn"))).metrics()


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


def least_confident_quarter(records: list[dict], name: str) -> np.ndarray:
    """Which frames the review queue's first quarter holds when `name` orders it."""
    order = np.argsort([r["scores"][name] for r in records], kind="stable")
    queued = np.zeros(len(records), bool)
    queued[order[:max(1, int(round(len(records) / 4)))]] = True
    return queued


def evaluate_scores(records: list[dict]) -> list[tuple[str, float, int, int, int]]:
    """(name, Spearman with IoU, failures in the least confident quarter, failures, the most
    the quarter can hold)."""
    iou = np.array([r["iou"] for r in records])
    failures = iou < FAILURE_IOU
    out = []
    for name in records[0]["scores"]:
        queued = least_confident_quarter(records, name)
        out.append((name, spearman([r["scores"][name] for r in records], iou),
                    int((failures & queued).sum()), int(failures.sum()),
                    min(int(queued.sum()), int(failures.sum()))))
    return out


BANDS = (0.0, 0.1, 0.3, 0.5, 0.7, 1.0)


def by_band(records: list[dict], name: str) -> list[tuple[str, int, int]]:
    """(IoU band, frames in it, how many the least confident quarter by `name` holds): where
    the failures lie, and which of them the queue finds."""
    iou = np.array([r["iou"] for r in records])
    queued = least_confident_quarter(records, name)
    out = []
    for low, high in zip(BANDS, BANDS[1:]):
        inside = (iou >= low) & ((iou < high) if high < 1 else (iou <= high))
        out.append((f"{low:.1f}-{high:.1f}", int(inside.sum()), int((inside & queued).sum())))
    return out


def by_kind(records: list[dict], name: str) -> list[tuple[str, int, int]]:
    """(kind, failures of that kind, how many the least confident quarter by `name` holds):
    which mistakes the queue finds and which the model makes with confidence."""
    return metrics.failures_by_kind(
        *([r["counts"][c] for r in records] for c in ("tp", "fp", "fn")),
        [r["iou"] < FAILURE_IOU for r in records], least_confident_quarter(records, name))


def teacher_masks(net, info, images: np.ndarray, rows: list[dict]) -> list[np.ndarray]:
    """The teacher's masks of the frames in original geometry, with its own inference (an
    ensemble member by member: their mean is what the ensemble computes)."""
    inference = info.inference
    nets = net.members if isinstance(net, model.Ensemble) else [net]
    probs = np.mean([as_infer(views(m, images, inference.tta_zoom), inference.tta)
                     for m in nets], axis=0)
    return [postprocess.clean_mask(
        Geometry.from_dict(r["geometry"]).restore(p.astype(np.float16)), inference.post)
        for p, r in zip(probs, rows)]


def out_of_fold(source: str, prepared: str, limit: int | None, teacher: str | None = None
                ) -> tuple[list[dict], list[int]]:
    """Every held-out frame's record, and the fold that held it out; with a teacher, each
    fold's frames also against the teacher's model of the same fold."""
    seed, folds = held_out_by_fold(source, prepared)
    teacher_folds = None
    if teacher:
        teacher_seed, teacher_folds, _ = every_fold(teacher)
        if (teacher_seed, len(teacher_folds)) != (seed, len(folds)):
            raise SystemExit(f"confidence_bench: {teacher} dealt {len(teacher_folds)} folds "
                             f"with seed {teacher_seed}, {source} {len(folds)} with seed "
                             f"{seed}: a fold's teacher would have seen its frames")
    records, record_folds = [], []
    for fold, (net, info, held) in enumerate(folds):
        held = held[:limit]
        post = info.inference.post
        tta, zoom = info.inference.tta, info.inference.tta_zoom
        images = np.stack([imaging.decode_png(r["image"]) for r in held])
        pairs, perturbed = views(net, images, zoom), perturbed_views(net, images, tta, zoom)
        taught = (teacher_masks(*teacher_folds[fold], images, held) if teacher_folds
                  else [None] * len(held))
        records += [frame_record(pairs[:, i], r, images[i], post, tta, perturbed[:, i],
                                 teacher_mask=taught[i]) for i, r in enumerate(held)]
        record_folds += [fold] * len(held)
        print(f"fold {fold}: {len(held)} held-out frames", file=sys.stderr)
    return records, record_folds


def test_split(model_uri: str, prepared: str, teacher: str | None = None) -> list[dict]:
    manifest = shards.read_manifest(prepared)
    rows = shards.read_rows(prepared, manifest, "test")
    net, info = model.load(model.resolve(model_uri))
    post = info.inference.post
    images = np.stack([imaging.decode_png(r["image"]) for r in rows])
    tta, zoom = info.inference.tta, info.inference.tta_zoom
    perturbed = perturbed_views(net, images, tta, zoom)
    if not isinstance(net, model.Ensemble):
        pairs = views(net, images, zoom)
        taught = (teacher_masks(*model.load(model.resolve(teacher)), images, rows) if teacher
                  else [None] * len(rows))
        return [frame_record(pairs[:, i], r, images[i], post, tta, perturbed[:, i],
                             teacher_mask=taught[i]) for i, r in enumerate(rows)]
    # the members one by one: their mean is exactly what the ensemble computes
    members = np.stack([views(m, images, zoom) for m in net.members])  # (M, V, N, H, W)
    return [frame_record(members[:, :, i].mean(0), r, images[i], post, tta, perturbed[:, i],
                         members[:, :, i]) for i, r in enumerate(rows)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folds", help="a raythyroid cv RUN, or a model cv built (ddti)")
    parser.add_argument("prepared")
    parser.add_argument("--model", default="ddti", help="the model scored on the test split")
    parser.add_argument("--teacher", help="the model FOLDS and MODEL were distilled from: "
                        "their agreement with it is one more candidate")
    parser.add_argument("--limit", type=int, help="held-out frames per fold (a quick look)")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    args = parser.parse_args()
    if args.teacher and model.read_info(model.resolve(args.model)).ensemble:
        raise SystemExit("confidence_bench: --teacher scores a one-network student: give it "
                         "as --model")

    held_out, folds = out_of_fold(args.folds, args.prepared, args.limit, args.teacher)
    test = test_split(args.model, args.prepared, args.teacher)
    add_learned(held_out, folds, test)
    tested = "the student" if args.teacher else "the ensemble"
    found = {"cross-validation, out of fold": held_out, f"test split, {tested}": test}
    lines = ["| frames | score | Spearman with IoU | failures in the least confident quarter "
             "| the most it could hold |", "|---|---|---|---|---|"]
    for where, records in found.items():
        for name, rho, caught, failures, ceiling in evaluate_scores(records):
            lines.append(f"| {where} ({len(records)}) | {name} | {rho:.2f} | "
                         f"{caught} of {failures} ({caught / max(failures, 1):.0%}) | "
                         f"{ceiling} ({ceiling / max(failures, 1):.0%}) |")
    lines += ["", "| frames | TTA | pooled n_IoU | n_IoU/img | failures |",
              "|---|---|---|---|---|"]
    for where, records in found.items():
        for tta, counts in (("as the model chose it", "counts"), ("flip only", "flip_counts")):
            whole = pooled(records, counts)
            failures = sum(metrics.image_iou(r[counts]["tp"], r[counts]["fp"], r[counts]["fn"])
                           < FAILURE_IOU for r in records)
            lines.append(f"| {where} ({len(records)}) | {tta} | {whole['n_iou']:.4f} | "
                         f"{whole['n_iou_per_image'] or 0:.4f} | {failures} |")
    now = "soft IoU of mask and probabilities (now)"
    lines += ["", f"Out of fold, by IoU band: the frames, and those in the least confident "
              f"quarter by the {now.split(' (')[0]}", "",
              "| IoU | frames | in the quarter |", "|---|---|---|"]
    lines += [f"| {band} | {frames} | {queued} |"
              for band, frames, queued in by_band(held_out, now)]
    lines += ["", "Out of fold, the failures by how the mask sits against the label "
              f"({metrics.NEARLY_ALL:.0%} of it counts as nearly all)", "",
              "| failure | frames | in the quarter |",
              "|---|---|---|"]
    lines += [f"| {kind} | {frames} | {queued} |"
              for kind, frames, queued in by_kind(held_out, now)]
    print("\n".join(lines))
    if args.record:
        record("Review-queue confidence on DDTI" + (": a distilled student and its teacher"
                                                     if args.teacher else ""), lines,
               [f"a failure is a frame with IoU < {FAILURE_IOU}; the least confident quarter is "
                "the first quarter of the review queue; it cannot hold more failures than it "
                "has frames, hence the last column"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
