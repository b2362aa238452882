"""Infer throughput: the Ray job against a bare single-process loop doing the same work.

Both read the same files, decode + prepare them with imaging.prepare, run the same model with the
same batch size and cores, post-process back to the original geometry and write mask PNGs and a
results table. Also model-only images/s on prepared tensors: the ceiling for both.

    python bench/infer_bench.py [--frames 400] [--size 256] [--batch 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

import numpy as np  # noqa: E402

from common import make_model, median, phantom_archive, record  # noqa: E402


def bare_loop(model_dir: str, files: list[str], out: str, batch: int, threads: int,
              gpu: bool = False) -> float:
    import pyarrow as pa
    import torch

    from raythyroid import imaging, model, postprocess, storage

    torch.set_num_threads(threads)
    device = torch.device("cuda" if gpu else "cpu")
    net, info = model.load(model_dir, device)
    prep = info.prep
    bf16 = model.resolve_bf16("auto", device)
    post = info.inference.post  # as the job does
    rows = []
    started = time.time()
    for i in range(0, len(files), batch):
        chunk = files[i:i + batch]
        prepared = [imaging.prepare(imaging.decode(storage.read_bytes(f)), prep) for f in chunk]
        images = torch.from_numpy(np.stack([p[0] for p in prepared]))
        prob = model.nodule_probability(net, images, device, bf16).cpu().numpy()
        for f, (_, geometry), p in zip(chunk, prepared, prob):
            full = geometry.restore(p)
            mask = postprocess.clean_mask(full, post)
            key = os.path.splitext(os.path.basename(f))[0]
            storage.write_bytes(f"{out}/masks/{key}.png",
                                imaging.encode_png(mask.astype(np.uint8) * 255))
            rows.append(dict(postprocess.describe(mask, full, None), key=key, source_uri=f))
    storage.write_parquet(f"{out}/results.parquet", pa.Table.from_pylist(rows))
    return len(files) / (time.time() - started)


def model_only(model_dir: str, size: int, batch: int, threads: int, n: int = 192,
               gpu: bool = False, compile_model: bool = False) -> float:
    import torch

    from raythyroid import model

    torch.set_num_threads(threads)
    device = torch.device("cuda" if gpu else "cpu")
    net, _ = model.load(model_dir, device)
    if compile_model:
        net = torch.compile(net)
    bf16 = model.resolve_bf16("auto", device)
    images = torch.randint(0, 255, (batch, size, size), dtype=torch.uint8)
    for _ in range(3):  # warm-up (and compilation)
        model.nodule_probability(net, images, device, bf16)
    if gpu:
        torch.cuda.synchronize()
    started = time.time()
    for _ in range(n // batch):
        model.nodule_probability(net, images, device, bf16)
    if gpu:
        torch.cuda.synchronize()
    return (n // batch) * batch / (time.time() - started)


def ray_job(model_dir: str, folder: str, out: str, batch: int, workers: int,
            gpu: bool = False, compile_model: bool = False) -> float:
    from raythyroid import infer

    started = time.time()
    summary = infer.run(model_dir, folder, out,
                        options=infer.InferOptions(batch_size=batch, workers=workers, gpu=gpu,
                                                   compile=compile_model, tta=False),
                        log=lambda *_: None)
    return summary.rows / (time.time() - started)


def main() -> None:
    from raythyroid import runtime

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="model on the GPU (one actor per GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "raythyroid-infer-bench"))
    args = parser.parse_args()
    folder = phantom_archive(args.workdir, args.frames, seed=9)
    files = sorted(os.path.join(folder, "images", f) for f in os.listdir(f"{folder}/images"))
    model_dir = make_model(args.size, args.workdir)
    cores = os.cpu_count()

    gpus = 0
    if args.gpu:
        import torch

        gpus = torch.cuda.device_count()
    ceiling = median(model_only(model_dir, args.size, args.batch, cores, gpu=args.gpu,
                                compile_model=args.compile) for _ in range(args.repeats))
    bare = []
    for r in range(args.repeats):
        out = os.path.join(args.workdir, f"bare-{r}")
        shutil.rmtree(out, ignore_errors=True)
        bare.append(bare_loop(model_dir, files, out, args.batch, cores, gpu=args.gpu))
    ray_rates = {n: [] for n in ((1, 2) if not args.gpu else sorted({1, max(1, gpus)}))}
    with runtime.session():
        shutil.rmtree(os.path.join(args.workdir, "warm"), ignore_errors=True)
        ray_job(model_dir, f"{folder}/images", os.path.join(args.workdir, "warm"), args.batch, 1,
                args.gpu, args.compile)
        for r in range(args.repeats):
            for workers in ray_rates:
                out = os.path.join(args.workdir, f"ray-{workers}-{r}")
                shutil.rmtree(out, ignore_errors=True)
                ray_rates[workers].append(ray_job(model_dir, f"{folder}/images", out,
                                                  args.batch, workers, args.gpu, args.compile))
    bare_m = median(bare)
    best = max(median(v) for v in ray_rates.values())
    lines = ["| loop | images/s (median) | vs bare loop |", "| --- | ---: | ---: |",
             f"| model only (prepared tensors in memory, {cores} threads) | {ceiling:.1f} | "
             f"{ceiling / bare_m:.2f} |",
             f"| bare loop: read, decode, prepare, predict, post-process, write | {bare_m:.1f} "
             f"| 1.00 |"]
    for workers, rates in ray_rates.items():
        lines.append(f"| Ray infer job, {workers} Predictor actor(s) | {median(rates):.1f} | "
                     f"{median(rates) / bare_m:.2f} |")
    record(f"infer throughput, {args.frames} frames 560x360 -> {args.size}px, batch "
           f"{args.batch}{', GPU' if args.gpu else ''}{', torch.compile' if args.compile else ''}",
           lines,
           [f"each Ray run includes listing, scheduling and the results/metrics pass; "
            f"{args.repeats} runs each after one warm-up run",
            f"target >= 0.9x the bare loop: {best / bare_m:.2f}x "
            f"({'met' if best / bare_m >= 0.9 else 'not met'})",
            f"raw: {json.dumps({'bare': bare, 'ray': ray_rates, 'model_only': ceiling})}"])


if __name__ == "__main__":
    main()
