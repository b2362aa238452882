"""The infer report at paper scale: a synthetic results folder of 1,000,000 rows (results files
of one block each, as the job writes them, with the review sidecars its blocks would keep under
the run's review bar), turned into OUTPUT/report/ by report.write_infer, timed, with the peak
memory of the process that does it and the size of the page.

    python bench/report_bench.py [--rows 1000000] [--rows-per-file 64]

Target: under 60 s and 2 GiB on the 2-core machine; the page stays small (no per-row HTML).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import cached_folder, record  # noqa: E402


def write_review_sidecars(output: str, size: int) -> int:
    """What the job's blocks keep, block by block in the order they were written: each frame
    at or under the review bar (review_bar.ReviewBar) gets an overlay. Returns the overlays
    kept."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from raythyroid import figures, results, review_bar, storage

    bar = review_bar.ReviewBar(size)
    image = (np.random.default_rng(1).random((256, 256)) * 255).astype(np.uint8)
    disc = np.zeros((256, 256), np.uint8)
    disc[96:160, 80:176] = 1
    overlay = figures.thumbnail(image, disc, disc)
    kept = 0
    for uri in storage.list_files(storage.join(output, results.RESULTS), (".parquet",)):
        block = storage.read_parquet(uri, ["key", "status", "confidence", "iou", "area_px",
                                           "area_mm2"])
        ok = block.filter(pc.equal(block.column("status"), "ok")).to_pylist()
        ranked = {name: sorted(ok, key=lambda r: (r[name], r["key"]))[:size]
                  for name in ("confidence", "iou")}
        bars = bar.offer({name: [(r[name], r["key"]) for r in rows]
                          for name, rows in ranked.items()})
        chosen = {r["key"]: r for name, rows in ranked.items() for r in rows
                  if bars[name] is None or (r[name], r["key"]) <= bars[name]}
        if chosen:
            rows = [dict(r, thumbnail=overlay) for r in chosen.values()]
            for row in rows:
                row.pop("status")
            results.write_review(output, block.column("key").to_pylist(),
                                 pa.Table.from_pylist(rows, schema=results.REVIEW_SCHEMA))
            kept += len(rows)
    return kept


def report_once(output: str) -> None:
    """In a fresh process, as `raythyroid report OUTPUT` runs it."""
    from raythyroid import report

    started = time.time()
    page = report.write_infer(output)
    seconds = time.time() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    folder = os.path.dirname(page)
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "page_bytes": os.path.getsize(page),
                      "folder_bytes": sum(os.path.getsize(f) for f in files),
                      "files": len(files)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rows-per-file", type=int, default=64)
    parser.add_argument("--review", type=int, default=24)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "raythyroid-report-bench"))
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        report_once(args.report)
        return
    def finish(output: str) -> str:
        with open(os.path.join(output, "_JOB.json"), "w") as f:
            json.dump({"input": "s3://bucket/archive", "labels": "s3://bucket/labels",
                       "model": "ddti (bundled)"}, f)
        return str(write_review_sidecars(output, args.review))

    output, kept = cached_folder(args.workdir, args.rows, args.rows_per_file, finish)
    kept = int(kept)
    done = subprocess.run([sys.executable, __file__, "--report", output], check=True,
                          capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    met = result["seconds"] < 60 and result["peak_bytes"] < 2 * 1024 ** 3
    record(f"infer report: {args.rows:,} rows into report/index.html",
           ["| rows | overlays the blocks kept | seconds | peak memory (whole process) | "
            "page | report folder |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {args.rows:,} | {kept:,} | {result['seconds']:.1f} | "
            f"{result['peak_bytes'] / 1024 ** 3:.2f} GiB | {result['page_bytes'] / 1024:.0f} kB | "
            f"{result['folder_bytes'] / 1024:.0f} kB in {result['files']} files |"],
           [f"report.write_infer in a fresh process: results read by columns, review queue "
            f"and worst-IoU queue ({args.review} each) from the sidecars, distributions, IoU "
            f"histogram, errors by reason",
            f"overlays kept: the blocks' frames under the run's review bar "
            f"({args.rows // args.rows_per_file:,} blocks of {args.rows_per_file})",
            f"target < 60 s and < 2 GiB: {'met' if met else 'not met'}"])


if __name__ == "__main__":
    main()
