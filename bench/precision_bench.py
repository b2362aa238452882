"""Which precision and memory layout `--precision auto` should pick on this CPU.

The shipped U-Net's training step (forward, loss, backward, AdamW; batch 8 at 256 px) and its
inference forward pass, timed one after the other in one process with the threads the cores
allow: fp32 in the layout the model uses (channels_last), fp32 in the default (contiguous)
layout, and bf16 autocast. auto takes bf16 only where the CPU has bf16 units (AMX or
AVX512-BF16); elsewhere bf16 is emulated, and this says by how much that would cost.

    python bench/precision_bench.py [--steps 6] [--record]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import median, record  # noqa: E402

BATCH, SIDE = 8, 256


def images_per_second(channels_last: bool, bf16: bool, train: bool, steps: int) -> float:
    import torch

    from raythyroid import model

    torch.manual_seed(0)
    images = torch.randint(0, 256, (BATCH, SIDE, SIDE), dtype=torch.uint8)
    target = torch.randint(0, 2, (BATCH, SIDE, SIDE))
    cpu = torch.device("cpu")
    if channels_last:  # what training and inference use: the model's build and input
        net, x = model.build(), model.as_input(images, cpu)
    else:
        net, x = model.UNet(model.UNetConfig()), images.unsqueeze(1).float()
    optimizer = torch.optim.AdamW(net.parameters())
    net.train(train)
    seconds = []
    for _ in range(steps + 1):  # the first step warms up the kernels and is dropped
        started = time.perf_counter()
        if train:
            with model.autocast(cpu, bf16):
                loss = torch.nn.functional.cross_entropy(net(x).float(), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            with torch.inference_mode(), model.autocast(cpu, bf16):
                net(x)
        seconds.append(time.perf_counter() - started)
    return BATCH / median(seconds[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    args = parser.parse_args()

    import torch

    from raythyroid import model

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use
    variants = [("fp32, channels_last (the model's layout)", True, False),
                ("fp32, contiguous", False, False),
                ("bf16 autocast, channels_last", True, True)]
    lines = ["| precision, layout | train images/s | vs fp32 channels_last | "
             "infer images/s | vs fp32 channels_last |", "|---|---:|---:|---:|---:|"]
    base = {}
    for name, channels_last, bf16 in variants:
        speeds = [images_per_second(channels_last, bf16, train, args.steps)
                  for train in (True, False)]
        base = base or dict(zip(("train", "infer"), speeds))
        lines.append(f"| {name} | {speeds[0]:.1f} | {speeds[0] / base['train']:.2f} | "
                     f"{speeds[1]:.1f} | {speeds[1] / base['infer']:.2f} |")
        print(lines[-1], flush=True)
    auto = "bf16" if model.cpu_has_bf16() else "fp32"
    notes = [f"this CPU has bf16 units: {model.cpu_has_bf16()}; `--precision auto` takes "
             f"{auto} here", f"batch {BATCH} at {SIDE} px, {torch.get_num_threads()} threads, "
             f"median of {args.steps} steps after a warm-up step"]
    if args.record:
        record("precision and layout on this CPU: what --precision auto picks", lines, notes)
    else:
        print("\n".join(lines + [""] + notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
