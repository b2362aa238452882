"""The driver side: Ray Train started over decoded datasets, the workers' progress relayed to
the job's gauges and terminal, and the model folder written when training ends."""
from __future__ import annotations

import json
import time
from dataclasses import asdict

from .. import metrics, report, runtime, shards, storage, telemetry
from .checkpoints import (CHECKPOINT_DIR, TrainState, finished_state, has_checkpoint,
                          initial_weights, load_state, save_model, state_uri)
from .config import TIME_LIMITED_EPOCHS, TrainConfig
from .loop import WorkerConfig, train_loop_per_worker


def epoch_line(row: dict, epochs: int, best: float) -> str:
    of_total = "" if epochs >= TIME_LIMITED_EPOCHS else f"/{epochs}"
    return (f"epoch {row['epoch']}{of_total}  loss {row['train_loss']:.4f}  val n_IoU "
            f"{row['val_n_iou']:.4f} (best {best:.4f})  {row['images_per_s']:.1f} img/s  "
            f"lr {row['lr']:.2e}")


def train_and_save(run_uri: str, config: TrainConfig, datasets, data: shards.PreparedData,
                   workers: int, gpu: bool, cpus_per_worker: float | None, log, progress,
                   job: str = "train", extra: dict | None = None,
                   write_metrics: bool = True) -> "TrainState":
    """Fit on `datasets()` (called only when there is training left to do) while the driver
    relays the workers' progress, then write RUN's model (with `extra` in its model.json),
    history, metrics.json (the test split; unless `write_metrics` is off) and report. A run
    whose training had ended is finished from its last checkpoint without workers."""
    state = finished_state(run_uri)
    if state is None:
        started = time.time()  # the time limit counts decoding too
        state = _fit_relayed(datasets(), run_uri, config, workers, gpu, cpus_per_worker,
                             started, log, progress)
    else:
        log(f"{job}: training had ended (epoch {state.epoch}); writing the model")
    progress.reach(progress.done, total=progress.done)  # a time limit may end it early
    save_model(run_uri, state, config, workers, gpu, data, extra)
    test_metrics = state.test or {}
    if write_metrics:
        storage.write_text(storage.join(run_uri, "metrics.json"),
                           json.dumps(test_metrics, indent=2))
    from .. import model as model_lib

    best, chosen = state.best, state.inference
    log(f"{job}: best epoch {best['epoch']} of {state.epoch} (val n_IoU "
        f"{best['val']['n_iou']:.4f}); inference: tta="
        f"{model_lib.describe_tta(chosen['tta'], chosen['tta_zoom'])}, threshold="
        f"{chosen['postprocess']['threshold']}, keep_largest="
        f"{chosen['postprocess']['keep_largest']} (chosen on validation); model in "
        f"{storage.join(run_uri, 'model')}")
    if write_metrics:
        log(metrics.table(test_metrics, "test split, best model"))
    log(f"{job}: report: {report.write_at_end(run_uri)}")
    return state


def _fit_relayed(datasets, run_uri, config, workers, gpu, cpus_per_worker, started, log,
                 progress) -> "TrainState":
    """Fit while the driver relays the workers' progress."""
    board = telemetry.board()
    relay = TrainingRelay(progress, telemetry.ProgressPrinter(progress, log), config,
                          steps_per_epoch(datasets["train"].count(), workers, config))
    return telemetry.run_watched(
        lambda: fit(datasets, run_uri, config, workers, gpu, cpus_per_worker, started, log,
                    board=board), board, relay)


def fit(datasets: dict, run_uri: str, config: TrainConfig, workers: int, gpu: bool,
        cpus_per_worker: float | None, started: float, log=print,
        threads: int | None = None, board=None, fold: int | None = None) -> dict:
    """Ray Train over `datasets` (train, val, optional test) with checkpoints under run_uri;
    returns the final state (history, best weights and val metrics, test metrics)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    deadline = started + 60 * config.time_limit_min if config.time_limit_min else None
    cpus_per_worker, planned_threads = runtime.plan_workers(workers, gpu, cpus_per_worker)
    threads = threads or planned_threads
    resources = {"CPU": cpus_per_worker}
    if gpu:
        resources["GPU"] = 1
    fs, path = storage.filesystem(run_uri)
    storage.make_dirs(run_uri)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dict(asdict(WorkerConfig(
            train=config.to_dict(), threads=threads, run_name=storage.basename(run_uri),
            started=started, deadline=deadline, has_test="test" in datasets, fold=fold,
            # a checkpoint outranks --init; a resumed run need not find that model again
            initial_weights=None if has_checkpoint(run_uri) else initial_weights(config))),
            board=board),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=CHECKPOINT_DIR, storage_path=path, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=3),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    log(f"train: {workers} worker(s), {'GPU' if gpu else 'CPU'}, {threads} thread(s) each; "
        f"checkpoints under {storage.join(run_uri, CHECKPOINT_DIR)}")
    result = trainer.fit()
    if result.error:
        raise result.error
    return TrainState.from_dict(load_state(state_uri(result.checkpoint)))


def steps_per_epoch(train_rows: int, workers: int, config: TrainConfig) -> int:
    """Optimizer steps in one epoch: each worker gets an equal share, whole batches only."""
    return max(1, train_rows // workers // config.batch_size)


class TrainingRelay:
    """The driver's side of training progress: rank 0's posts (telemetry.ProgressBoard) ->
    the job's gauges, the progress line and, for a plain train, one line per epoch. For cv,
    one relay counts every fold's steps (`folds`, several may run at once)."""

    def __init__(self, progress, printer, config: TrainConfig, per_epoch: int, folds: int = 1,
                 epoch_lines: bool = True, parallel: int = 1):
        self.progress, self.printer, self.config = progress, printer, config
        self.per_epoch, self.folds, self.epoch_lines = per_epoch, folds, epoch_lines
        self.parallel = parallel  # folds training at once: the cadence is each one's
        self.done_by_fold: dict = {}
        self.steps_per_s = 0.0  # the training cadence (validation included), from the epochs
        progress.estimating = True  # until an epoch of this run gives the cadence
        progress.reach(0, total=self.planned())

    def planned(self) -> int:
        return self.config.epochs * self.per_epoch * self.folds

    def __call__(self, events: list[dict]) -> None:
        lines = []
        for event in events:
            fold = event.get("fold")
            if event.get("deadline") and self.folds == 1:
                self.progress.deadline = event["deadline"]
            if event["kind"] == "step":
                done = (event["epoch"] - 1) * self.per_epoch + event["step"]
            elif event["kind"] == "finished":  # a fold an earlier run completed
                done = event["epochs"] * self.per_epoch
                self.progress.baseline += done
            else:
                row = event["row"]
                self.per_epoch = event["steps"] or self.per_epoch
                done = row["epoch"] * self.per_epoch
                if row.get("epoch_seconds"):
                    self.steps_per_s = self.per_epoch / row["epoch_seconds"]
                if self.epoch_lines:
                    lines.append(epoch_line(row, self.config.epochs, event["best"]))
            if fold not in self.done_by_fold and done > self.per_epoch \
                    and event["kind"] != "finished":
                # a resumed run: the epochs before it are not this run's speed
                self.progress.baseline += done - (done % self.per_epoch or self.per_epoch)
            self.done_by_fold[fold] = done
        if not events:
            return
        self.progress.estimating = self.steps_per_s <= 0
        self.progress.touch()
        done = sum(self.done_by_fold.values())
        self.progress.reach(done)  # the rate below counts it
        total = self.planned()
        if self.progress.deadline is not None and self.steps_per_s > 0:
            # a time-limited run: what fits in the time left at the epochs' cadence
            left = max(0.0, self.progress.deadline - time.time())
            total = min(total, done + int(self.steps_per_s * self.parallel * left))
        self.progress.reach(done, total=max(total, done))
        for line in lines:
            self.printer.say(line)
        self.printer.update()
