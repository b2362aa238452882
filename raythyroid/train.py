"""The train job: DDP U-Net on Ray Train, checkpointed under RUN, resumable.

Data: the preprocess shards (of one prepared set, or of several trained on as one: every set's
train parts train, val parts validate, test parts test) are decoded once (and the loss weight map
computed once per mask) into a materialized Ray dataset; workers read their train shard with
iter_torch_batches. Validation and test sets are given whole to every worker, and each worker
scores the rows whose key hashes to its rank, so every row is scored exactly once; the
per-worker confusion counts are all-reduced.

Every checkpoint holds the latest state (to resume) and the best weights so far (by val n_iou),
plus the epoch history, so the latest checkpoint alone is enough to resume or to finish. RUN gets:
  checkpoints/  Ray Train's storage (resume by rerunning the same command)
  model/        best weights + model.json
  history.jsonl one line per epoch
  metrics.json  test-split metrics; written last, so its presence means the run is finished
"""
from __future__ import annotations

import json
from typing import Sequence

from . import metrics, registry, shards, storage, telemetry
from .errors import UserError
from .training import TrainConfig, check_resume, check_same_data, load_split, train_and_save


def run(data: str | Sequence[str], run_uri: str, config: TrainConfig = TrainConfig(),
        workers: int = 2, gpu: bool = False, cpus_per_worker: float | None = None, log=print,
        metrics_port: int | None = None, register: str | None = None) -> dict:
    """Train (or resume, or report a finished run) and return the test metrics. `data` is a
    preprocess output, or several trained on as one (shards.PreparedData). A run that
    finishes here is logged to MLflow when MLFLOW_TRACKING_URI is set or `register` names the
    registered model it becomes a new version of."""
    # the total is known once the training split is counted, in optimizer steps
    with telemetry.tracked("train", storage.basename(run_uri), metrics_port, 0,
                           unit="steps") as progress:
        return _run(data, run_uri, config, workers, gpu, cpus_per_worker, log, progress,
                    register)


def _run(data, run_uri, config, workers, gpu, cpus_per_worker, log, progress,
         register=None) -> dict:
    run_uri = storage.normalize(run_uri)
    finished = storage.join(run_uri, "metrics.json")
    if storage.exists(finished):
        result = json.loads(storage.read_text(finished))
        log(f"train: {run_uri} is already finished; nothing to do")
        log(metrics.table(result, "test split (from metrics.json)"))
        return result
    data = shards.read_prepared(data)
    if not data.count("train"):
        raise UserError(f"{data.name} has no training rows")
    if not data.count("val"):
        raise UserError(f"{data.name} has no validation rows; preprocess with a val "
                        f"fraction > 0")
    check_same_data(run_uri, data.uris)
    check_resume(run_uri, config)
    state = train_and_save(run_uri, config, lambda: _datasets(data, config, log), data,
                           workers, gpu, cpus_per_worker, log, progress)
    if register or registry.enabled():
        registry.log_finished("train", run_uri, dict(config.to_dict(), data=data.param,
                                                     workers=workers), state.history,
                              register, log)
    return state.test or {}


def _datasets(data: shards.PreparedData, config: TrainConfig, log) -> dict:
    """The decoded splits of the prepared sets (each set's train, val and test parts
    together), as train reads them."""
    weighted = config.loss == "weighted-ce"
    log(f"train: decoding {data.count('train')} training pairs"
        + (f" from {len(data.sets)} prepared sets" if len(data.sets) > 1 else "")
        + (" and computing boundary weight maps" if weighted else ""))
    datasets = {"train": load_split(data, "train", with_weights=weighted),
                "val": load_split(data, "val", full=True)}
    test = load_split(data, "test", full=True)
    if test is not None:
        datasets["test"] = test
    return datasets
