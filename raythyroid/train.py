"""The train job: DDP U-Net on Ray Train, checkpointed under RUN, resumable.

Data: the preprocess shards are decoded once (and the loss weight map computed once per mask) into
a materialized Ray dataset; workers read their train shard with iter_torch_batches. Validation and
test sets are given whole to every worker, and each worker scores the rows whose key hashes to its
rank, so every row is scored exactly once; the per-worker confusion counts are all-reduced.

Every checkpoint holds the latest state (to resume) and the best weights so far (by val n_iou),
plus the epoch history, so the latest checkpoint alone is enough to resume or to finish. RUN gets:
  checkpoints/  Ray Train's storage (resume by rerunning the same command)
  model/        best weights + model.json
  history.jsonl one line per epoch
  metrics.json  test-split metrics; written last, so its presence means the run is finished
"""
from __future__ import annotations

import datetime as dt
import functools
import io
import json
import logging
import math
import os
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import pyarrow as pa

from . import imaging, losses, metrics, report, runtime, shards, storage, telemetry
from .errors import UserError

CHECKPOINT_DIR = "checkpoints"
# Ray Train's list of the checkpoints it registered (a torn upload is never in it)
CHECKPOINT_RECORD = "checkpoint_manager_snapshot.json"
STATE_FILE = "state.pt"
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("poly", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")


# with only --time-limit the clock ends training (and drives the learning-rate schedule)
TIME_LIMITED_EPOCHS = 10_000
PROGRESS_EVERY_S = 2.0  # how often rank 0 tells the driver its step within the epoch


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    batch_size: int = 8  # per worker
    lr: float | None = None  # default: 1e-3 for AdamW, 1e-2 for SGD
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "poly"
    loss: str = "dice-ce"  # losses.LOSSES; weighted-ce is the paper's
    base: int = 16
    augment: str = "strong"  # augment.PRESETS
    precision: str = "auto"
    seed: int = 0
    time_limit_min: float | None = None
    # weights validated, kept and shipped are an exponential moving average of the trained ones
    # (0 = the trained weights themselves); it smooths the noise of small batches
    ema: float = 0.0
    deep_supervision: int = 0  # extra losses at 1/2, 1/4, ... resolution (model.UNetConfig)
    # a model (folder, s3:// or bundled name) whose weights the run starts from, not random ones
    init: str | None = None
    # whether the inference chosen on validation may use TTA (distill's one-pass students: not
    # unless asked)
    allow_tta: bool = True
    # with a teacher's soft targets in the data (distill): their share of the loss, and the
    # temperature both distributions are softened by (losses.distilled)
    soft_weight: float = 0.5
    temperature: float = 1.0

    @property
    def architecture(self):
        from . import model

        return model.UNetConfig(base=self.base, deep_supervision=self.deep_supervision)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.optimizer == "adamw" else 1e-2

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- resuming (driver side)

RUN_SETTINGS = "run.json"
# Flags a checkpoint cannot be resumed under: they change the shape of the weights or of the
# optimizer state, and loading would fail inside every worker, once per Ray Train retry.
RESUME_FIXED = ("base", "deep_supervision", "optimizer")


def has_checkpoint(run_uri: str) -> bool:
    # a missing folder or prefix lists as empty
    return any(u.endswith("/" + STATE_FILE)
               for u in storage.list_files(storage.join(run_uri, CHECKPOINT_DIR)))


def recorded_checkpoints(run_uri: str) -> list[dict]:
    """The checkpoints Ray Train registered for RUN, oldest first, each with the metrics it
    was reported with ({"checkpoint_dir_name", "metrics", ...}); a torn upload is never
    among them. Empty when there is no record yet, or one this Ray version writes otherwise."""
    uri = storage.join(run_uri, CHECKPOINT_DIR, CHECKPOINT_RECORD)
    if not storage.exists(uri):
        return []
    try:
        return list(json.loads(storage.read_text(uri))["checkpoint_results"])
    except (ValueError, KeyError, TypeError):
        return []


def load_state(uri: str) -> dict:
    """A checkpoint's state file, read through the storage layer: its whole-object retries
    survive a body cut off mid-download, which Ray's own checkpoint download does not."""
    import torch

    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu",
                      weights_only=False)


def finished_state(run_uri: str) -> "TrainState | None":
    """The final state of a run whose training ended (the test pass included) but whose driver
    did not get to write the model and metrics.json, read from the last checkpoint in Ray
    Train's record without starting any worker; None when there is no such checkpoint."""
    ended = [r["checkpoint_dir_name"] for r in recorded_checkpoints(run_uri)
             if r.get("metrics", {}).get("finished")]
    if not ended:
        return None
    state = TrainState.from_dict(load_state(
        storage.join(run_uri, CHECKPOINT_DIR, ended[-1], STATE_FILE)))
    return state if state.finished else None


def check_resume(run_uri: str, config: TrainConfig) -> None:
    """Refuse, with the flags to use, a rerun of a checkpointed RUN under other fixed flags;
    record the flags when the run starts."""
    settings_uri = storage.join(run_uri, RUN_SETTINGS)
    fixed = {name: getattr(config, name) for name in RESUME_FIXED}
    if has_checkpoint(run_uri) and storage.exists(settings_uri):
        saved = json.loads(storage.read_text(settings_uri))
        changed = [f"--{name.replace('_', '-')} {saved[name]} (now {fixed[name]})"
                   for name in RESUME_FIXED if name in saved and saved[name] != fixed[name]]
        if changed:
            raise UserError(f"{run_uri} has checkpoints from a run with "
                            f"{', '.join(changed)}: rerun with the same flags to resume, or "
                            f"train into a new RUN")
        return
    storage.make_dirs(run_uri)
    storage.write_text(settings_uri, json.dumps(fixed, indent=2))


def initial_weights(config: TrainConfig) -> bytes | None:
    """The state dict a run starts from with --init (an ensemble's first member), serialized
    for the workers; refused with the flag to use when its U-Net is not this run's."""
    if not config.init:
        return None
    import torch

    from . import model as model_lib

    net, _ = model_lib.load(model_lib.resolve(config.init), first_member_only=True)
    wanted = replace(config.architecture, deep_supervision=0)  # shipped models have none
    if net.config != wanted:
        raise UserError(f"--init {config.init} is a U-Net of base {net.config.base}, depth "
                        f"{net.config.depth}, {net.config.classes} classes; this run's is base "
                        f"{wanted.base}, depth {wanted.depth}, {wanted.classes} classes: train "
                        f"with --base {net.config.base}, or without --init")
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------- data (driver side)

def decode_block(batch: pa.Table, with_weights: bool, folds: dict | None = None,
                 full: bool = False) -> dict:
    """Parquet rows -> numpy columns the workers consume (no strings: iter_torch_batches);
    also what scores held-out frames outside Ray (bench/rechoose_inference.py).

    `full` adds what scoring in each frame's own geometry needs: the label at its original
    size (PNG bytes, decoded when scored) and the geometry that maps a prediction back.
    """
    keys = batch.column("key").to_pylist()
    images = np.stack([imaging.decode_png(b) for b in batch.column("image").to_pylist()])
    masks = np.stack([imaging.decode_png(b) for b in batch.column("mask").to_pylist()])
    out = {"image": images, "mask": masks,
           # which worker scores this row during validation: stable, and independent of order
           "part": np.array([zlib.crc32(k.encode()) for k in keys], np.int64)}
    if with_weights:
        out["weight"] = np.stack([losses.boundary_weight_map(m) for m in masks]
                                 ).astype(np.float16)
    if folds is not None:  # cross-validation: which fold each row's case belongs to
        out["fold"] = np.array([folds[k] for k in keys], np.int64)
    if full:
        out["full_mask"] = np.array(batch.column("full_mask").to_pylist(), dtype=object)
        out["geometry"] = np.array([imaging.Geometry.from_dict(g).to_row()
                                    for g in batch.column("geometry").to_pylist()], np.int32)
    return out


FULL_COLUMNS = ["full_mask", "geometry"]


def load_split(data: str, manifest: dict, name, with_weights: bool = False,
               folds: dict | None = None, full: bool = False):
    """One split (or a list of splits) of a preprocess output as a materialized Ray dataset,
    or None if empty. `folds` (key -> fold) adds a fold column for cross-validation; `full`
    the original-geometry labels validation scores against (shards from before they were
    written score in the prepared square instead)."""
    uris = shards.shard_uris(data, manifest, name)
    if not uris:
        return None
    full = full and shards.format_version(manifest) >= 2
    columns = ["key", "image", "mask"] + (FULL_COLUMNS if full else [])
    return read_shards(uris, columns, decode_block, with_weights=with_weights, folds=folds,
                       full=full).materialize()


DECODE_ROWS = 64  # rows per decoded block: a shard's images decoded at once would not fit


def read_shards(uris: list[str], columns: list[str], transform=None, **transform_args):
    """A Ray dataset of the shard files the manifest lists, one read task per file, each
    table (`columns` only) passed through `transform` DECODE_ROWS rows at a time.

    Not ray.data.read_parquet: in Ray 2.60 it first starts a pool of footer-reading actors
    (32 processes asked for, each call) to discover what the manifest already says, about 5 s
    a split on two cores where this takes under one."""
    import ray

    return ray.data.from_items([{"uri": uri} for uri in uris],
                               override_num_blocks=len(uris)).map_batches(
        _read_shard, fn_kwargs={"columns": columns, "transform": transform,
                                "transform_args": transform_args},
        batch_size=1, batch_format="numpy")


def _read_shard(batch: dict, columns: list[str], transform, transform_args: dict):
    for uri in batch["uri"]:
        table = storage.read_parquet(str(uri), columns)
        for start in range(0, table.num_rows, DECODE_ROWS):
            rows = table.slice(start, DECODE_ROWS)
            yield transform(rows, **transform_args) if transform else rows


# ---------------------------------------------------------------- the worker loop

def _lr_factor(schedule: str, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return (1 - progress) ** 0.9


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
    With `with_totals` each result also carries its metrics.Totals vector under "totals":
    what cv sums over its folds into pooled out-of-fold figures.

    Where the split carries original-geometry labels, each prediction is first mapped back to
    its frame (float16 probabilities, as infer keeps them) and scored there, exactly as infer
    applies and scores it; otherwise in the prepared square.
    """
    import torch
    import torch.distributed as dist

    from . import model as model_lib, postprocess

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
            result["totals"] = row
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
        restored = imaging.Geometry.from_row(geometry).restore(
            p.astype(np.float16).astype(np.float32))
        yield imaging.decode_png(label_png) > 0, restored


# Inference variants tried on the validation split once training ends: mirrored test-time
# augmentation (and with it a zoomed-out view, model.TTA_ZOOM), a higher threshold
# (class-weighted losses over-segment) and keeping only the largest components are kept only
# where they help. The plain setting is listed first so that it wins ties.
INFERENCE_THRESHOLDS = (0.5, 0.6, 0.7, 0.4)
INFERENCE_KEEP_LARGEST = (0, 2, 1)


def choose_inference(net, val_set, rank, world, device, bf16, batch_size,
                     allow_tta: bool = True) -> dict:
    from . import model as model_lib

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


@dataclass
class TrainState:
    """What a checkpoint holds besides the weights, optimizer and average: enough to resume a
    run or to finish it. Saved as a plain dict (`to_dict`) beside them."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # {"epoch", "val", "model"}: the best validated weights so far
    finished: bool = False
    test: dict | None = None
    inference: dict | None = None  # choose_inference's result, once training has ended
    # The time budget and schedule span every run of the command: `origin` is when this run's
    # clock would have started had it never stopped, `session` the driver start it refers to.
    origin: float | None = None
    session: float | None = None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        names = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in names})
        if state.inference is not None:  # checkpoints of older versions chose no zoomed view
            state.inference.setdefault("tta_zoom", 0.0)
        return state


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

    from . import model as model_lib

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


def _state_uri(checkpoint) -> str:
    """Where a Ray Train checkpoint's state file is, as a URI the storage layer reads."""
    folder = checkpoint.path.rstrip("/")
    on_s3 = "S3" in type(checkpoint.filesystem).__name__
    return storage.join(f"s3://{folder}" if on_s3 else folder, STATE_FILE)


def _restore(net, optimizer) -> tuple[TrainState, dict | None, int | None]:
    """(state, saved weight average, epoch restored from) of the latest checkpoint, loading
    its weights and optimizer state in place; a fresh state without one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return TrainState(), None, None
    saved = load_state(_state_uri(checkpoint))
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

    from . import augment, model as model_lib

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
    from . import model as model_lib

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


def epoch_line(row: dict, epochs: int, best: float) -> str:
    of_total = "" if epochs >= TIME_LIMITED_EPOCHS else f"/{epochs}"
    return (f"epoch {row['epoch']}{of_total}  loss {row['train_loss']:.4f}  val n_IoU "
            f"{row['val_n_iou']:.4f} (best {best:.4f})  {row['images_per_s']:.1f} img/s  "
            f"lr {row['lr']:.2e}")


def _report(worker: Worker, state: TrainState, row: dict) -> None:
    """Report to Ray Train; rank 0 attaches the checkpoint (state, weights, optimizer)."""
    import ray.train
    import torch

    from . import model as model_lib

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
    from . import model as model_lib

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


# ---------------------------------------------------------------- the driver

def run(data: str, run_uri: str, config: TrainConfig = TrainConfig(), workers: int = 2,
        gpu: bool = False, cpus_per_worker: float | None = None, log=print,
        metrics_port: int | None = None) -> dict:
    """Train (or resume, or report a finished run) and return the test metrics."""
    # the total is known once the training split is counted, in optimizer steps
    with telemetry.tracked("train", storage.basename(run_uri), metrics_port, 0,
                           unit="steps") as progress:
        return _run(data, run_uri, config, workers, gpu, cpus_per_worker, log, progress)


def _run(data, run_uri, config, workers, gpu, cpus_per_worker, log, progress) -> dict:
    data, run_uri = storage.normalize(data), storage.normalize(run_uri)
    finished = storage.join(run_uri, "metrics.json")
    if storage.exists(finished):
        result = json.loads(storage.read_text(finished))
        log(f"train: {run_uri} is already finished; nothing to do")
        log(metrics.table(result, "test split (from metrics.json)"))
        return result
    manifest = shards.read_manifest(data)
    if not manifest["counts"].get("train"):
        raise UserError(f"{data} has no training rows")
    if not manifest["counts"].get("val"):
        raise UserError(f"{data} has no validation rows; preprocess with a val fraction > 0")
    check_resume(run_uri, config)
    return train_and_save(run_uri, config, lambda: _datasets(data, manifest, config, log),
                          manifest, data, workers, gpu, cpus_per_worker, log, progress).test or {}


def train_and_save(run_uri: str, config: TrainConfig, datasets, manifest: dict, data: str,
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
    save_model(run_uri, state, config, workers, gpu, manifest, data, extra)
    test_metrics = state.test or {}
    if write_metrics:
        storage.write_text(storage.join(run_uri, "metrics.json"),
                           json.dumps(test_metrics, indent=2))
    from . import model as model_lib

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


def _datasets(data: str, manifest: dict, config: TrainConfig, log) -> dict:
    """The decoded splits of a preprocess output, as train reads them."""
    weighted = config.loss == "weighted-ce"
    log(f"train: decoding {manifest['counts']['train']} training pairs"
        + (" and computing boundary weight maps" if weighted else ""))
    datasets = {"train": load_split(data, manifest, "train", with_weights=weighted),
                "val": load_split(data, manifest, "val", full=True)}
    test = load_split(data, manifest, "test", full=True)
    if test is not None:
        datasets["test"] = test
    return datasets


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
    return TrainState.from_dict(load_state(_state_uri(result.checkpoint)))


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


def save_model(run_uri: str, state: TrainState, config: TrainConfig, workers: int, gpu: bool,
               manifest: dict, data: str, extra: dict | None = None) -> None:
    """RUN/model (best weights + model.json) and RUN/history.jsonl from a final state."""
    from . import model as model_lib

    best = state.best
    net = model_lib.build(config.architecture)
    net.load_state_dict(best["model"])
    model_lib.save(net.without_deep_supervision(), storage.join(run_uri, "model"), {
        "prep": manifest["prep"],
        "classes": ["background", "nodule"],
        # chosen on the validation split (train.choose_inference); infer applies them
        "threshold": state.inference["postprocess"]["threshold"],
        "tta": state.inference["tta"],
        "tta_zoom": state.inference["tta_zoom"],
        "postprocess": {k: v for k, v in state.inference["postprocess"].items()
                        if k != "threshold"},
        "training": {"config": config.to_dict(), "workers": workers, "gpu": gpu,
                     "epochs_run": state.epoch, "best_epoch": best["epoch"],
                     "best_val": {k: v for k, v in best["val"].items() if k != "hist"},
                     "inference_variants": state.inference["val_variants"]},
        "data": {"uri": data, "counts": manifest["counts"], "created": manifest["created"]},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    })
    storage.write_text(storage.join(run_uri, "history.jsonl"),
                       "".join(json.dumps(row) + "\n" for row in state.history))
