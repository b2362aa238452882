"""A run's checkpoints on object storage: what they hold (TrainState), resuming under the
same fixed flags, finishing a run whose driver stopped after training ended, and the model
folder written from the final state."""
from __future__ import annotations

import datetime as dt
import io
import json
from dataclasses import dataclass, field, fields, replace

from .. import shards, storage
from ..errors import UserError
from .config import TrainConfig


CHECKPOINT_DIR = "checkpoints"

# Ray Train's list of the checkpoints it registered (a torn upload is never in it)
CHECKPOINT_RECORD = "checkpoint_manager_snapshot.json"

STATE_FILE = "state.pt"

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


DATA_RECORD = "data.json"


def check_same_data(run_uri: str, uris) -> None:
    """Refuse a rerun of RUN over other prepared data, or the same sets in another order (cv
    deals each set's cases in turn, so the order decides the folds): a resumed run would
    train and score on frames its first part never dealt. Records the data when RUN starts."""
    record = storage.join(run_uri, DATA_RECORD)
    uris = list(uris)
    if storage.exists(record):
        saved = json.loads(storage.read_text(record))
        if saved != uris:
            raise UserError(f"{run_uri} was started on {' '.join(saved)}: rerun with the same "
                            f"DATA, in the same order, to resume, or give a new RUN")
        return
    storage.make_dirs(run_uri)
    storage.write_text(record, json.dumps(uris))


def initial_weights(config: TrainConfig) -> bytes | None:
    """The state dict a run starts from with --init (an ensemble's first member), serialized
    for the workers; refused with the flag to use when its U-Net is not this run's."""
    if not config.init:
        return None
    import torch

    from .. import model as model_lib

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


def state_uri(checkpoint) -> str:
    """Where a Ray Train checkpoint's state file is, as a URI the storage layer reads."""
    folder = checkpoint.path.rstrip("/")
    on_s3 = "S3" in type(checkpoint.filesystem).__name__
    return storage.join(f"s3://{folder}" if on_s3 else folder, STATE_FILE)


def save_model(run_uri: str, state: TrainState, config: TrainConfig, workers: int, gpu: bool,
               data: shards.PreparedData, extra: dict | None = None) -> None:
    """RUN/model (best weights + model.json) and RUN/history.jsonl from a final state."""
    from .. import model as model_lib

    best = state.best
    net = model_lib.build(config.architecture)
    net.load_state_dict(best["model"])
    model_lib.save(net.without_deep_supervision(), storage.join(run_uri, "model"), {
        "prep": data.prep,
        "classes": model_lib.CLASS_NAMES,
        # chosen on the validation split (choose_inference); infer applies them
        "threshold": state.inference["postprocess"]["threshold"],
        "tta": state.inference["tta"],
        "tta_zoom": state.inference["tta_zoom"],
        "postprocess": {k: v for k, v in state.inference["postprocess"].items()
                        if k != "threshold"},
        "training": {"config": config.to_dict(), "workers": workers, "gpu": gpu,
                     "epochs_run": state.epoch, "best_epoch": best["epoch"],
                     "best_val": {k: v for k, v in best["val"].items() if k != "hist"},
                     "inference_variants": state.inference["val_variants"]},
        "data": data.provenance,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    })
    storage.write_text(storage.join(run_uri, "history.jsonl"),
                       "".join(json.dumps(row) + "\n" for row in state.history))
