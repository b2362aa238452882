"""The U-Net: four poolings down, four up, skip connections, BatchNorm, two-class softmax output.

Readable top to bottom; the architecture is a dataclass stored in model.json, so a model folder
rebuilds itself with nothing but this file. Input is the prepared uint8 image as float (0..255);
the scaling to unit range happens inside, so no caller can get it wrong.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .imaging import PrepConfig
from .postprocess import PostConfig

MODEL_FORMAT = "raythyroid-model/1"
WEIGHTS = "weights.pt"
MODEL_JSON = "model.json"
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


class DoubleConv(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        widths = [config.base * 2 ** i for i in range(config.depth + 1)]
        self.down = nn.ModuleList([DoubleConv(config.in_channels, widths[0])] + [
            DoubleConv(widths[i], widths[i + 1]) for i in range(config.depth)])
        self.up = nn.ModuleList([
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(config.depth))])
        self.merge = nn.ModuleList([DoubleConv(widths[i] * 2, widths[i])
                                    for i in reversed(range(config.depth))])
        self.head = nn.Conv2d(widths[0], config.classes, 1)
        # aux[0] reads the decoder at 1/2 resolution, aux[1] at 1/4, ...
        self.aux = nn.ModuleList([nn.Conv2d(widths[i], config.classes, 1)
                                  for i in range(1, config.deep_supervision + 1)])

    def forward(self, x: torch.Tensor):
        """(N, 1, H, W) image in 0..255 -> (N, classes, H, W) logits; in training mode with deep
        supervision, a list: those logits, then the coarser ones (losses.supervised)."""
        x = (x - 127.5) / 64.0  # CLAHE output is roughly uniform over 0..255
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        supervised = self.training and len(self.aux) > 0
        coarse = []
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
            if supervised:
                coarse.append(x)
        logits = self.head(x)
        if not supervised:
            return logits
        # coarse[-1] is full resolution; coarse[-2] half, ...
        return [logits] + [head(coarse[-2 - i]) for i, head in enumerate(self.aux)]

    def without_deep_supervision(self) -> "UNet":
        """The same network minus the training-only outputs: what a model folder ships."""
        plain = build(replace(self.config, deep_supervision=0))
        plain.load_state_dict({k: v for k, v in self.state_dict().items()
                               if not k.startswith("aux.")})
        return plain


def build(config: UNetConfig = UNetConfig()) -> UNet:
    return UNet(config).to(memory_format=torch.channels_last)


def unwrapped(net: nn.Module) -> nn.Module:
    """The network itself, whether or not DDP wraps it."""
    return net.module if hasattr(net, "module") else net


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast where asked; bf16 keeps fp32's range, so no loss scaling is needed."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def as_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, H, W) uint8 batch -> (N, 1, H, W) float, channels_last, on the device."""
    x = images.to(device, non_blocking=True).unsqueeze(1).float()
    return x.contiguous(memory_format=torch.channels_last)


# TTA's zoomed-out view: the frame shrunk to this fraction of its side in the middle of a blank
# one. Averaged with the frame's own views it raised the bundled members' out-of-fold pooled
# n_IoU on DDTI by 0.005 (3 folds up, 1 level, 1 down by 0.002; bench/BENCHMARKS.md, "zoomed-out
# view"). Presumably the model, which augments scale only down to 0.85, draws a little less
# beyond the nodule when it sees more of the surroundings.
TTA_ZOOM = 0.8


def describe_tta(tta: bool, zoom: float) -> str:
    return ("flip" + (f" + zoom {zoom:g}" if zoom else "")) if tta else "none"


def _probability(model: nn.Module, x: torch.Tensor, flip_tta: bool) -> torch.Tensor:
    prob = torch.softmax(model(x).float(), dim=1)[:, 1]
    if flip_tta:  # mirror left-right, predict, mirror back, average
        flipped = torch.softmax(model(torch.flip(x, dims=[3])).float(), dim=1)[:, 1]
        prob = (prob + torch.flip(flipped, dims=[2])) / 2
    return prob


def _zoomed_out(model: nn.Module, x: torch.Tensor, flip_tta: bool, zoom: float) -> torch.Tensor:
    """The probabilities of the frame shrunk to `zoom` of its side (the blank around it is what
    desensitizing leaves outside a scan region), mapped back onto the frame."""
    height, width = x.shape[-2:]
    small_h, small_w = round(height * zoom), round(width * zoom)
    top, left = (height - small_h) // 2, (width - small_w) // 2
    canvas = torch.zeros_like(x)
    canvas[..., top:top + small_h, left:left + small_w] = F.interpolate(
        x, size=(small_h, small_w), mode="area")
    prob = _probability(model, canvas, flip_tta)[:, None, top:top + small_h, left:left + small_w]
    return F.interpolate(prob, size=(height, width), mode="bilinear", align_corners=False)[:, 0]


@torch.inference_mode()
def nodule_probability(model: nn.Module, images: torch.Tensor, device: torch.device,
                       bf16: bool = False, flip_tta: bool = False, zoom: float = 0.0
                       ) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, H, W) float32 softmax probability of the nodule class; with
    `zoom`, averaged equally with that of the zoomed-out view (each with flip TTA if asked)."""
    x = as_input(images, device)
    with autocast(device, bf16):
        prob = _probability(model, x, flip_tta)
        if zoom:
            prob = (prob + _zoomed_out(model, x, flip_tta, zoom)) / 2
    return prob.float()


@torch.inference_mode()
def zoomed_out_probability(model: nn.Module, images: torch.Tensor, device: torch.device,
                           zoom: float, bf16: bool = False, flip_tta: bool = False
                           ) -> torch.Tensor:
    """The zoomed-out view alone (what nodule_probability averages in), for measuring it."""
    x = as_input(images, device)
    with autocast(device, bf16):
        return _zoomed_out(model, x, flip_tta, zoom).float()


class Ensemble(nn.Module):
    """Models of one architecture whose class probabilities are averaged (nnU-Net's way of
    using its fold models). forward returns the log of the mean softmax, so every caller's
    softmax over it yields the mean probability and nothing else needs to know."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.config = members[0].config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prob = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(0)
        return prob.clamp_min(1e-12).log()


def save(model: nn.Module, folder: str, metadata: dict) -> None:
    """model/ = weights.pt (state dict) + model.json (architecture, preparation, provenance)."""
    from . import storage

    module = unwrapped(model)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buffer)
    storage.write_bytes(storage.join(folder, WEIGHTS), buffer.getvalue())
    meta = dict(metadata, format=MODEL_FORMAT, weights=WEIGHTS,
                architecture=module.config.to_dict())
    storage.write_text(storage.join(folder, MODEL_JSON), json.dumps(meta, indent=2))


def save_ensemble(members: list[nn.Module], folder: str, metadata: dict) -> None:
    """model/ = member-<i>.pt (state dicts stored in fp16: half the bytes, and a U-Net's
    weights lose nothing measurable there) + model.json listing them."""
    from . import storage

    names = []
    for i, member in enumerate(members):
        buffer = io.BytesIO()
        torch.save({k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu())
                    for k, v in unwrapped(member).state_dict().items()}, buffer)
        names.append(f"member-{i}.pt")
        storage.write_bytes(storage.join(folder, names[-1]), buffer.getvalue())
    meta = dict(metadata, format=MODEL_FORMAT, members=names,
                architecture=unwrapped(members[0]).config.to_dict())
    storage.write_text(storage.join(folder, MODEL_JSON), json.dumps(meta, indent=2))


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
    weights_sha256: str = ""  # of the weights read (an ensemble's first alone with --fast)
    card: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    created: str | None = None
    distillation: dict | None = None

    @classmethod
    def from_json(cls, meta: dict, weights_sha256: str = "") -> "ModelInfo":
        members = meta.get("members")
        return cls(architecture=UNetConfig.from_dict(meta["architecture"]),
                   prep=PrepConfig.from_dict(meta["prep"]),
                   inference=Inference.from_json(meta),
                   members=len(members) if members else 1, ensemble=bool(members),
                   weights_sha256=weights_sha256, card=meta.get("card") or {},
                   training=meta.get("training") or {}, data=meta.get("data") or {},
                   created=meta.get("created"), distillation=meta.get("distillation"))

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


def read_info(folder: str, first_member_only: bool = False) -> ModelInfo:
    """A model folder (local or s3://) -> its ModelInfo, with `weights_sha256` the identity of
    the weights it names (an ensemble's first member alone when asked: infer --fast); the
    weights are read to hash them, not built into a network."""
    return _read_folder(folder, first_member_only)[0]


def _read_folder(folder: str, first_member_only: bool, member: int | None = None
                 ) -> tuple[ModelInfo, list[bytes]]:
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


def load(folder: str, device: torch.device | str = "cpu",
         first_member_only: bool = False, member: int | None = None
         ) -> tuple[nn.Module, ModelInfo]:
    """A model folder (local or s3://) -> (model in eval mode on `device`, its ModelInfo as
    read_info gives it). An ensemble's folder gives an Ensemble, or one member alone when
    asked: its first (infer --fast) or `member` (distill's fold teachers)."""
    info, blobs = _read_folder(folder, first_member_only, member)
    nets = []
    for weights in blobs:
        net = build(info.architecture)
        # fp16-stored weights are copied into the fp32 parameters
        net.load_state_dict(torch.load(io.BytesIO(weights), map_location="cpu",
                                       weights_only=True))
        nets.append(net)
    model = nets[0] if len(nets) == 1 else Ensemble(nets)
    return model.to(device).eval(), info


def resolve_bf16(precision: str, device) -> bool:
    """--precision auto|bf16|fp32 on this device -> whether to autocast to bf16."""
    import torch

    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def cpu_has_bf16() -> bool:
    """bf16 matrix units (AMX or AVX512-BF16) make CPU autocast 2-3x faster than fp32; without
    them bf16 is emulated and slower, so fp32 stays the default there."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
