#!/usr/bin/env bash
# The GPU measurements, as one script for a machine with an NVIDIA GPU (run from the repo root
# after `make install`, with a CUDA build of torch in .venv):
#   - infer at 256^2, bf16, end to end (Ray job) against model-only images/s, with and without
#     torch.compile;
#   - DDP training images/s on one GPU (Ray Train, NCCL) against a bare loop.
# Each appends its table to bench/BENCHMARKS.md. Targets: >= 2,000 images/s end to end on one
# H100 at 256^2, >= 70% of model-only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
"$PY" bench/infer_bench.py --gpu --frames 8000 --size 256 --batch 256 --repeats 2
"$PY" bench/infer_bench.py --gpu --compile --frames 8000 --size 256 --batch 256 --repeats 2
"$PY" bench/train_bench.py --gpu --frames 600 --size 256 --batch 64 --epochs 4
