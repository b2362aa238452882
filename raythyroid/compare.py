"""The compare job: two models scored on the same labelled frames, and the difference judged.

    LABELLED's shards (one split)    read tasks
      -> FramePairScorer             one actor: both models loaded once, each applied with the
                                     inference it chose, masks scored in each frame's geometry
      -> per-frame confusion counts  the driver: pooled and per-image n_IoU of each model, the
                                     paired per-frame difference (B - A) and its bootstrap 95%
                                     interval, resampling cases (a patient's frames together)

What a team needs before it swaps one model for another: B is better only when the whole
interval lies above zero; `raythyroid compare` exits 0 then, 4 otherwise (a script's gate).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from . import imaging, metrics, runtime, shards, storage, training
from .errors import UserError

RESAMPLES = 2000
COLUMNS = ["key", "case_id", "image", "full_mask", "geometry"]


@dataclass(frozen=True)
class Scores:
    """One model's figures on the compared frames."""

    model: str
    n_iou: float  # pooled: every frame's pixels counted together
    n_iou_per_image: float  # the mean IoU over frames whose label has a nodule


@dataclass(frozen=True)
class Comparison:
    frames: int
    cases: int
    a: Scores
    b: Scores
    difference: float  # mean over frames with a nodule of B's IoU minus A's on that frame
    interval: tuple[float, float]  # its bootstrap 95% interval over cases
    resamples: int

    @property
    def b_is_better(self) -> bool:
        return self.interval[0] > 0

    def to_dict(self) -> dict:
        return dict(asdict(self), b_is_better=self.b_is_better)


class FramePairScorer:
    """Both models, loaded once per actor; each prepared frame -> both models' confusion
    counts against its label, in the frame's own geometry, as infer would segment it."""

    def __init__(self, model_a: str, model_b: str, threads: int):
        import torch

        from . import model as model_lib

        torch.set_num_threads(threads)
        self.models = [model_lib.load(model_lib.resolve(m)) for m in (model_a, model_b)]
        self.bf16 = model_lib.resolve_bf16("auto", torch.device("cpu"))  # as infer runs

    def __call__(self, batch: pa.Table) -> pa.Table:
        from . import evaluate

        images = np.stack([imaging.decode_png(b) for b in batch.column("image").to_pylist()])
        labels = [imaging.decode_png(b) > 0 for b in batch.column("full_mask").to_pylist()]
        geometries = [imaging.Geometry.from_dict(g) for g in batch.column("geometry").to_pylist()]
        out = {"key": batch.column("key").to_pylist(),
               "case_id": batch.column("case_id").to_pylist()}
        for name, (net, info) in zip("ab", self.models):
            counted = evaluate.score_prepared(net, info.inference, images, labels, geometries,
                                              self.bf16)
            for field in ("tp", "fp", "fn", "tn"):
                out[f"{name}_{field}"] = [c[field] for c in counted]
        return pa.table(out)


def run(model_a: str, model_b: str, labelled: str, split: str = "test",
        resamples: int = RESAMPLES, seed: int = 0, log=print) -> Comparison:
    """Score both models on LABELLED's `split` in one Ray job and judge the difference."""
    import ray

    from . import model as model_lib

    labelled = storage.normalize(labelled)
    manifest = shards.read_manifest(labelled)
    if shards.format_version(manifest) < 2:
        raise UserError(f"{labelled} was prepared by a version that kept no original-size "
                        f"labels: preprocess it again")
    for name in (model_a, model_b):
        model_lib.read_info(model_lib.resolve(name)).check_prepared(name, labelled, manifest)
    # a bundled model travels by name (each node resolves it), a folder as an absolute URI
    model_a, model_b = (m if model_lib.resolve(m) != m else storage.normalize(m)
                        for m in (model_a, model_b))
    uris = shards.shard_uris(labelled, manifest, split)
    if not uris:
        raise UserError(f"{labelled} has no {split} frames")
    cpus, threads = runtime.plan_workers(1, False)
    log(f"compare: scoring {model_a} (A) and {model_b} (B) on the {split} split of {labelled}")
    rows = (training.read_shards(uris, COLUMNS)
            .map_batches(FramePairScorer,
                         fn_constructor_kwargs={"model_a": model_a, "model_b": model_b,
                                                "threads": threads},
                         compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cpus,
                         batch_size=None, batch_format="pyarrow")
            .take_all())
    result = judge(rows, model_a, model_b, resamples, seed)
    log(table(result))
    return result


def judge(rows: list[dict], model_a: str, model_b: str, resamples: int = RESAMPLES,
          seed: int = 0) -> Comparison:
    """Per-frame counts of both models -> their figures and the paired difference, with its
    bootstrap interval: cases drawn with replacement, every frame of a drawn case taken, so
    frames of one patient (which agree more with each other) never count as independent."""
    scores, ious = [], {}
    for name, model in (("a", model_a), ("b", model_b)):
        counts = {f: np.array([r[f"{name}_{f}"] for r in rows], np.int64)
                  for f in ("tp", "fp", "fn", "tn")}
        figures = metrics.summarize(counts["tp"], counts["fp"], counts["fn"], counts["tn"])
        scores.append(Scores(model, figures["n_iou"], figures["n_iou_per_image"]))
        ious[name] = np.array([metrics.image_iou(tp, fp, fn) for tp, fp, fn in
                               zip(counts["tp"], counts["fp"], counts["fn"])])
    # the per-image figure's frames: those whose label has a nodule
    with_nodule = np.array([r["a_tp"] + r["a_fn"] > 0 for r in rows])
    cases = np.array([r["case_id"] for r in rows])[with_nodule]
    differences = (ious["b"] - ious["a"])[with_nodule]
    if not len(differences):
        raise UserError("no compared frame has a nodule in its label: nothing to judge")
    names, case_of = np.unique(cases, return_inverse=True)
    sums = np.bincount(case_of, weights=differences, minlength=len(names))
    sizes = np.bincount(case_of, minlength=len(names))
    drawn = np.random.default_rng(seed).integers(0, len(names), (resamples, len(names)))
    means = sums[drawn].sum(axis=1) / sizes[drawn].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Comparison(frames=len(rows), cases=len(set(r["case_id"] for r in rows)),
                      a=scores[0], b=scores[1], difference=float(differences.mean()),
                      interval=(float(low), float(high)), resamples=resamples)


def table(result: Comparison) -> str:
    lines = [f"{result.frames} frames of {result.cases} cases",
             f"{'':4}{'model':40} {'pooled n_IoU':>13} {'n_IoU/img':>10}"]
    for name, scores in (("A", result.a), ("B", result.b)):
        lines.append(f"  {name} {scores.model[:40]:40} {scores.n_iou:13.4f} "
                     f"{scores.n_iou_per_image:10.4f}")
    low, high = result.interval
    lines.append(f"B - A per frame: {result.difference:+.4f} (95% interval {low:+.4f} .. "
                 f"{high:+.4f}, {result.resamples} resamples of cases): B is "
                 + ("better" if result.b_is_better else "not better beyond the interval"))
    return "\n".join(lines)
