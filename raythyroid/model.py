"""The U-Net: four poolings down, four up, skip connections, BatchNorm, two-class softmax output.

Readable top to bottom; the architecture is a dataclass stored in model.json
(modelinfo.UNetConfig), so a model folder rebuilds itself with this file and that record. Input
is the prepared uint8 image as float (0..255); the scaling to unit range happens inside, so no
caller can get it wrong.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# A model folder's record is defined in modelinfo (no torch there); its names are also this
# module's, beside the network they describe, for the rooms that load one.
from .modelinfo import (  # noqa: F401
    BUNDLED, CARD, CLASS_NAMES, MODEL_FORMAT, MODEL_JSON, WEIGHTS, Inference, ModelInfo,
    UNetConfig, bundled, read_folder, read_info, resolve)


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


def load(folder: str, device: torch.device | str = "cpu",
         first_member_only: bool = False, member: int | None = None, fast: bool = False
         ) -> tuple[nn.Module, ModelInfo]:
    """A model folder (local or s3://) -> (model in eval mode on `device`, its ModelInfo as
    read_info gives it). An ensemble's folder gives an Ensemble, or one member alone when
    asked: its first (--init) or `member` (distill's fold teachers); `fast` gives the network
    infer --fast runs (modelinfo.one_pass)."""
    info, blobs = read_folder(folder, first_member_only, member, fast)
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
