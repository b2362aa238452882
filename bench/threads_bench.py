"""Torch threads on shared cores: the U-Net's training step and forward pass, in one process
alone and in two processes side by side (as two test lanes, or two jobs on one node, run them),
with 1 or all cores' threads, under OpenMP's default wait policy (threads spin between parallel
regions) and under OMP_WAIT_POLICY=PASSIVE (they sleep).

Each cell runs its processes for --seconds and counts the steps all of them finished; the
ratio column is against the default policy with all cores' threads, at the same number of
processes. Appends to BENCHMARKS.md.

    python bench/threads_bench.py [--seconds 15] [--size 64] [--batch 8]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import record  # noqa: E402

WORKER = r"""
import sys, time
import torch
from raythyroid import model
threads, seconds, size, batch, kind = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
torch.manual_seed(0)
net = model.build(model.UNetConfig())
optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
images = torch.randn(batch, 1, size, size)
masks = torch.randint(0, 2, (batch, size, size))

def step():
    if kind == "forward":
        with torch.inference_mode():
            net(images)
        return
    out = net(images)
    out = out[0] if isinstance(out, (list, tuple)) else out
    loss = torch.nn.functional.cross_entropy(out, masks)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

if kind == "forward":
    net.eval()
for _ in range(2):  # warm-up: first calls allocate and pick kernels
    step()
start, steps = time.time(), 0
while time.time() - start < seconds:
    step()
    steps += 1
print(steps / (time.time() - start))
"""


def run_cell(processes: int, threads: int, passive: bool, kind: str, args) -> float:
    """Steps per second summed over `processes` running at once."""
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(threads), str(args.seconds),
                               str(args.size), str(args.batch), kind],
                              env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    rates = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"worker failed (exit {proc.returncode})")
        rates.append(float(out.strip().splitlines()[-1]))
    return sum(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    variants = [(cores, False, "default"), (cores, True, "PASSIVE"), (1, False, "default")]
    lines = ["| workload | processes at once | threads each | OMP_WAIT_POLICY | steps/s, all "
             "processes | vs default with all cores' threads |",
             "| --- | ---: | ---: | --- | ---: | ---: |"]
    for kind in ("train step", "forward"):
        for processes in (1, 2):
            baseline = None
            for threads, passive, policy in variants:
                rate = run_cell(processes, threads, passive, kind.split()[0], args)
                baseline = baseline or rate
                lines.append(f"| {kind} | {processes} | {threads} | {policy} | {rate:.2f} | "
                             f"{rate / baseline:.2f}x |")
                print(lines[-1], flush=True)
    record("torch threads on shared cores: OpenMP's wait policy", lines, [
        f"the phantom U-Net (base config) on batches of {args.batch} at {args.size}x"
        f"{args.size}, {args.seconds:.0f} s a cell after two warm-up steps; fp32"])


if __name__ == "__main__":
    main()
