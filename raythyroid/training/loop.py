"""The worker side of Ray Train: set up, one epoch after another, validation, checkpoints,
and the end of training (best weights, the chosen inference, the test split)."""
from __future__ import annotations

import functools
import io
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass

from .. import losses, telemetry
from .checkpoints import STATE_FILE, TrainState, load_state, state_uri
from .config import TrainConfig
from .validation import choose_inference, evaluate


PROGRESS_EVERY_S = 2.0  # how often rank 0 tells the driver its step within the epoch


def _lr_factor(schedule: str, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return (1 - progress) ** 0.9


class WeightAverage:
    """Exponential moving average of a model's weights (BatchNorm statistics included).

    The decay warms up as (1 + n) / (10 + n) over the first steps, so that the average is not
    dominated by the random initial weights in short runs.
    """

    def __init__(self, module, decay: float, state: dict | None = None):
        import copy

        self.decay = decay
        self.steps = 0
        self.model = copy.deepcopy(module).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if state is not None:
            self.model.load_state_dict(state["weights"])
            self.steps = state["steps"]

    def update(self, module) -> None:
        import torch

        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        with torch.no_grad():
            for mine, live in zip(self.model.state_dict().values(),
                                  module.state_dict().values()):
                if mine.dtype.is_floating_point:
                    mine.lerp_(live, 1 - decay)
                else:
                    mine.copy_(live)

    def state(self) -> dict:
        return {"weights": {k: v.detach().cpu().clone()
                            for k, v in self.model.state_dict().items()},
                "steps": self.steps}


def _broadcast(values: list[float]) -> list[float]:
    """Rank 0's decision (stop? schedule progress?) for every rank, so DDP stays in step."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(tensor, src=0)
    return tensor.tolist()


def _mean_over_workers(value: float, count: int) -> float:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value * count, count], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return float(tensor[0] / max(tensor[1], 1.0))


@dataclass(frozen=True)
class WorkerConfig:
    """What the driver tells every worker (Ray Train hands it over as a dict)."""

    train: dict  # TrainConfig.to_dict()
    threads: int
    run_name: str
    started: float
    deadline: float | None
    has_test: bool
    fold: int | None = None  # cv's fold, for the progress the driver shows
    initial_weights: bytes | None = None  # initial_weights(): --init, for a run's first start


@dataclass
class Worker:
    """One training worker, set up: what every step of its loop uses."""

    config: TrainConfig
    rank: int
    world: int
    device: object
    bf16: bool
    net: object  # the network being trained (DDP-wrapped with several workers)
    optimizer: object
    average: WeightAverage | None
    train_shard: object
    val_set: object
    test_set: object | None
    run_name: str
    started: float
    deadline: float | None
    board: object = None  # telemetry.ProgressBoard: where rank 0 posts progress for the driver
    fold: int | None = None

    def post(self, kind: str, **values) -> None:
        """Progress for the driver (rank 0 only; fire and forget)."""
        if self.board is not None and self.rank == 0:
            self.board.post.remote(dict(values, kind=kind, fold=self.fold,
                                        deadline=self.deadline))

    @property
    def scored(self):
        """The weights that are validated, kept as best, tested and shipped."""
        return self.average.model if self.average is not None else self.net


def train_loop_per_worker(cfg: dict) -> None:
    board = cfg.pop("board", None)
    worker, state, restored_from = _set_up(WorkerConfig(**cfg), board)
    # a resumed run knows its epochs' length: the time limit holds for its first epoch too
    epoch_seconds = state.history[-1]["epoch_seconds"] if state.history else None
    while not state.finished and state.epoch < worker.config.epochs:
        epoch_started = time.time()
        threads = follow_threads(worker.board)
        lr = _learning_rate(worker, state, epoch_seconds)
        if lr is None:
            break
        epoch = state.epoch + 1
        train_loss, steps, images_per_s = _train_epoch(worker, epoch, lr)
        val = evaluate(worker.scored, worker.val_set, worker.rank, worker.world, worker.device,
                       worker.bf16, worker.config.batch_size * 2, with_totals=True)
        epoch_seconds = time.time() - epoch_started
        row = {"epoch": epoch, "train_loss": train_loss, "lr": lr,
               "images_per_s": images_per_s, "epoch_seconds": epoch_seconds,
               "elapsed_seconds": time.time() - worker.started, "workers": worker.world,
               "threads": threads, "precision": "bf16" if worker.bf16 else "fp32"}
        if restored_from is not None:
            row["resumed_from_epoch"], restored_from = restored_from, None
        _record_epoch(worker, state, row, val, steps)
        worker.post("epoch", row=row, steps=steps, best=state.best["val"]["n_iou"])
        _report(worker, state, row)
    if not state.finished:
        _finish(worker, state)


def follow_threads(board) -> int:
    """The torch threads this worker runs for its next epoch: what the driver last posted to
    the board, else what it runs now. cv starts its last folds while others still train; when
    those finish, the folds left take their cores at the next epoch instead of training on one
    thread beside an idle core to the end."""
    import ray
    import torch

    if board is not None:
        try:
            wanted = ray.get(board.threads.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            wanted = None  # the count stays; the epoch goes on
        if wanted:
            # the driver counts the cluster's CPUs; this node may have fewer
            wanted = min(wanted, _cores_here())
        if wanted and wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
    return torch.get_num_threads()


@functools.cache
def _cores_here() -> int:
    """This worker's share of its node's Ray CPUs: the node's over the run's workers on it."""
    import ray
    import ray.train

    here = ray.get_runtime_context().get_node_id()
    cpus = next((node["Resources"].get("CPU", 1.0) for node in ray.nodes()
                 if node["NodeID"] == here), 1.0)
    try:
        beside = ray.train.get_context().get_local_world_size()
    except RuntimeError:  # not inside a training function: nothing shares the node's CPUs
        beside = 1
    return max(1, int(cpus // beside))


def _set_up(cfg: WorkerConfig, board=None) -> tuple[Worker, TrainState, int | None]:
    """Threads, device, precision, the network and optimizer (restored from the latest
    checkpoint when there is one), the weight average and this worker's data."""
    import ray.data
    import ray.train
    import ray.train.torch
    import torch

    from .. import model as model_lib

    config = TrainConfig(**cfg.train)
    # one line per epoch from rank 0 says what matters; Ray's per-report INFO lines drown it
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.train.get_context()
    torch.set_num_threads(cfg.threads)
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)
    net = model_lib.build(config.architecture)
    if cfg.initial_weights is not None:  # deep supervision's heads (aux.*) start fresh
        net.load_state_dict(torch.load(io.BytesIO(cfg.initial_weights), weights_only=True),
                            strict=False)
    net = net.to(device)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(net.parameters(), lr=config.learning_rate, momentum=0.99,
                                    nesterov=True, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate,
                                      weight_decay=config.weight_decay)
    state, averaged, restored_from = _restore(net, optimizer)
    _continue_the_clock(state, cfg)
    # an average from a run resumed without --ema is dropped, not carried along
    average = WeightAverage(net, config.ema, averaged) if config.ema > 0 else None
    worker = Worker(
        config=config, rank=context.get_world_rank(), world=context.get_world_size(),
        device=device, bf16=model_lib.resolve_bf16(config.precision, device),
        net=ray.train.torch.prepare_model(net), optimizer=optimizer, average=average,
        train_shard=ray.train.get_dataset_shard("train"),
        val_set=ray.train.get_dataset_shard("val"),
        test_set=ray.train.get_dataset_shard("test") if cfg.has_test else None,
        run_name=cfg.run_name, started=state.origin,
        deadline=state.origin + (cfg.deadline - cfg.started) if cfg.deadline else None,
        board=board, fold=cfg.fold)
    return worker, state, restored_from


def _continue_the_clock(state: TrainState, cfg: WorkerConfig) -> None:
    """A rerun after a stop continues the time budget and the schedule where the last
    checkpoint left them; a restart of the workers within one run keeps its clock."""
    if state.session != cfg.started:
        spent = state.history[-1]["elapsed_seconds"] if state.history else 0.0
        state.origin, state.session = cfg.started - spent, cfg.started


def _restore(net, optimizer) -> tuple[TrainState, dict | None, int | None]:
    """(state, saved weight average, epoch restored from) of the latest checkpoint, loading
    its weights and optimizer state in place; a fresh state without one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return TrainState(), None, None
    saved = load_state(state_uri(checkpoint))
    net.load_state_dict(saved.pop("model"))
    optimizer.load_state_dict(saved.pop("optimizer"))
    state = TrainState.from_dict(saved)
    return state, saved.get("ema"), state.epoch


def _learning_rate(worker: Worker, state: TrainState, epoch_seconds: float | None
                   ) -> float | None:
    """This epoch's learning rate, set on the optimizer; None when the time limit leaves no
    room for another epoch. Rank 0 decides for all, so DDP stays in step."""
    config, now = worker.config, time.time()
    progress = state.epoch / config.epochs
    stop = 0.0
    if worker.deadline:
        progress = max(progress, (now - worker.started) / (worker.deadline - worker.started))
        if epoch_seconds and state.epoch > 0 and now + 1.5 * epoch_seconds > worker.deadline:
            stop = 1.0
    progress, stop = _broadcast([progress, stop])
    if stop:
        return None
    lr = config.learning_rate * _lr_factor(config.schedule, progress)
    for group in worker.optimizer.param_groups:
        group["lr"] = lr
    return lr


def _train_epoch(worker: Worker, epoch: int, lr: float) -> tuple[float, int, float]:
    """One pass over this worker's shard -> (mean loss over all workers, this worker's steps,
    images per second over all workers)."""
    import torch

    from .. import augment, model as model_lib

    config = worker.config
    weighted = config.loss == "weighted-ce"
    augmentation = augment.preset(config.augment)
    worker.net.train()
    loss_sum, steps, seen = 0.0, 0, 0
    started = posted = time.time()
    for b, batch in enumerate(worker.train_shard.iter_torch_batches(
            batch_size=config.batch_size, local_shuffle_buffer_size=4 * config.batch_size,
            local_shuffle_seed=config.seed * 1000 + epoch, drop_last=True, dtypes=None)):
        images, masks = batch["image"].numpy(), batch["mask"].numpy()
        weights = batch["weight"].numpy() if weighted else None
        soft = batch["soft"].numpy() if "soft" in batch else None  # a teacher's (distill)
        if augmentation is not None:
            images, masks, weights, *soft = augment.augment_batch(
                images, masks, weights, augment.batch_rng(config.seed, epoch, worker.rank, b),
                augmentation, soft=soft)
            soft = soft[0] if soft else None
        x = model_lib.as_input(torch.from_numpy(images), worker.device)
        target = torch.from_numpy(masks).long().to(worker.device)
        weight = torch.from_numpy(weights).float().to(worker.device) if weighted else None
        with model_lib.autocast(worker.device, worker.bf16):
            outputs = worker.net(x)
        if soft is None:
            loss = losses.supervised(config.loss, outputs, target, weight)
        else:
            loss = losses.distilled(
                config.loss, outputs, target, weight,
                torch.from_numpy(soft).to(worker.device).float() / 255.0,
                batch["labelled"].to(worker.device).bool(), config.soft_weight,
                config.temperature)
        worker.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        worker.optimizer.step()
        if worker.average is not None:
            worker.average.update(model_lib.unwrapped(worker.net))
        loss_sum += float(loss.detach())
        steps += 1
        seen += images.shape[0]
        if time.time() - posted >= PROGRESS_EVERY_S:
            worker.post("step", epoch=epoch, step=steps)
            posted = time.time()
    seconds = time.time() - started
    train_loss = _mean_over_workers(loss_sum / max(steps, 1), steps)
    images_per_s = _mean_over_workers(seen / max(seconds, 1e-9), 1) * worker.world
    return train_loss, steps, images_per_s


def _record_epoch(worker: Worker, state: TrainState, row: dict, val: dict, steps: int) -> None:
    """The epoch into the history, the best weights so far, and the gauges."""
    from .. import model as model_lib

    row.update({f"val_{k}": v for k, v in val.items() if k != "hist"})  # totals included
    val = {k: v for k, v in val.items() if k != "totals"}
    if math.isnan(row["train_loss"]):
        row["diverged"] = True
    if state.best is None or val["n_iou"] > state.best["val"]["n_iou"]:
        module = model_lib.unwrapped(worker.scored)
        state.best = {"epoch": row["epoch"], "val": val,
                      "model": {k: v.detach().cpu().clone()
                                for k, v in module.state_dict().items()}}
    state.epoch = row["epoch"]
    state.history.append(row)
    if worker.rank != 0:
        return
    telemetry.train_epoch(worker.run_name, steps * worker.world, row["train_loss"],
                          row["images_per_s"], val["n_iou"], row["epoch"])


def _report(worker: Worker, state: TrainState, row: dict) -> None:
    """Report to Ray Train; rank 0 attaches the checkpoint (state, weights, optimizer)."""
    import ray.train
    import torch

    from .. import model as model_lib

    if worker.rank != 0:
        ray.train.report(row, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        saved = dict(state.to_dict(), model=model_lib.unwrapped(worker.net).state_dict(),
                     optimizer=worker.optimizer.state_dict())
        if worker.average is not None:
            saved["ema"] = worker.average.state()
        torch.save(saved, os.path.join(folder, STATE_FILE))
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _finish(worker: Worker, state: TrainState) -> None:
    """The best weights; the inference variant that validates best; then the test split,
    scored by all workers with the same counting code infer uses."""
    from .. import model as model_lib

    module = model_lib.unwrapped(worker.scored)
    if state.best is not None:
        module.load_state_dict(state.best["model"])
    batch_size = worker.config.batch_size * 2
    state.inference = choose_inference(worker.scored, worker.val_set, worker.rank,
                                       worker.world, worker.device, worker.bf16, batch_size,
                                       worker.config.allow_tta)
    if worker.test_set is not None:
        post = state.inference["postprocess"]
        state.test = evaluate(worker.scored, worker.test_set, worker.rank, worker.world,
                              worker.device, worker.bf16, batch_size,
                              tta=state.inference["tta"], post=post,
                              zoom=state.inference["tta_zoom"])
    state.finished = True
    _report(worker, state, {"epoch": state.epoch, "finished": True,
                            **{f"test_{k}": v for k, v in (state.test or {}).items()
                               if k != "hist"}})
