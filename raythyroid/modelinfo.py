"""A model folder's record: model.json read as `ModelInfo` (its one reader, which also absorbs
what older versions wrote), the architecture and the chosen inference in it, and MODEL as a
user names it (a folder, s3://, a registry version, a bundled name) resolved to a folder.

No torch here: a job's driver that only reads which model runs (infer's) starts without it.
The network itself, and loading one from a folder, is `model`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields

from .imaging import PrepConfig
from .postprocess import PostConfig

MODEL_FORMAT = "raythyroid-model/1"
WEIGHTS = "weights.pt"
MODEL_JSON = "model.json"
# model.json's entry for the one-pass network `infer --fast` runs where a model ships one (a
# student distilled from the ensemble: its weights file, architecture, inference, provenance)
FAST = "fast"
CARD = "CARD.md"
CLASS_NAMES = ["background", "nodule"]  # the softmax's channels, in order (model.json)
# models shipped inside the package: MODEL may name one of these folders (`raythyroid models`)
BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    classes: int = 2  # background, nodule: softmax over both, as in the paper
    base: int = 16  # channels of the first level; doubles at every pooling
    depth: int = 4  # poolings; the input side must be a multiple of 2**depth
    # extra outputs at 1/2, 1/4, ... resolution for deep supervision; only training sees them
    deep_supervision: int = 0

    def __post_init__(self):
        if not 0 <= self.deep_supervision < self.depth:
            raise ValueError(f"deep_supervision must be 0..{self.depth - 1}, "
                             f"got {self.deep_supervision}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UNetConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def resolve(model: str) -> str:
    """MODEL as a user gives it: a model folder when one exists by that name (or an object
    store URI), a version in MLflow's registry (models:/NAME@ALIAS, models:/NAME/N: downloaded
    once), else the name of a model shipped inside the package."""
    if model.startswith("models:/"):
        from . import registry

        return registry.fetch(model)
    if "://" in model or os.sep in model or os.path.exists(os.path.join(model, MODEL_JSON)):
        return model
    bundled = os.path.join(BUNDLED, model)
    # a folder of that name that holds no model (the user's own ddti/ data) does not shadow it
    return bundled if os.path.exists(os.path.join(bundled, MODEL_JSON)) else model


def bundled() -> dict[str, ModelInfo]:
    """Name -> ModelInfo of every model shipped inside the package (weights not hashed)."""
    found = {}
    for name in sorted(os.listdir(BUNDLED)) if os.path.isdir(BUNDLED) else []:
        path = os.path.join(BUNDLED, name, MODEL_JSON)
        if os.path.exists(path):
            with open(path) as f:
                found[name] = ModelInfo.from_json(json.load(f))
    return found


@dataclass(frozen=True)
class Inference:
    """How a model is applied, as chosen on validation: TTA (the frame and its mirror image,
    and with `tta_zoom` a zoomed-out view, 0 without TTA) and the post-processing."""

    tta: bool = False
    tta_zoom: float = 0.0
    post: PostConfig = PostConfig()

    @classmethod
    def from_json(cls, meta: dict) -> "Inference":
        """model.json's keys; a model.json from before the zoomed view or a setting added
        since reads as none or the setting's default."""
        tta = bool(meta.get("tta", False))
        return cls(tta=tta, tta_zoom=float(meta.get("tta_zoom") or 0.0) if tta else 0.0,
                   post=PostConfig(threshold=float(meta.get("threshold", 0.5)),
                                   **meta.get("postprocess", {})))

    def to_json(self) -> dict:
        """The keys model.json keeps the inference under."""
        return {"threshold": self.post.threshold, "tta": self.tta, "tta_zoom": self.tta_zoom,
                "postprocess": {k: v for k, v in self.post.to_dict().items()
                                if k != "threshold"}}


@dataclass(frozen=True)
class ModelInfo:
    """A model folder's model.json as every room reads it. `from_json` is its one reader and
    absorbs what older versions wrote; what a run records about itself (training, data, the
    card, a distillation) is provenance, kept as written for reports to show."""

    architecture: UNetConfig
    prep: PrepConfig
    inference: Inference
    members: int = 1  # networks averaged (an ensemble's members; 1 for a single network)
    ensemble: bool = False
    weights_sha256: str = ""  # of the weights read (only the one-pass network's with --fast)
    card: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    created: str | None = None
    distillation: dict | None = None
    int8: dict | None = None  # int8 weights beside the fp32 ones (the `int8` module wrote them)
    fast: dict | None = None  # the one-pass network --fast runs, where the model ships one

    @classmethod
    def from_json(cls, meta: dict, weights_sha256: str = "") -> "ModelInfo":
        members = meta.get("members")
        return cls(architecture=UNetConfig.from_dict(meta["architecture"]),
                   prep=PrepConfig.from_dict(meta["prep"]),
                   inference=Inference.from_json(meta),
                   members=len(members) if members else 1, ensemble=bool(members),
                   weights_sha256=weights_sha256, card=meta.get("card") or {},
                   training=meta.get("training") or {}, data=meta.get("data") or {},
                   created=meta.get("created"), distillation=meta.get("distillation"),
                   int8=meta.get("int8"), fast=meta.get(FAST))

    def check_prepared(self, model: str, data: str, manifest: dict) -> None:
        """DATA (a prepared set, `manifest` its manifest) holds frames prepared as the model
        prepares them, or a user error says which settings to preprocess it with."""
        from .errors import UserError

        if self.prep != PrepConfig.from_dict(manifest["prep"]):
            raise UserError(f"{model} prepares frames with {json.dumps(self.prep.to_dict())}, "
                            f"{data} was prepared with {json.dumps(manifest['prep'])}: "
                            f"preprocess it with the model's settings (--size {self.prep.size})")

    @property
    def headline(self) -> str:
        """One line on how good the model is: its card's for a shipped model, else its
        training's."""
        if self.card.get("headline"):
            return self.card["headline"]
        best = (self.training.get("best_val") or {}).get("n_iou")
        epochs = self.training.get("epochs_run")
        parts = [f"validation n_IoU {best:.3f}" if isinstance(best, (int, float)) else None,
                 f"{epochs} epochs" if epochs else None,
                 f"trained {self.created[:10]}" if self.created else None,
                 f"ensemble of {self.members}" if self.ensemble else None]
        return ", ".join(p for p in parts if p) or "no training record"

    @property
    def data_uris(self) -> list[str]:
        """The prepared sets the model learnt from: model.json's `data` names one by `uri`, or
        several under `sets` (shards.PreparedData.provenance); none when not recorded."""
        if self.data.get("sets"):
            return [s["uri"] for s in self.data["sets"]]
        return [self.data["uri"]] if self.data.get("uri") else []

    @property
    def cv_seed(self) -> int | None:
        """The seed a cv ensemble dealt its folds with (None when not recorded)."""
        return (self.training.get("config") or {}).get("seed")

    @property
    def inference_variants(self) -> list[dict]:
        """Every inference tried on validation with its scores (training.choose_inference)."""
        return self.training.get("inference_variants") or []


def read_info(folder: str, fast: bool = False) -> ModelInfo:
    """A model folder (local or s3://) -> its ModelInfo, with `weights_sha256` the identity of
    the weights it names (with `fast`, those of the network infer --fast runs: one_pass); the
    weights are read to hash them, not built into a network."""
    return read_folder(folder, first_member_only=False, fast=fast)[0]


def one_pass(meta: dict) -> dict:
    """model.json as the network `infer --fast` runs sees it: the model's `fast` entry (its
    own weights, architecture, inference, card and provenance, the ensemble's preparation)
    where it ships one, else the first member of an ensemble, or the one network, without
    TTA."""
    entry = meta.get(FAST)
    if not entry:
        files = meta.get("members") or [meta["weights"]]
        return dict({k: v for k, v in meta.items() if k not in ("members", "int8")},
                    weights=files[0], tta=False)
    return dict({k: v for k, v in meta.items() if k in ("prep", "classes", "format")},
                **entry, tta=False)


def read_folder(folder: str, first_member_only: bool, member: int | None = None,
                fast: bool = False) -> tuple[ModelInfo, list[bytes]]:
    """(ModelInfo, the bytes of the weights it names): what read_info and model.load share."""
    from . import storage
    from .errors import UserError

    try:
        meta = json.loads(storage.read_text(storage.join(folder, MODEL_JSON)))
    except FileNotFoundError:
        names = ", ".join(bundled()) or "none"
        raise UserError(f"{folder} is not a model folder (no {MODEL_JSON}) nor the name of a "
                        f"bundled model ({names}; `raythyroid models`)") from None
    except OSError as exc:
        raise UserError(f"cannot read the model at {folder}: "
                        f"{storage.describe_error(exc)}") from None
    if fast:
        meta = one_pass(meta)
    files = meta.get("members") or [meta["weights"]]
    if member is not None:
        if not 0 <= member < len(files):
            raise UserError(f"{folder} has {len(files)} member(s), not a member {member}")
        files = files[member:member + 1]
    digest = hashlib.sha256()
    weights = []
    for name in files[:1] if first_member_only else files:
        weights.append(storage.read_bytes(storage.join(folder, name)))
        digest.update(weights[-1])
    return ModelInfo.from_json(meta, digest.hexdigest()), weights
