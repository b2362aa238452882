"""Preprocess throughput: the Ray job against a bare single-process cv2 loop doing the same work.

Both read every pair, decode, desensitize, CLAHE and resize with imaging.prepare, encode both
PNGs, hash the image, split by case and write Parquet shards per split.

    python bench/preprocess_bench.py [--frames 1500] [--size 256] [--repeats 3] [--data DIR]
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

from common import median, record  # noqa: E402


def bare_loop(data: str, out: str, size: int) -> float:
    import pyarrow as pa

    from raythyroid import layouts, preprocess, split, storage
    from raythyroid.imaging import PrepConfig

    started = time.time()
    _, pairs, _ = layouts.scan(data)
    config = PrepConfig(size=size)
    rows = []
    for pair in pairs:
        row = {"key": pair.key, "case_id": pair.case_id, "source_uri": pair.image_uri}
        row.update(preprocess.prepare_pair(pair.to_dict(), config, 10**9))
        rows.append(row)
    duplicates = split.find_duplicates((r["key"], r["sha256"]) for r in rows)
    kept = [r for r in rows if r["key"] not in duplicates]
    assignment = split.assign((r["key"], r["case_id"], None) for r in kept)
    for name in split.SPLITS:
        chosen = [dict(r, split=name) for r in kept if assignment[r["key"]] == name]
        table = pa.Table.from_pylist(chosen).select(preprocess.SHARD_COLUMNS)
        storage.write_parquet(f"{out}/{name}/part-0.parquet", table)
    return len(pairs) / (time.time() - started)


def ray_job(data: str, out: str, size: int) -> float:
    from raythyroid import preprocess
    from raythyroid.imaging import PrepConfig

    started = time.time()
    manifest = preprocess.run(data, out, config=PrepConfig(size=size), log=lambda *_: None)
    return (manifest["rows"] + manifest["errors"]) / (time.time() - started)


def main() -> None:
    from raythyroid import phantom, runtime

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", help="a dataset root instead of phantoms (e.g. DDTI)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "raythyroid-preprocess-bench"))
    args = parser.parse_args()
    data = args.data or os.path.join(args.workdir, f"phantoms-{args.frames}")
    if not args.data and not os.path.isdir(data):
        phantom.write_folders(data, args.frames, seed=13)
    bare = []
    for r in range(args.repeats):
        out = os.path.join(args.workdir, f"bare-{r}")
        shutil.rmtree(out, ignore_errors=True)
        bare.append(bare_loop(data, out, args.size))
    ray_rates = []
    with runtime.session():
        ray_job(data, os.path.join(args.workdir, "warm"), args.size)
        for r in range(args.repeats):
            ray_rates.append(ray_job(data, os.path.join(args.workdir, f"ray-{r}"), args.size))
    bare_m, ray_m = median(bare), median(ray_rates)
    source = args.data or f"{args.frames} phantom frames 560x360 (JPEG)"
    record(f"preprocess throughput, {source} -> {args.size}px",
           ["| loop | pairs/s (median) | vs bare loop |", "| --- | ---: | ---: |",
            f"| bare cv2 loop, 1 process | {bare_m:.1f} | 1.00 |",
            f"| Ray preprocess job (tasks on all cores) | {ray_m:.1f} | {ray_m / bare_m:.2f} |"],
           [f"{args.repeats} runs each, the Ray job after one warm-up run; both include listing, "
            f"dedupe, split and writing Parquet",
            f"target >= 0.8x the bare loop: {ray_m / bare_m:.2f}x "
            f"({'met' if ray_m / bare_m >= 0.8 else 'not met'})",
            f"raw: {json.dumps({'bare': bare, 'ray': ray_rates})}"])


if __name__ == "__main__":
    main()
