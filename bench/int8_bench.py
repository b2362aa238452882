"""A one-pass model in fp32, bf16 autocast and int8 (torch's FX static quantization, x86
backend, calibrated on training frames) on this CPU: model-only images/s side by side, and
what int8 costs on a prepared test split (pooled n_IoU in each frame's own geometry, the
model's own post-processing).

    python bench/int8_bench.py DATA [--model ddti] [--batch 16] [--repeats 5] [--threads 2]

DATA: a preprocess OUTPUT prepared as the model's model.json prepares (its train split
calibrates, its test split scores). An ensemble gives its first member (what a one-pass
student costs). int8 is adopted only where it is at least 1.5x faster end to end and costs at
most 0.005 n_IoU: model-only speed bounds the end-to-end gain from above, and
`bench/ensemble_bench.py --student` times a student's int8 weights end to end.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import median, portable, record  # noqa: E402


def probability(net, images: np.ndarray, bf16: bool, channels_last: bool) -> np.ndarray:
    import torch

    x = torch.from_numpy(images).unsqueeze(1).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        return torch.softmax(net(x).float(), dim=1)[:, 1].numpy()


def pooled_n_iou(predict, rows: list[dict], post) -> float:
    from raythyroid import imaging, metrics, postprocess

    totals = metrics.Totals()
    for start in range(0, len(rows), 16):
        part = rows[start:start + 16]
        images = np.stack([imaging.decode_png(r["image"]) for r in part])
        for row, prob in zip(part, predict(images)):
            restored = imaging.Geometry.from_dict(row["geometry"]).restore(prob)
            totals.add(imaging.decode_png(row["full_mask"]) > 0,
                       postprocess.clean_mask(restored, post))
    return totals.metrics()["n_iou"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--model", default="ddti")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from raythyroid import int8, model, shards

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="torch.ao")  # its deprecation notices, per call
    net, info = model.load(model.resolve(args.model), first_member_only=True)
    manifest = shards.read_manifest(args.data)
    calibration = int8.calibration_frames(args.data, manifest, int8.CALIBRATION_FRAMES)
    test_rows = shards.read_rows(args.data, manifest, "test",
                                 ["image", "full_mask", "geometry"])
    quantized = int8.quantize(net, calibration)  # what `raythyroid quantize` stores
    variants = {"fp32 channels_last": lambda x: probability(net, x, False, True),
                "bf16 autocast channels_last": lambda x: probability(net, x, True, True),
                "int8 (FX, x86; up-convolutions fp32) channels_last":
                    lambda x: probability(quantized, x, False, True)}
    batch = np.resize(calibration, (args.batch,) + calibration.shape[1:])
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for name, predict in variants.items():
        predict(batch)  # warm-up: kernels chosen, weights packed
    for _ in range(args.repeats):
        for name, predict in variants.items():
            started = time.perf_counter()
            predict(batch)
            rates[name].append(args.batch / (time.perf_counter() - started))
    post = info.inference.post
    scores = {name: pooled_n_iou(predict, test_rows, post)
              for name, predict in variants.items()}
    base = median(rates["fp32 channels_last"])
    lines = ["| precision | images/s (model only, median) | vs fp32 | test n_IoU (pooled) "
             "| vs fp32 |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in variants:
        rate = median(rates[name])
        lines.append(f"| {name} | {rate:.2f} | {rate / base:.2f}x | {scores[name]:.4f} | "
                     f"{scores[name] - scores['fp32 channels_last']:+.4f} |")
    first = " (its first member)" if info.ensemble else ""
    record(f"int8 vs bf16 vs fp32: one pass of {portable(args.model)}{first}, batch {args.batch} "
           f"at {calibration.shape[-1]} px, {args.threads} threads", lines,
           [f"{args.repeats} timed batches each, alternating, after a warm-up; the test split's "
            f"{len(test_rows)} frames scored in their own geometry without TTA, the model's "
            f"threshold and components; int8 calibrated on {len(calibration)} training frames "
            f"as `raythyroid quantize` picks them",
            f"bf16 units on this CPU: {model.cpu_has_bf16()}"])


if __name__ == "__main__":
    main()
