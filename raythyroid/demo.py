"""`raythyroid demo`: the whole pipeline on generated phantoms, on local Ray and local disk.

phantoms -> preprocess -> a short train -> infer with labels on the test split -> the paper's
table and two reports: the infer run's (what it found, the frames to review first) and the
training's (curves, the chosen inference, the worst validation frames).
"""
from __future__ import annotations

import json
import os
import time


from . import infer, phantom, preprocess, shards, storage, train, training
from .imaging import PrepConfig

DEMO_FRAMES = 200
DEMO_SIZE = 128  # small enough to train well in a couple of minutes on two cores
TRAIN_MINUTES = 2.5


def _test_rows(prepared: str, manifest: dict) -> list[dict]:
    return sorted(shards.read_rows(prepared, manifest, "test"), key=lambda r: r["key"])


def run(workdir: str, frames: int = DEMO_FRAMES, seed: int = 0,
        train_minutes: float | None = TRAIN_MINUTES, epochs: int = 60, log=print) -> dict:
    started = time.time()
    workdir = os.path.abspath(workdir)
    data, prepared = f"{workdir}/phantoms", f"{workdir}/prepared"
    run_dir, predictions = f"{workdir}/run", f"{workdir}/predictions"

    log(f"demo 1/4: {frames} phantom ultrasound frames with nodule masks -> {data}")
    if not storage.exists(f"{data}/images"):
        phantom.write_folders(data, frames, seed)
    log("demo 2/4: preprocess (desensitize, CLAHE, resize, split by case)")
    manifest = preprocess.run(data, prepared, config=PrepConfig(size=DEMO_SIZE), log=log)

    limit = f"{train_minutes} minutes or " if train_minutes else ""
    log(f"demo 3/4: train a U-Net on 2 Ray Train workers for up to {limit}{epochs} epochs")
    train.run(prepared, run_dir, training.TrainConfig(epochs=epochs, time_limit_min=train_minutes),
              workers=2, log=log)

    log("demo 4/4: infer on the test split's original frames, with their labels")
    test_rows = _test_rows(prepared, manifest)
    manifest_uri = f"{workdir}/test-frames.txt"
    storage.write_text(manifest_uri, "".join(r["source_uri"] + "\n" for r in test_rows))
    summary = infer.run(f"{run_dir}/model", manifest_uri, predictions, labels=f"{data}/masks",
                        options=infer.InferOptions(workers=1), log=log)
    history = [json.loads(line) for line in
               storage.read_text(f"{run_dir}/history.jsonl").splitlines()]
    reports = {"infer": summary.report, "train": f"{run_dir}/report/index.html"}
    log(f"demo: done in {time.time() - started:.0f} s. Open the reports in a browser:\n"
        f"  what the run found:   {reports['infer']}\n"
        f"  how the model trained: {reports['train']}")
    return {"metrics": summary.metrics, "reports": reports, "history": history,
            "seconds": time.time() - started}
