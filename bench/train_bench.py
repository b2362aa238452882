"""Train throughput: Ray Train (DDP over workers) against a bare single-process torch loop.

Both read the same preprocess shards, decode them once, compute the same boundary weight maps,
augment the same way and train the same U-Net with the same global batch, precision and cores.
Steady-state images/s (median over epochs after the first) go to BENCHMARKS.md.

    python bench/train_bench.py [--data PREPROCESS_OUTPUT] [--frames 200 --size 256] [--epochs 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

import numpy as np  # noqa: E402

from common import median, phantom_shards, record  # noqa: E402


def load_training_arrays(data: str):
    from raythyroid import imaging, losses, shards

    rows = shards.read_rows(data, shards.read_manifest(data), "train", ["image", "mask"])
    images = np.stack([imaging.decode_png(r["image"]) for r in rows])
    masks = np.stack([imaging.decode_png(r["mask"]) for r in rows])
    weights = np.stack([losses.boundary_weight_map(m) for m in masks]).astype(np.float16)
    return images, masks, weights


def bare_loop(data: str, epochs: int, batch: int, threads: int, config,
              gpu: bool = False) -> list[float]:
    """What a user would write without Ray: one process, all cores, arrays in memory."""
    import torch

    from raythyroid import augment, losses, model

    torch.set_num_threads(threads)
    images, masks, weights = load_training_arrays(data)
    device = torch.device("cuda" if gpu else "cpu")
    bf16 = model.resolve_bf16(config.precision, device)
    torch.manual_seed(0)
    net = model.build(model.UNetConfig(base=config.base)).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate)
    rng = np.random.default_rng(0)
    rates = []
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        seen, t0 = 0, time.time()
        for b in range(len(order) // batch):
            idx = order[b * batch:(b + 1) * batch]
            x, y, w = augment.augment_batch(images[idx], masks[idx], weights[idx],
                                            augment.batch_rng(0, epoch, 0, b))
            with model.autocast(device, bf16):
                logits = net(model.as_input(torch.from_numpy(x), device))
            loss = losses.loss(config.loss, logits, torch.from_numpy(y).long().to(device),
                               torch.from_numpy(w).float().to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(idx)
        if gpu:
            torch.cuda.synchronize()
        rates.append(seen / (time.time() - t0))
    return rates


def ray_train(data: str, epochs: int, workers: int, batch_per_worker: int, config,
              gpu: bool = False) -> list[float]:
    import dataclasses
    import json

    from raythyroid import runtime, storage, train

    run_uri = tempfile.mkdtemp(prefix="raythyroid-bench-run-")
    cfg = dataclasses.replace(config, epochs=epochs, batch_size=batch_per_worker)
    with runtime.session():
        train.run(data, run_uri, cfg, workers=workers, gpu=gpu, log=lambda *_: None)
    rows = [json.loads(line) for line in
            storage.read_text(storage.join(run_uri, "history.jsonl")).splitlines()]
    return [r["images_per_s"] for r in rows]


def main() -> None:
    from raythyroid import training

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", help="preprocess OUTPUT (default: phantoms, preprocessed)")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--gpu", action="store_true", help="one GPU: bare loop vs 1 DDP worker")
    args = parser.parse_args()
    data = args.data or phantom_shards(args.frames, args.size)
    cores = os.cpu_count()
    config = training.TrainConfig(precision=args.precision)
    bare = median(bare_loop(data, args.epochs, args.batch, cores, config, args.gpu)[1:])
    one = median(ray_train(data, args.epochs, 1, args.batch, config, args.gpu)[1:])
    if args.gpu:
        record(f"train throughput on one GPU, {args.size}px, batch {args.batch}, "
               f"precision {args.precision}",
               ["| loop | images/s | vs bare loop |", "| --- | ---: | ---: |",
                f"| bare torch loop | {bare:.1f} | 1.00 |",
                f"| Ray Train, 1 worker (DDP, NCCL) | {one:.1f} | {one / bare:.2f} |"])
        return
    two = median(ray_train(data, args.epochs, 2, args.batch // 2, config)[1:])
    best = max(one, two)
    record(f"train throughput, {args.size}px, global batch {args.batch}, "
           f"precision {args.precision}",
           ["| loop | images/s (median of epochs 2..N) | vs bare loop |",
            "| --- | ---: | ---: |",
            f"| bare torch loop, 1 process, {cores} threads | {bare:.1f} | 1.00 |",
            f"| Ray Train, 1 worker | {one:.1f} | {one / bare:.2f} |",
            f"| Ray Train, 2 workers (DDP, gloo) | {two:.1f} | {two / bare:.2f} |"],
           [f"target >= 0.85x the bare loop: best Ray Train configuration is "
            f"{best / bare:.2f}x ({'met' if best / bare >= 0.85 else 'not met'})"])


if __name__ == "__main__":
    main()
