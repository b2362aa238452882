"""Case-disjoint k-fold cross-validation as one Ray job."""
import io
import json
import os
import statistics
import threading
import time

import numpy as np
import pytest

from raythyroid import cv, metrics, model, runtime, split, storage, training
from raythyroid.errors import UserError


def test_folds_are_case_disjoint_balanced_and_seeded():
    cases = [str(i) for i in range(23)]
    folds = split.folds(cases + cases[:5], 5, seed=1)  # repeated frames of one case
    assert set(folds) == set(cases)
    sizes = sorted(list(folds.values()).count(k) for k in range(5))
    assert sizes == [4, 4, 5, 5, 5]
    assert folds == split.folds(reversed(cases), 5, seed=1)
    assert folds != split.folds(cases, 5, seed=2)


def test_a_failed_fold_keeps_waiting_folds_from_starting():
    """Folds run two at a time: once one fails, those still waiting for a slot must not start
    (each would train for hours before the job reports the failure)."""
    started = []
    second_running = threading.Event()

    def one_fold(k: int) -> dict:
        started.append(k)
        if k == 0:
            second_running.wait(10)
            raise RuntimeError("fold 0 broke")
        second_running.set()
        time.sleep(0.2)  # still running when fold 0 fails
        return {"fold": k}

    with pytest.raises(RuntimeError, match="fold 0 broke"):
        cv._in_parallel(one_fold, folds=5, parallel=2)
    assert sorted(started) == [0, 1]



def test_folds_left_training_take_the_cores_of_finished_folds():
    """Five folds two at a time on 2 cores: one thread per worker while two folds run, both
    cores for the last fold once the one beside it has finished, not one core idle to the end."""
    heard, lock = [], threading.Lock()

    def one_fold(k: int) -> dict:
        time.sleep(0.05 * (k % 3))  # folds end in an order of their own
        return {"fold": k}

    def on_unfinished(n: int) -> None:
        with lock:
            heard.append(n)

    assert cv._in_parallel(one_fold, folds=5, parallel=2, on_unfinished=on_unfinished) == [
        {"fold": k} for k in range(5)]
    assert heard == [4, 3, 2, 1, 0]
    assert [cv.threads_per_worker(2, 1, 2, n) for n in heard] == [1, 1, 1, 2, 2]
    # 16 cores, two workers per fold, three folds at a time: 2 threads each, then 4, then 8
    assert [cv.threads_per_worker(16, 2, 3, n) for n in (5, 3, 2, 1)] == [2, 2, 4, 8]


def fold_rows(*vectors) -> list[dict]:
    """History rows as training writes them, one per epoch, from Totals vectors (None: a row
    from before rows kept their totals)."""
    rows = []
    for epoch, vector in enumerate(vectors, 1):
        scored = metrics.Totals.from_vector(vector).metrics() if vector else {"n_iou": 0.5}
        row = {"epoch": epoch, **{f"val_{k}": scored.get(k) for k in cv.REPORTED}}
        if vector:
            row["val_totals"] = vector
        rows.append(row)
    return rows


def test_a_fold_keeps_the_totals_of_its_last_and_its_best_epoch():
    first, best, last = ([10, 2, 3, 5, 0.5, 1, 1], [10, 1, 1, 8, 0.8, 1, 1],
                         [10, 3, 1, 6, 0.6, 1, 1])
    history = fold_rows(first, best, last)
    state = training.TrainState(epoch=3, history=history,
                             best={"epoch": 2, "val": metrics.Totals.from_vector(best).metrics()})
    fold = cv._fold_metrics(state)
    assert (fold["last_totals"], fold["best_totals"], fold["best_epoch"]) == (last, best, 2)
    assert fold["best"]["n_iou"] == pytest.approx(8 / 10)
    assert fold["last"]["n_iou"] == pytest.approx(6 / 10)
    # a best epoch trained before rows kept their totals (a run resumed across versions)
    state.history = fold_rows(first, None, last)
    assert cv._fold_metrics(state)["best_totals"] is None


def test_the_ensemble_uses_only_variants_every_fold_scored():
    """Folds kept from a version before the zoomed-out view scored no zoomed variant: the
    ensemble then chooses among the variants all folds have, and the best mean wins."""
    def variant(tta, zoom, score):
        return {"tta": tta, "tta_zoom": zoom, "threshold": 0.5, "keep_largest": 0,
                "val_n_iou": score}

    old = [{k: v for k, v in variant(True, 0.0, 0.60).items() if k != "tta_zoom"},
           variant(False, 0.0, 0.58)]  # no tta_zoom key at all, as written then
    new = [variant(True, 0.0, 0.62), variant(False, 0.0, 0.66), variant(True, 0.8, 0.90)]
    chosen = cv.shared_inference([old, new])
    assert (chosen["tta"], chosen["tta_zoom"]) == (False, 0.0)  # mean 0.62 over 0.61
    assert len(chosen["variants"]) == 2 and chosen["mean_val_n_iou"] == pytest.approx(0.62)
    chosen = cv.shared_inference([new, new])
    assert (chosen["tta"], chosen["tta_zoom"]) == (True, 0.8)


def test_pooled_figures_sum_the_folds_and_need_every_fold():
    """Two folds pooled: their pixels summed, not their ratios averaged. A fold kept from a
    version that had no totals leaves the pooled figures out, not wrong."""
    small, large = [900, 3, 3, 4, 0.4, 1, 1], [900, 10, 10, 80, 0.8, 1, 1]
    folds = [{"fold": k, "val_images": 1, "epochs": 1, "best_epoch": 1,
              "last": {key: metrics.Totals.from_vector(v).metrics().get(key)
                       for key in cv.REPORTED},
              "best": {key: None for key in cv.REPORTED},
              "last_totals": v, "best_totals": None} for k, v in enumerate((small, large))]
    config = training.TrainConfig()
    summary = cv.summarize(folds, 2, "data", config)
    assert summary["last_pooled"]["n_iou"] == pytest.approx((4 + 80) / (4 + 6 + 80 + 20))
    assert summary["last_n_iou_mean"] == pytest.approx((0.4 + 0.8) / 2)
    assert summary["last_pooled"]["n_iou_per_image"] == pytest.approx(0.6)
    assert summary["best_pooled"] is None  # a fold without totals
    assert "pooled" in cv.table(summary)
    # totals kept by field name (this version) pool exactly as the bare vectors did
    named = [dict(f, last_totals=metrics.Totals.from_vector(f["last_totals"]).to_record())
             for f in folds]
    assert cv.summarize(named, 2, "data", config)["last_pooled"] == summary["last_pooled"]
    folds[1]["last_totals"] = None
    older = cv.summarize(folds, 2, "data", config)
    assert older["last_pooled"] is None and "pooled" not in cv.table(older)


@pytest.mark.timeout(120)
def test_a_worker_takes_the_threads_the_driver_posts(ray_local):
    import torch

    from raythyroid import telemetry

    before = torch.get_num_threads()
    board = telemetry.board()
    try:
        assert training.follow_threads(board) == before  # nothing posted: the count stays
        wanted = 1 if before > 1 else 2  # at most this node's CPUs (the test's Ray has 2+)
        ray_local.get(board.set_threads.remote(wanted))
        assert training.follow_threads(board) == wanted == torch.get_num_threads()
        assert training.follow_threads(None) == wanted  # a run without a board keeps its count
    finally:
        torch.set_num_threads(before)


def test_init_from_a_model_of_another_width_is_refused_with_the_flag():
    with pytest.raises(UserError, match="--base 16"):
        training.initial_weights(training.TrainConfig(base=8, init="ddti"))
    assert training.initial_weights(training.TrainConfig()) is None
    weights = training.initial_weights(training.TrainConfig(init="ddti", deep_supervision=2))
    net = model.build(model.UNetConfig(deep_supervision=2))
    import torch
    missing, unexpected = net.load_state_dict(torch.load(io.BytesIO(weights)), strict=False)
    assert unexpected == [] and missing and all(k.startswith("aux.") for k in missing)


@pytest.mark.timeout(1200)
def test_k_fold_cv_on_phantoms(ray_local, phantom_dataset, tmp_path):
    _, prepared = phantom_dataset
    run_uri = str(tmp_path / "cv")
    # two folds; the dealing for any k is checked by the test above. Every fold starts from
    # the bundled model's first member (--init; its frames are 256 px, these 128: a U-Net
    # does not mind)
    config = training.TrainConfig(epochs=1, batch_size=8, init="ddti")
    summary = cv.run(prepared, run_uri, config, folds=2, workers=1, cpus_per_worker=0.5,
                     log=lambda *_: None)
    assert [r["fold"] for r in summary["folds"]] == list(range(2))
    assert sum(r["val_images"] for r in summary["folds"]) == 85 + 21  # train + val, each once
    for key in ("n_iou", "n_iou_per_image"):
        values = [r["last"][key] for r in summary["folds"]]
        assert summary[f"last_{key}_mean"] == pytest.approx(sum(values) / 2)
        assert summary[f"last_{key}_std"] == pytest.approx(statistics.pstdev(values))
    # every fold's frames as one set: the folds' confusion totals summed, each fold's own
    # totals giving back its figures; a pixel-weighted mean lies between the folds' figures
    for which in ("last", "best"):
        folds_totals = [metrics.Totals.read(r[f"{which}_totals"]) for r in summary["folds"]]
        for r, totals in zip(summary["folds"], folds_totals):
            assert totals.metrics()["n_iou"] == pytest.approx(r[which]["n_iou"])
        assert sum(t.images for t in folds_totals) == 85 + 21
        tp = sum(t.tp for t in folds_totals)
        assert summary[f"{which}_pooled"]["n_iou"] == pytest.approx(
            tp / sum(t.tp + t.fp + t.fn for t in folds_totals))
    assert "pooled" in cv.table(summary)
    saved = json.loads(storage.read_text(f"{run_uri}/cv.json"))
    assert saved["k"] == 2 and saved["last_pooled"] == summary["last_pooled"]
    assert saved["inference_pooled"] == summary["inference_pooled"]
    start, _ = model.load(model.resolve("ddti"), first_member_only=True)
    random = model.build(start.config).down[0][0].weight
    cpus = runtime.cluster_cpus()
    shares = {cv.threads_per_worker(cpus, 1, 2, 2), cv.threads_per_worker(cpus, 1, 2, 1)}
    for k in range(2):
        fold_model, info = model.load(f"{run_uri}/fold-{k}/model")
        assert info.training["config"]["init"] == "ddti"
        # one epoch of a few AdamW steps moves a weight by about the learning rate each
        moved = (fold_model.down[0][0].weight - start.down[0][0].weight).abs().max()
        assert moved < 0.03 < (random - start.down[0][0].weight).abs().mean()
        history = [json.loads(line) for line in
                   storage.read_text(f"{run_uri}/fold-{k}/history.jsonl").splitlines()]
        # the threads it trained with: the cores over the two folds, or all of them once the
        # fold beside it has finished
        assert {row["threads"] for row in history} <= shares
    assert "n_IoU" in cv.table(summary)
    check_fold_ensemble(run_uri, prepared, folds=2)
    page = storage.read_text(f"{run_uri}/report/index.html")  # the per-fold table and spread
    assert page.count("<tr><td>") >= 2 + 2 and "spread (sd)" in page and "chosen" in page
    assert storage.read_bytes(f"{run_uri}/report/folds.png").startswith(b"\x89PNG")

    # a rerun trains only the folds that did not finish
    os.remove(f"{run_uri}/fold-1/fold.json")
    kept = {k: os.path.getmtime(f"{run_uri}/fold-{k}/fold.json") for k in (0,)}
    again = cv.run(prepared, run_uri, config, folds=2, workers=1, cpus_per_worker=0.5,
                   log=lambda *_: None)
    assert {k: os.path.getmtime(f"{run_uri}/fold-{k}/fold.json") for k in kept} == kept
    assert storage.exists(f"{run_uri}/fold-1/fold.json")
    assert [r["val_images"] for r in again["folds"]] == [r["val_images"]
                                                         for r in summary["folds"]]


def check_fold_ensemble(run_uri: str, prepared: str, folds: int) -> None:
    """RUN/model averages the fold models' probabilities, stored in fp16, and runs the
    inference variant with the best mean validation score over the folds."""
    import torch

    from raythyroid import imaging, model, shards

    ensemble, info = model.load(f"{run_uri}/model")
    assert isinstance(ensemble, model.Ensemble) and len(ensemble.members) == folds
    members = [model.load(f"{run_uri}/fold-{k}/model")[0] for k in range(folds)]
    rows = shards.read_rows(prepared, shards.read_manifest(prepared), "test")[:4]
    images = torch.from_numpy(np.stack([imaging.decode_png(r["image"]) for r in rows]))
    each = [model.nodule_probability(m, images, torch.device("cpu")) for m in members]
    # the members differ by more than fp16 storage moves them (5e-3), or this proves nothing
    assert (each[0] - each[1]).abs().max() > 0.05
    together = model.nodule_probability(ensemble, images, torch.device("cpu"))
    assert torch.allclose(together, sum(each) / folds, atol=5e-3)
    first, _ = model.load(f"{run_uri}/model", first_member_only=True)
    assert torch.allclose(model.nodule_probability(first, images, torch.device("cpu")), each[0],
                          atol=5e-3)
    variants = info.training["cross_validation"]["inference_variants"]
    chosen = max(variants, key=lambda v: v["mean_val_n_iou"])
    assert (info.inference.tta, info.inference.tta_zoom, info.inference.post.threshold,
            info.inference.post.keep_largest) == (
        chosen["tta"], chosen["tta_zoom"], chosen["threshold"], chosen["keep_largest"])
    assert all(len(v["val_n_iou_by_fold"]) == folds for v in variants)
    # each fold's variants keep the totals behind their scores; the chosen one's, summed over
    # the folds, give the ensemble's pooled figure
    summed = metrics.Totals()
    for k in range(folds):
        fold_meta = json.loads(storage.read_text(f"{run_uri}/fold-{k}/model/model.json"))
        for v in fold_meta["training"]["inference_variants"]:
            assert metrics.Totals.read(v["val_totals"]).metrics()["n_iou"] == \
                pytest.approx(v["val_n_iou"])
            if (v["tta"], v["tta_zoom"], v["threshold"], v["keep_largest"]) == (
                    chosen["tta"], chosen["tta_zoom"], chosen["threshold"],
                    chosen["keep_largest"]):
                summed += metrics.Totals.read(v["val_totals"])
    fp, fn, tp = summed.fp, summed.fn, summed.tp
    pooled = info.training["cross_validation"]["inference_pooled"]
    assert pooled["n_iou"] == pytest.approx(tp / (tp + fp + fn)) == chosen["pooled_val_n_iou"]
