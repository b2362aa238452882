"""`raythyroid cv DATA RUN --folds 5`: case-disjoint k-fold cross-validation as one Ray job.

The train and val splits of a preprocess output are pooled (the test split stays untouched),
cases are dealt into k folds, and each fold trains on the others and validates on itself. Folds
run concurrently as far as the cluster's CPUs (or GPUs) allow; Ray queues the rest. RUN gets
fold-<i>/ (checkpoints, model/, history.jsonl, fold.json) per fold and cv.json with the mean and
spread of n_iou and n_iou_per_image.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from . import runtime, shards, split, storage, train
from .errors import UserError

REPORTED = ("n_iou", "n_iou_per_image", "dice", "precision", "recall")


def _fold_metrics(state: train.TrainState) -> dict:
    """The fold's validation metrics at its last epoch (no selection on the fold itself) and
    at its best epoch."""
    last = state.history[-1]
    return {"last": {k: last.get(f"val_{k}") for k in REPORTED},
            "best": {k: state.best["val"].get(k) for k in REPORTED},
            "best_epoch": state.best["epoch"], "epochs": state.epoch}


def run(data: str, run_uri: str, config: train.TrainConfig, folds: int = 5, workers: int = 1,
        gpu: bool = False, cpus_per_worker: float | None = None, log=print) -> dict:
    import ray
    from ray.data.expressions import col

    data, run_uri = storage.normalize(data), storage.normalize(run_uri)
    manifest = shards.read_manifest(data)
    fs, paths = shards.shard_paths(data, manifest, ["train", "val"])
    rows = ray.data.read_parquet(paths, filesystem=fs).select_columns(
        ["key", "case_id"]).take_all()
    case_fold = split.folds((r["case_id"] for r in rows), folds, config.seed)
    if len(case_fold) < folds:
        raise UserError(f"{len(case_fold)} cases cannot fill {folds} folds")
    key_fold = {r["key"]: case_fold[r["case_id"]] for r in rows}
    weighted = config.loss == "weighted-ce"
    log(f"cv: {len(rows)} pairs of {len(case_fold)} cases in {folds} case-disjoint folds")
    pooled = train.load_split(data, manifest, ["train", "val"], with_weights=weighted,
                              folds=key_fold, full=True)
    # what only validation reads (original-geometry labels) stays out of training folds
    scoring_only = [c for c in train.FULL_COLUMNS if c in pooled.columns()]

    total_cpus = runtime.cluster_cpus()
    total_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if cpus_per_worker is None:
        cpus_per_worker = 1.0
    per_fold = workers * (1.0 if gpu else cpus_per_worker)
    capacity = total_gpus if gpu else total_cpus
    parallel = max(1, min(folds, int(capacity // per_fold)))
    threads = max(1, int(total_cpus // (parallel * workers)))
    log(f"cv: {parallel} fold(s) at a time, {workers} worker(s) each, {threads} thread(s)")

    def one_fold(k: int) -> dict:
        fold_uri = storage.join(run_uri, f"fold-{k}")
        done = storage.join(fold_uri, "fold.json")
        if storage.exists(done):
            return json.loads(storage.read_text(done))
        training = pooled.filter(expr=col("fold") != k)
        datasets = {"train": (training.drop_columns(scoring_only) if scoring_only
                              else training).materialize(),
                    "val": pooled.filter(expr=col("fold") == k).materialize()}
        fold_config = dataclasses.replace(config, seed=config.seed + k)
        train.check_resume(fold_uri, fold_config)
        state = train.fit(datasets, fold_uri, fold_config, workers, gpu, cpus_per_worker,
                          time.time(), log=lambda *_: None, threads=threads)
        train.save_model(fold_uri, state, fold_config, workers, gpu, manifest, data)
        result = dict(_fold_metrics(state), fold=k,
                      val_images=int(datasets["val"].count()))
        storage.write_text(done, json.dumps(result, indent=2))
        log(f"cv: fold {k}: val n_IoU {result['last']['n_iou']:.4f}, n_IoU/img "
            f"{result['last']['n_iou_per_image'] or 0:.4f} ({result['epochs']} epochs)")
        return result

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        results = list(pool.map(one_fold, range(folds)))
    summary = {"folds": results, "k": folds, "data": data, "config": config.to_dict()}
    for which in ("last", "best"):
        for key in ("n_iou", "n_iou_per_image"):
            values = [r[which][key] for r in results if r[which][key] is not None]
            summary[f"{which}_{key}_mean"] = statistics.fmean(values) if values else None
            summary[f"{which}_{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
    storage.write_text(storage.join(run_uri, "cv.json"), json.dumps(summary, indent=2))
    log(table(summary))
    return summary


def table(summary: dict) -> str:
    lines = [f"{summary['k']}-fold cross-validation (validation metrics at each fold's last "
             f"epoch)", f"{'fold':>5} | {'n_IoU':>7} | {'n_IoU/img':>9} | {'Dice':>7}",
             "-" * 38]
    for r in summary["folds"]:
        last = r["last"]
        lines.append(f"{r['fold']:>5} | {last['n_iou']:7.4f} | "
                     f"{(last['n_iou_per_image'] or 0):9.4f} | {last['dice']:7.4f}")
    lines.append(f"{'mean':>5} | {summary['last_n_iou_mean']:7.4f} | "
                 f"{summary['last_n_iou_per_image_mean'] or 0:9.4f} |")
    lines.append(f"{'std':>5} | {summary['last_n_iou_std']:7.4f} | "
                 f"{summary['last_n_iou_per_image_std']:9.4f} |")
    return "\n".join(lines)



