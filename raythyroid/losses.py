"""The paper's edge-weighted softmax cross-entropy, and Dice + CE (nnU-Net's default).

The weight map is the original U-Net's: w(x) = w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)),
w0 = 10, sigma = 5 px. w_c balances the two classes of that mask (each class carries half of the
total weight, capped at 10x). d1 and d2 are the distances to the nearest and second-nearest
nodule outline; with a single nodule d2 = d1, so the band on both sides of every outline is
emphasised. It depends on the mask only, so it is computed once per mask (train caches it with
the decoded dataset) and warped along with image and mask by augmentation.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

# torch only inside the loss functions: decoding tasks import this module for the weight map,
# and each Ray worker process that runs one would otherwise spend ~2 s importing torch

W0 = 10.0
SIGMA = 5.0
MAX_CLASS_WEIGHT = 10.0
LOSSES = ("weighted-ce", "dice-ce")


def class_balance(mask: np.ndarray) -> np.ndarray:
    total = mask.size
    nodule = int(mask.sum())
    if nodule == 0 or nodule == total:
        return np.ones(mask.shape, np.float32)
    w_background = min(MAX_CLASS_WEIGHT, total / (2.0 * (total - nodule)))
    w_nodule = min(MAX_CLASS_WEIGHT, total / (2.0 * nodule))
    return np.where(mask > 0, w_nodule, w_background).astype(np.float32)


def _distance_to_outline(component: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the outline of one 0/1 component (inside and outside)."""
    outside = cv2.distanceTransform((component == 0).astype(np.uint8), cv2.DIST_L2, 5)
    inside = cv2.distanceTransform(component.astype(np.uint8), cv2.DIST_L2, 5)
    return np.where(component > 0, inside, outside).astype(np.float32)


def boundary_weight_map(mask: np.ndarray, w0: float = W0, sigma: float = SIGMA) -> np.ndarray:
    """(H, W) 0/1 mask -> (H, W) float32 per-pixel loss weight."""
    mask = (mask > 0).astype(np.uint8)
    weights = class_balance(mask)
    count, labels = cv2.connectedComponents(mask, connectivity=8)
    if count <= 1:
        return weights
    distances = np.stack([_distance_to_outline((labels == i).astype(np.uint8))
                          for i in range(1, count)])
    if distances.shape[0] == 1:
        d1 = d2 = distances[0]
    else:
        nearest_two = np.partition(distances, 1, axis=0)[:2]
        d1, d2 = nearest_two[0], nearest_two[1]
    return weights + w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma ** 2)).astype(np.float32)


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                           weight: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    per_pixel = F.cross_entropy(logits.float(), target, reduction="none")
    return (per_pixel * weight).sum() / weight.sum().clamp_min(1e-6)


def dice_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0
                       ) -> torch.Tensor:
    """Soft Dice of the nodule class over the whole batch, plus plain cross-entropy."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    prob = torch.softmax(logits, dim=1)[:, 1]
    truth = (target == 1).float()
    intersection = (prob * truth).sum()
    dice = (2 * intersection + smooth) / (prob.sum() + truth.sum() + smooth)
    return ce + (1 - dice)


def supervised(name: str, outputs, target: torch.Tensor,
               weight: torch.Tensor | None) -> torch.Tensor:
    """The loss of a network's output: one logits tensor, or a deep-supervision list (full
    resolution first, then 1/2, 1/4, ...) scored against nearest-downsampled targets with
    weights halving per level (nnU-Net's), normalised to sum to one."""
    import torch

    if isinstance(outputs, torch.Tensor):
        return loss(name, outputs, target, weight)
    total, norm = 0.0, 0.0
    for level, logits in enumerate(outputs):
        step = 2 ** level
        share = 0.5 ** level
        total = total + share * loss(name, logits, target[:, ::step, ::step],
                                     None if weight is None else weight[:, ::step, ::step])
        norm += share
    return total / norm


def soft_cross_entropy(logits: torch.Tensor, soft: torch.Tensor, temperature: float = 1.0
                       ) -> torch.Tensor:
    """Cross-entropy against a teacher's nodule probabilities (Hinton et al.'s distillation
    loss), both softened by `temperature` and scaled by its square so that the gradients keep
    their size. With two classes the teacher's logit difference is logit(p), so softening a
    stored probability needs no logits: sigmoid(logit(p) / T)."""
    import torch

    p = soft.float().clamp(1e-4, 1 - 1e-4)
    if temperature != 1.0:
        p = torch.sigmoid(torch.logit(p) / temperature)
    log_q = torch.log_softmax(logits.float() / temperature, dim=1)
    return -((1 - p) * log_q[:, 0] + p * log_q[:, 1]).mean() * temperature ** 2


def distilled(name: str, outputs, target: torch.Tensor, weight: torch.Tensor | None,
              soft: torch.Tensor, labelled: torch.Tensor, soft_weight: float,
              temperature: float) -> torch.Tensor:
    """A student's loss: `name`'s supervised loss over the frames that have a label, and the
    soft cross-entropy to the teacher over every frame, mixed by `soft_weight`."""
    import torch

    main = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
    taught = soft_cross_entropy(main, soft, temperature)
    if bool(labelled.any()):
        def pick(t):
            return t[labelled]
        hard = supervised(name, pick(outputs) if isinstance(outputs, torch.Tensor)
                          else [pick(o) for o in outputs], pick(target),
                          None if weight is None else pick(weight))
    else:  # every head stays in the graph, so DDP finds a gradient for each parameter
        heads = [outputs] if isinstance(outputs, torch.Tensor) else outputs
        hard = sum(h.float().sum() for h in heads) * 0.0
    return (1 - soft_weight) * hard + soft_weight * taught


def loss(name: str, logits: torch.Tensor, target: torch.Tensor,
         weight: torch.Tensor | None) -> torch.Tensor:
    if name == "weighted-ce":
        return weighted_cross_entropy(logits, target, weight)
    if name == "dice-ce":
        return dice_cross_entropy(logits, target)
    raise ValueError(f"unknown loss {name!r}")
