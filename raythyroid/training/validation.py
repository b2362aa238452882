"""Scoring a split across the workers (confusion totals all-reduced, each row scored once, in
its own frame's geometry) and the choice of inference (TTA, threshold, components) on it."""
from __future__ import annotations

import numpy as np

from .. import imaging, metrics


def evaluate(net, dataset, rank: int, world: int, device, bf16: bool, batch_size: int,
             tta: bool = False, post: dict | None = None, with_totals: bool = False,
             zoom: float = 0.0) -> dict:
    """This worker's share of a split -> all-reduced metrics over the whole split.

    Without `post` a pixel is nodule where its probability is >= 0.5 (fast, every epoch);
    with it, masks go through infer's post-processing (postprocess.clean_mask) first.
    """
    return evaluate_variants(net, dataset, rank, world, device, bf16, batch_size, tta, zoom,
                             [post], with_totals)[0]


def evaluate_variants(net, dataset, rank: int, world: int, device, bf16: bool,
                      batch_size: int, tta: bool, zoom: float, posts: list,
                      with_totals: bool = False
                      ) -> list[dict]:
    """Like evaluate, for several post-processing settings at the price of one model pass.
    With `with_totals` each result also carries its metrics.Totals record under "totals":
    what cv sums over its folds into pooled out-of-fold figures.

    Where the split carries original-geometry labels, each prediction is first mapped back to
    its frame (float16 probabilities, as infer keeps them) and scored there, exactly as infer
    applies and scores it; otherwise in the prepared square.
    """
    import torch
    import torch.distributed as dist

    from .. import model as model_lib, postprocess

    module = model_lib.unwrapped(net)
    module.eval()
    _rank_zero_buffers(module)
    configs = [postprocess.PostConfig(**p) if p is not None else None for p in posts]
    totals = [metrics.Totals() for _ in configs]
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy",
                                      drop_last=False):
        mine = (batch["part"] % world) == rank
        if not bool(mine.any()):
            continue
        images = torch.from_numpy(np.ascontiguousarray(batch["image"][mine]))
        prob = model_lib.nodule_probability(module, images, device, bf16, tta,
                                            zoom).cpu().numpy()
        for label, p in _scored_pairs(batch, mine, prob):
            for total, config in zip(totals, configs):
                total.add(label, postprocess.clean_mask(p, config) if config else p >= 0.5)
    reduced = torch.tensor([t.to_vector() for t in totals], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(reduced)
    scored = [metrics.Totals.from_vector(row).metrics() for row in reduced.tolist()]
    if with_totals:
        for result, row in zip(scored, reduced.tolist()):
            result["totals"] = metrics.Totals.from_vector(row).to_record()
    return scored


def _rank_zero_buffers(module) -> None:
    """Every worker takes rank 0's BatchNorm statistics, the ones rank 0 checkpoints and ships.
    DDP hands them out before each training forward, and then each worker's own batch moves its
    copy; left so, each worker would score its share of a split with a slightly different model
    (on phantoms: every validation variant 0.002 n_IoU off what infer measures)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def _scored_pairs(batch: dict, mine: np.ndarray, prob: np.ndarray):
    """(label, probability map) pairs in the geometry they are scored in."""
    if "full_mask" not in batch:
        yield from zip(batch["mask"][mine].astype(bool), prob)
        return
    for label_png, geometry, p in zip(batch["full_mask"][mine], batch["geometry"][mine], prob):
        restored = imaging.Geometry.from_row(geometry).restore_as_infer_keeps(p)
        yield imaging.decode_png(label_png) > 0, restored

# Inference variants tried on the validation split once training ends: mirrored test-time
# augmentation (and with it a zoomed-out view, model.TTA_ZOOM), a higher threshold
# (class-weighted losses over-segment) and keeping only the largest components are kept only
# where they help. The plain setting is listed first so that it wins ties.
INFERENCE_THRESHOLDS = (0.5, 0.6, 0.7, 0.4)

INFERENCE_KEEP_LARGEST = (0, 2, 1)


def choose_inference(net, val_set, rank, world, device, bf16, batch_size,
                     allow_tta: bool = True) -> dict:
    from .. import model as model_lib

    posts = [{"threshold": t, "keep_largest": k}
             for t in INFERENCE_THRESHOLDS for k in INFERENCE_KEEP_LARGEST]
    scored = []
    views = ((False, 0.0), (True, 0.0), (True, model_lib.TTA_ZOOM))
    for tta, zoom in views if allow_tta else views[:1]:
        results = evaluate_variants(net, val_set, rank, world, device, bf16, batch_size, tta,
                                    zoom, posts, with_totals=True)
        scored += [{"tta": tta, "tta_zoom": zoom, **post, "val_n_iou": r["n_iou"],
                    "val_n_iou_per_image": r["n_iou_per_image"], "val_totals": r["totals"]}
                   for post, r in zip(posts, results)]
    best = max(scored, key=lambda v: v["val_n_iou"])  # the first of equals
    return {"tta": best["tta"], "tta_zoom": best["tta_zoom"],
            "postprocess": {"threshold": best["threshold"], "keep_largest": best["keep_largest"]},
            "val_variants": scored}
