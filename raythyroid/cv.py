"""`raythyroid cv DATA [DATA ...] RUN --folds 5`: case-disjoint k-fold cross-validation as one
Ray job.

The train and val splits of a preprocess output are pooled (the test split stays untouched),
cases are dealt into k folds (with several outputs, each one's cases among themselves: fold i
is every output's fold i), and each fold trains on the others and validates on itself. Folds
run concurrently as far as the cluster's CPUs (or GPUs) allow; Ray queues the rest. RUN gets
fold-<i>/ (checkpoints, model/, history.jsonl, fold.json) per fold and cv.json with the mean and
spread of n_iou and n_iou_per_image, and the same figures pooled over every fold's validation
frames (the folds' confusion totals summed).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import threading
import time
from typing import Sequence

from . import (metrics, registry, report, runtime, shards, stopping, storage, telemetry,
               training)

REPORTED = ("n_iou", "n_iou_per_image", "dice", "precision", "recall")


def _fold_metrics(state: training.TrainState) -> dict:
    """The fold's validation metrics at its last epoch (no selection on the fold itself) and
    at its best epoch, with the confusion totals behind each (for the pooled figures)."""
    last = state.history[-1]
    best_row = next((r for r in state.history if r["epoch"] == state.best["epoch"]), {})
    return {"last": {k: last.get(f"val_{k}") for k in REPORTED},
            "best": {k: state.best["val"].get(k) for k in REPORTED},
            "last_totals": last.get("val_totals"), "best_totals": best_row.get("val_totals"),
            "best_epoch": state.best["epoch"], "epochs": state.epoch}


def pooled_metrics(totals: list) -> dict | None:
    """Metrics of the folds' validation frames taken as one set: their confusion totals summed
    (exact), None unless every fold has them. Pooled n_IoU weighs each frame by its pixels, as
    a pooled score on new frames does; the mean over folds weighs every fold alike."""
    if not totals or any(t is None for t in totals):
        return None
    summed = sum((metrics.Totals.read(t) for t in totals), metrics.Totals())
    return {k: v for k, v in summed.metrics().items() if k in REPORTED}


def run(data: str | Sequence[str], run_uri: str, config: training.TrainConfig, folds: int = 5,
        workers: int = 1, gpu: bool = False, cpus_per_worker: float | None = None, log=print,
        metrics_port: int | None = None, register: str | None = None) -> dict:
    """The folds, the ensemble and its report; the ensemble logged to MLflow as train's model
    is (train.run: `register`). `data`: a preprocess output, or several folded as one."""
    # a cv finished before is summarized again, not logged again
    finished_before = storage.exists(storage.join(storage.normalize(run_uri), "cv.json"))
    with telemetry.tracked("cv", storage.basename(run_uri), metrics_port, 0,
                           unit="steps") as progress:
        summary = _run(data, run_uri, config, folds, workers, gpu, cpus_per_worker, log,
                       progress)
    if (register or registry.enabled()) and not finished_before:
        figures = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        figures.update({f"{which}_pooled_{k}": v for which in ("last", "inference")
                        for k, v in (summary.get(f"{which}_pooled") or {}).items()
                        if isinstance(v, (int, float))})
        registry.log_finished("cv", storage.normalize(run_uri),
                              dict(config.to_dict(), data=summary["data"], folds=folds),
                              [dict(figures, epoch=0)], register, log)
    return summary


def _run(data, run_uri, config, folds, workers, gpu, cpus_per_worker, log, progress) -> dict:
    import ray
    from ray.data.expressions import col

    data, run_uri = shards.read_prepared(data), storage.normalize(run_uri)
    training.check_same_data(run_uri, data.uris)
    training.initial_weights(config)  # a wrong --init stops the job before the folds' data loads
    dealt = training.deal_folds(data, folds, config.seed)
    weighted = config.loss == "weighted-ce"
    log(f"cv: {len(dealt.of_frames)} pairs of {dealt.cases} cases in {folds} case-disjoint "
        f"folds" + (f", each of the {len(data.sets)} sets' cases dealt among themselves"
                    if len(data.sets) > 1 else ""))
    pooled = training.load_split(data, ["train", "val"], with_weights=weighted, folds=dealt,
                                 full=True)
    # what only validation reads (original-geometry labels) stays out of training folds
    scoring_only = [c for c in training.FULL_COLUMNS if c in pooled.columns()]

    if cpus_per_worker is None:
        cpus_per_worker = 1.0
    per_fold = workers * (1.0 if gpu else cpus_per_worker)
    cpus = runtime.cluster_cpus()
    capacity = float(ray.cluster_resources().get("GPU", 0.0)) if gpu else cpus
    parallel = max(1, min(folds, int(capacity // per_fold)))
    board = telemetry.board()
    threads = CoreShare(board, cpus, workers, parallel, folds)
    log(f"cv: {parallel} fold(s) at a time, {workers} worker(s) each, {threads.now} "
        f"thread(s), more as folds finish")
    relay = _relay(progress, log, config, dealt.of_frames, folds, workers, parallel)

    def one_fold(k: int) -> dict:
        fold_uri = storage.join(run_uri, f"fold-{k}")
        done = storage.join(fold_uri, "fold.json")
        if storage.exists(done):
            finished = json.loads(storage.read_text(done))
            board.post.remote({"kind": "finished", "fold": k, "epochs": finished["epochs"]})
            return finished
        other_folds = pooled.filter(expr=col("fold") != k)
        datasets = {"train": (other_folds.drop_columns(scoring_only) if scoring_only
                              else other_folds).materialize(),
                    "val": pooled.filter(expr=col("fold") == k).materialize()}
        fold_config = dataclasses.replace(config, seed=config.seed + k)
        training.check_resume(fold_uri, fold_config)
        state = training.finished_state(fold_uri) or training.fit(
            datasets, fold_uri, fold_config, workers, gpu, cpus_per_worker, time.time(),
            log=lambda *_: None, threads=threads.now, board=board, fold=k)
        training.save_model(fold_uri, state, fold_config, workers, gpu, data)
        result = dict(_fold_metrics(state), fold=k,
                      val_images=int(datasets["val"].count()))
        storage.write_text(done, json.dumps(result, indent=2))
        log(f"cv: fold {k}: val n_IoU {result['last']['n_iou']:.4f}, n_IoU/img "
            f"{result['last']['n_iou_per_image'] or 0:.4f} ({result['epochs']} epochs)")
        return result

    results = telemetry.run_watched(
        lambda: _in_parallel(one_fold, folds, parallel, threads), board, relay)
    summary = summarize(results, folds, data.param, config)
    # written before the ensemble too: a RUN with model/ but no cv.json would pass for a train run
    storage.write_text(storage.join(run_uri, "cv.json"), json.dumps(summary, indent=2))
    inference = save_ensemble(run_uri, folds, summary)
    from . import model as model_lib  # torch: loaded once there is a model to describe

    summary["inference_pooled"] = inference["pooled"]
    storage.write_text(storage.join(run_uri, "cv.json"), json.dumps(summary, indent=2))
    log(table(summary))
    log(f"cv: the {folds} fold models as one ensemble in {storage.join(run_uri, 'model')} "
        f"(tta={model_lib.describe_tta(inference['tta'], inference['tta_zoom'])}, "
        f"threshold={inference['threshold']}, keep_largest="
        f"{inference['keep_largest']}: the best mean validation n_IoU over the folds, "
        f"{inference['mean_val_n_iou']:.4f}"
        + (f"; pooled over their frames {inference['pooled']['n_iou']:.4f}, each fold's model "
           f"at the epoch its own frames chose" if inference["pooled"] else "") + ")")
    log(f"cv: report: {report.write_at_end(run_uri)}")
    return summary


def summarize(results: list[dict], folds: int, data: str | list[str],
              config: training.TrainConfig) -> dict:
    """cv.json: the folds, the mean and spread of their figures, and the figures of all their
    validation frames pooled."""
    summary = {"folds": results, "k": folds, "data": data, "config": config.to_dict()}
    for which in ("last", "best"):
        for key in ("n_iou", "n_iou_per_image", "dice"):
            values = [r[which][key] for r in results if r[which][key] is not None]
            summary[f"{which}_{key}_mean"] = statistics.fmean(values) if values else None
            summary[f"{which}_{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        summary[f"{which}_pooled"] = pooled_metrics([r.get(f"{which}_totals") for r in results])
    return summary


def shared_inference(fold_variants: list[list[dict]]) -> dict:
    """The inference one ensemble of these fold models uses: of the variants every fold scored
    (training.choose_inference, each fold on the cases it did not train on), the one with the best
    mean validation n_IoU. No case inside the folds is held out from the ensemble itself, so
    that mean is its only honest guide (the test split scores the ensemble). Returns the choice
    and every variant's figures, as model.json keeps them."""
    scores: dict[tuple, list[float]] = {}
    totals: dict[tuple, list] = {}
    for variants in fold_variants:
        for v in variants:
            variant = (v["tta"], v.get("tta_zoom", 0.0), v["threshold"], v["keep_largest"])
            scores.setdefault(variant, []).append(v["val_n_iou"])
            totals.setdefault(variant, []).append(v.get("val_totals"))
    # only variants every fold scored (folds kept from an older version may have fewer)
    scores = {variant: values for variant, values in scores.items()
              if len(values) == len(fold_variants)}
    (tta, zoom, threshold, keep), best = max(scores.items(),
                                             key=lambda item: statistics.fmean(item[1]))
    return {"tta": tta, "tta_zoom": zoom, "threshold": threshold, "keep_largest": keep,
            "mean_val_n_iou": statistics.fmean(best),
            "pooled": pooled_metrics(totals[(tta, zoom, threshold, keep)]),
            "variants": [
                {"tta": t, "tta_zoom": z, "threshold": th, "keep_largest": kl,
                 "mean_val_n_iou": statistics.fmean(values), "val_n_iou_by_fold": values,
                 "pooled_val_n_iou": (pooled_metrics(totals[(t, z, th, kl)]) or {}).get("n_iou")}
                for (t, z, th, kl), values in scores.items()]}


def save_ensemble(run_uri: str, folds: int, summary: dict) -> dict:
    """RUN/model: the fold models as one ensemble averaging their probabilities, with the
    inference (TTA, threshold, components kept) `shared_inference` chooses."""
    import datetime as dt

    from . import model as model_lib

    loaded = [model_lib.load(storage.join(run_uri, f"fold-{k}", "model")) for k in range(folds)]
    chosen = shared_inference([info.inference_variants for _, info in loaded])
    first = loaded[0][1]
    model_lib.save_ensemble([net for net, _ in loaded], storage.join(run_uri, "model"), {
        "prep": first.prep.to_dict(), "classes": model_lib.CLASS_NAMES,
        "threshold": chosen["threshold"],
        "tta": chosen["tta"], "tta_zoom": chosen["tta_zoom"],
        "postprocess": {"keep_largest": chosen["keep_largest"]},
        "training": {"config": summary["config"], "cross_validation": {
            "folds": folds, "data": summary["data"],
            **{k: v for k, v in summary.items() if k.endswith(("_mean", "_std", "_pooled"))},
            "inference_pooled": chosen["pooled"],
            "inference_variants": chosen["variants"]}},
        "data": first.data,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
    return chosen


def _relay(progress, log, config, frame_folds: list[int], folds: int, workers: int,
           parallel: int):
    """Every fold's training progress into the job's gauges and progress line."""
    training_rows = sum(1 for f in frame_folds for k in range(folds) if f != k) // folds
    relay = training.TrainingRelay(
        progress, telemetry.ProgressPrinter(progress, log), config,
        training.steps_per_epoch(training_rows, workers, config), folds=folds, epoch_lines=False,
        parallel=parallel)
    if config.time_limit_min:  # the limit is per fold; folds beyond `parallel` wait their turn
        rounds = -(-folds // parallel)
        progress.deadline = time.time() + 60 * config.time_limit_min * rounds
    return relay


class CoreShare:
    """Called with the folds left whenever one ends: sets `now`, the torch threads per worker
    for the folds training now and next, and posts it to the board the workers read every
    epoch."""

    def __init__(self, board, cpus: float, workers: int, parallel: int, folds: int):
        self.board, self.cpus, self.workers, self.parallel = board, cpus, workers, parallel
        self.now = 0
        self(folds)

    def __call__(self, unfinished: int) -> None:
        self.now = threads_per_worker(self.cpus, self.workers, self.parallel, unfinished)
        try:  # best effort: a job stopping may have left Ray already
            self.board.set_threads.remote(self.now)
        except Exception:
            pass


def threads_per_worker(cpus: float, workers: int, parallel: int, unfinished: int) -> int:
    """Torch threads for each worker of the folds training now and next: the cores over the
    folds that can still run side by side, so the last fold runs alone on all of them."""
    return max(1, int(cpus // (max(1, min(parallel, unfinished)) * workers)))


def _in_parallel(one_fold, folds: int, parallel: int, on_unfinished=None) -> list[dict]:
    """one_fold(k) for every fold, `parallel` at a time; on_unfinished(n) hears how many folds
    are left whenever one ends. Daemon threads, not a thread pool:
    a stopped job must not wait at exit for folds still training on a cluster it does not
    shut down. Once a fold has failed or the job is stopping, folds still waiting for a slot
    do not start: they would train for hours before the failure is reported, or start on a
    Ray already shut down."""
    results: list = [None] * folds
    failures: list = []
    slots = threading.Semaphore(parallel)
    left = {"folds": folds}
    counting = threading.Lock()

    def fold_in_a_slot(k: int) -> None:
        with slots:
            if failures or stopping.state.signal is not None:
                return
            try:
                results[k] = one_fold(k)
            except BaseException as exc:
                failures.append(exc)
            with counting:  # before the slot is released: the next fold starts with the news
                left["folds"] -= 1
                if on_unfinished is not None:
                    on_unfinished(left["folds"])

    threads = [threading.Thread(target=fold_in_a_slot, args=(k,), daemon=True)
               for k in range(folds)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return results


def table(summary: dict) -> str:
    lines = [f"{summary['k']}-fold cross-validation (validation metrics at each fold's last "
             f"epoch)", f"{'fold':>6} | {'n_IoU':>7} | {'n_IoU/img':>9} | {'Dice':>7}",
             "-" * 39]
    for r in summary["folds"]:
        last = r["last"]
        lines.append(f"{r['fold']:>6} | {last['n_iou']:7.4f} | "
                     f"{(last['n_iou_per_image'] or 0):9.4f} | {last['dice']:7.4f}")
    lines.append(f"{'mean':>6} | {summary['last_n_iou_mean']:7.4f} | "
                 f"{summary['last_n_iou_per_image_mean'] or 0:9.4f} |")
    lines.append(f"{'std':>6} | {summary['last_n_iou_std']:7.4f} | "
                 f"{summary['last_n_iou_per_image_std']:9.4f} |")
    whole = summary.get("last_pooled")
    if whole:  # every fold's frames as one set
        lines.append(f"{'pooled':>6} | {whole['n_iou']:7.4f} | "
                     f"{whole['n_iou_per_image'] or 0:9.4f} | {whole['dice']:7.4f}")
    return "\n".join(lines)



