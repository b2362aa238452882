"""Infer throughput: the Ray job against a bare single-process loop doing the same work.

Both read the same files, decode + prepare them with imaging.prepare, run the same model with the
same batch size and cores, post-process back to the original geometry and write mask PNGs and a
results table. Also model-only images/s on prepared tensors: the ceiling for both.

    python bench/infer_bench.py [--frames 400] [--size 256] [--batch 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

import numpy as np  # noqa: E402

from common import median, record  # noqa: E402


def make_model(size: int, workdir: str) -> str:
    """A U-Net with the project's model folder layout; trained weights are not needed to time
    it, but post-processing cost depends on what it predicts, so it is trained for a few
    epochs on phantoms."""
    from raythyroid import phantom, preprocess, runtime, train
    from raythyroid.imaging import PrepConfig

    model_dir = os.path.join(workdir, "run", "model")
    if not os.path.exists(os.path.join(model_dir, "model.json")):
        with runtime.session():
            phantom.write_folders(os.path.join(workdir, "train-raw"), 120, seed=5)
            preprocess.run(os.path.join(workdir, "train-raw"), os.path.join(workdir, "prep"),
                           config=PrepConfig(size=size), log=lambda *_: None)
            train.run(os.path.join(workdir, "prep"), os.path.join(workdir, "run"),
                      train.TrainConfig(epochs=3), workers=1, log=lambda *_: None)
    return model_dir


def bare_loop(model_dir: str, files: list[str], out: str, batch: int, threads: int) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from raythyroid import imaging, model, postprocess, storage, train

    torch.set_num_threads(threads)
    net, meta = model.load(model_dir)
    prep = imaging.PrepConfig.from_dict(meta["prep"])
    device = torch.device("cpu")
    bf16 = train._resolve_bf16("auto", device)
    post = postprocess.PostConfig()
    rows = []
    started = time.time()
    for i in range(0, len(files), batch):
        chunk = files[i:i + batch]
        prepared = [imaging.prepare(imaging.decode(storage.read_bytes(f)), prep) for f in chunk]
        images = torch.from_numpy(np.stack([p[0] for p in prepared]))
        prob = model.nodule_probability(net, images, device, bf16).numpy()
        for f, (_, geometry), p in zip(chunk, prepared, prob):
            full = geometry.restore(p)
            mask = postprocess.clean_mask(full, post)
            key = os.path.splitext(os.path.basename(f))[0]
            storage.write_bytes(f"{out}/masks/{key}.png",
                                imaging.encode_png(mask.astype(np.uint8) * 255))
            rows.append(dict(postprocess.describe(mask, full, None), key=key, source_uri=f))
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes(f"{out}/results.parquet", buffer.getvalue())
    return len(files) / (time.time() - started)


def model_only(model_dir: str, size: int, batch: int, threads: int, n: int = 192) -> float:
    import torch

    from raythyroid import model, train

    torch.set_num_threads(threads)
    net, _ = model.load(model_dir)
    device = torch.device("cpu")
    bf16 = train._resolve_bf16("auto", device)
    images = torch.randint(0, 255, (batch, size, size), dtype=torch.uint8)
    model.nodule_probability(net, images, device, bf16)  # warm-up
    started = time.time()
    for _ in range(n // batch):
        model.nodule_probability(net, images, device, bf16)
    return (n // batch) * batch / (time.time() - started)


def ray_job(model_dir: str, folder: str, out: str, batch: int, workers: int) -> float:
    from raythyroid import infer

    started = time.time()
    summary = infer.run(model_dir, folder, out,
                        options=infer.InferOptions(batch_size=batch, workers=workers),
                        log=lambda *_: None)
    return summary["rows"] / (time.time() - started)


def main() -> None:
    from raythyroid import phantom, runtime

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "raythyroid-infer-bench"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    folder = os.path.join(args.workdir, f"archive-{args.frames}")
    if not os.path.isdir(folder):
        phantom.write_folders(folder, args.frames, seed=9)
    files = sorted(os.path.join(folder, "images", f) for f in os.listdir(f"{folder}/images"))
    model_dir = make_model(args.size, args.workdir)
    cores = os.cpu_count()

    ceiling = median(model_only(model_dir, args.size, args.batch, cores)
                     for _ in range(args.repeats))
    bare = []
    for r in range(args.repeats):
        out = os.path.join(args.workdir, f"bare-{r}")
        shutil.rmtree(out, ignore_errors=True)
        bare.append(bare_loop(model_dir, files, out, args.batch, cores))
    ray_rates = {1: [], 2: []}
    with runtime.session():
        ray_job(model_dir, f"{folder}/images", os.path.join(args.workdir, "warm"), args.batch, 1)
        for r in range(args.repeats):
            for workers in ray_rates:
                out = os.path.join(args.workdir, f"ray-{workers}-{r}")
                shutil.rmtree(out, ignore_errors=True)
                ray_rates[workers].append(ray_job(model_dir, f"{folder}/images", out,
                                                  args.batch, workers))
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
           f"{args.batch}", lines,
           [f"each Ray run includes listing, scheduling and the results/metrics pass; "
            f"{args.repeats} runs each after one warm-up run",
            f"target >= 0.9x the bare loop: {best / bare_m:.2f}x "
            f"({'met' if best / bare_m >= 0.9 else 'not met'})",
            f"raw: {json.dumps({'bare': bare, 'ray': ray_rates, 'model_only': ceiling})}"])


if __name__ == "__main__":
    main()
