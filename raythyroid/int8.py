"""int8 weights for a one-network model on CPUs: torch's FX static quantization (x86 backend),
calibrated once on a prepared set's training frames and stored beside the fp32 weights, so every
Predictor of every run computes the same masks from the same int8 weights.

`raythyroid quantize MODEL DATA OUT` writes OUT (MODEL's files, `weights-int8.pt`, and
model.json's `int8` entry); `infer --precision int8` loads it with `load`.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import warnings

import numpy as np
import torch

from . import imaging, model, shards, storage
from .errors import UserError

INT8_WEIGHTS = "weights-int8.pt"
BACKEND = "x86"
CALIBRATION_FRAMES = 64
_BATCH = 16


def _mapping():
    from torch.ao.quantization import get_default_qconfig_mapping

    # the up-convolutions stay fp32: with them quantized too, the bundled model's first member
    # erased its masks on DDTI's test split (bench/int8_bench.py's first try)
    return get_default_qconfig_mapping(BACKEND).set_object_type(torch.nn.ConvTranspose2d, None)


def _prepared(net: torch.nn.Module, size: int):
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = BACKEND
    example = torch.zeros(1, 1, size, size)
    with warnings.catch_warnings():  # torch.ao's deprecation notices, one per call
        warnings.simplefilter("ignore")
        return prepare_fx(copy.deepcopy(net).eval(), _mapping(), (example,))


def _converted(prepared):
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(prepared)


def quantize(net: torch.nn.Module, calibration: np.ndarray) -> torch.nn.Module:
    """A one-network model -> its int8 twin, activation ranges observed on `calibration`
    ((N, H, W) uint8 prepared frames)."""
    prepared = _prepared(net, calibration.shape[-1])
    with torch.inference_mode():
        for start in range(0, len(calibration), _BATCH):
            prepared(torch.from_numpy(calibration[start:start + _BATCH]).unsqueeze(1).float())
    return _converted(prepared)


def load(folder: str) -> tuple[torch.nn.Module, model.ModelInfo]:
    """A model folder with int8 weights -> (the int8 network, its ModelInfo), on the CPU."""
    net, info = model.load(folder)
    if not info.int8:
        raise UserError(f"{folder} has no int8 weights: `raythyroid quantize` writes them")
    # the int8 twin is the network's graph as this torch traces it today; the stored weights
    # fit only the graph they were quantized from
    twin = _converted(_prepared(net, info.prep.size))
    blob = storage.read_bytes(storage.join(folder, info.int8["weights"]))
    # rows and SEGs name the hash model.json records: the bytes must be those
    if hashlib.sha256(blob).hexdigest() != info.int8.get("sha256"):
        raise UserError(f"{folder}: {info.int8['weights']} is not the file its model.json "
                        f"names (another hash): run `raythyroid quantize` again")
    try:
        twin.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu",
                                        weights_only=True))
    except RuntimeError:
        raise UserError(f"{folder}: its int8 weights (torch {info.int8.get('torch', '?')}) do "
                        f"not fit this torch's ({torch.__version__}) graph of the network: run "
                        f"`raythyroid quantize` again") from None
    return twin.eval(), info


def calibration_frames(data: str, manifest: dict, frames: int) -> np.ndarray:
    """Up to `frames` training frames, at most `frames / shards` (rounded up) from each
    training shard, evenly spaced in it, shard after shard: many cases rather than the first
    shard's few, and one shard's image column in memory at a time. A split of fewer shards
    than `frames`, or of short shards, gives fewer. (0, ...) when the split is empty."""
    uris = shards.shard_uris(data, manifest, "train")
    per_shard = -(-frames // max(1, len(uris)))
    picked: list[bytes] = []
    for uri in uris:
        if len(picked) >= frames:
            break
        images = storage.read_parquet(uri, ["image"]).column("image").to_pylist()
        picked += images[::max(1, len(images) // per_shard)][:per_shard]
    size = manifest["prep"]["size"]
    return np.stack([imaging.decode_png(b) for b in picked[:frames]]) if picked else \
        np.zeros((0, size, size), np.uint8)


def write(model_uri: str, data: str, output: str, frames: int = CALIBRATION_FRAMES,
          log=print) -> dict:
    """OUTPUT = MODEL's files plus its int8 weights, calibrated on `frames` training frames of
    DATA (prepared with MODEL's settings; `calibration_frames`); returns model.json's `int8`
    entry."""
    folder = model.resolve(model_uri)
    info = model.read_info(folder)
    if info.ensemble:
        raise UserError(f"{model_uri} is an ensemble of {info.members}: int8 is for one network "
                        f"(a distilled student, or a train run's model)")
    manifest = shards.read_manifest(data)
    info.check_prepared(model_uri, data, manifest)
    calibration = calibration_frames(data, manifest, frames)
    if not len(calibration):
        raise UserError(f"{data} has no training frames to calibrate on")
    net, _ = model.load(folder)
    buffer = io.BytesIO()
    torch.save(quantize(net, calibration).state_dict(), buffer)
    meta = json.loads(storage.read_text(storage.join(folder, model.MODEL_JSON)))
    for uri in storage.list_files(folder):  # the weights, the card and what else it holds
        name = storage.relative(uri, folder)
        if name not in (model.MODEL_JSON, INT8_WEIGHTS):
            storage.write_bytes(storage.join(output, name), storage.read_bytes(uri))
    storage.write_bytes(storage.join(output, INT8_WEIGHTS), buffer.getvalue())
    meta["int8"] = {"weights": INT8_WEIGHTS, "backend": BACKEND, "torch": torch.__version__,
                    "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                    "calibration": {"data": storage.normalize(data),
                                    "frames": len(calibration)},
                    "fp32_layers": "up-convolutions"}
    storage.write_text(storage.join(output, model.MODEL_JSON), json.dumps(meta, indent=2))
    log(f"quantize: {output}: int8 weights calibrated on {len(calibration)} training frames "
        f"of {data}")
    return meta["int8"]
