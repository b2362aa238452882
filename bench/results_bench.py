"""The end-of-job results pass at paper scale: a synthetic results folder of 1,000,000 rows
(results files of one infer block each, as the job writes them) summarised into metrics.json by
infer.summarize (duplicate check, missing-input check, counts by status and reason, pooled
metrics), timed, with the peak memory of the process that does it.

    python bench/results_bench.py [--rows 1000000] [--rows-per-file 64]

Target: under 30 s and 2 GiB on the 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import record  # noqa: E402


def write_folder(output: str, rows: int, per_file: int) -> None:
    """Results files with realistic columns: 2% errors, 1% skipped, labels on every ok row."""
    import numpy as np
    import pyarrow as pa

    from raythyroid import results

    rng = np.random.default_rng(0)
    for start in range(0, rows, per_file):
        n = min(per_file, rows - start)
        index = np.arange(start, start + n)
        status = np.where(index % 50 == 7, "error", np.where(index % 100 == 3, "skipped", "ok"))
        ok = status == "ok"
        tp = np.where(ok, rng.integers(0, 4000, n), 0)
        columns = {name: pa.nulls(n, results.RESULT_SCHEMA.field(name).type)
                   for name in results.RESULT_SCHEMA.names}
        area = np.where(ok & (tp > 0), rng.integers(50, 20_000, n), 0)
        columns.update(
            key=pa.array([f"archive/{i // 1000:04d}/frame-{i:07d}" for i in index]),
            source_uri=pa.array([f"s3://bucket/archive/{i // 1000:04d}/frame-{i:07d}.dcm"
                                 for i in index]),
            status=pa.array(status),
            error=pa.array([None if s == "ok" else ("truncated PNG (no IEND chunk)" if s == "error"
                                                    else "not an image (SR)") for s in status]),
            nodule=pa.array(np.where(ok, tp > 0, None).tolist(), pa.bool_()),
            tp=pa.array(np.where(ok, tp, None).tolist(), pa.int64()),
            fp=pa.array(np.where(ok, rng.integers(0, 500, n), None).tolist(), pa.int64()),
            fn=pa.array(np.where(ok, rng.integers(0, 500, n), None).tolist(), pa.int64()),
            tn=pa.array(np.where(ok, 200_000 - tp, None).tolist(), pa.int64()),
            n_components=pa.array(np.where(ok, (area > 0) * rng.integers(1, 3, n), None).tolist(),
                                  pa.int32()),
            area_px=pa.array(np.where(ok, area, None).tolist(), pa.int64()),
            aspect_ratio=pa.array(np.where(ok & (area > 0), rng.lognormal(-0.2, 0.3, n),
                                           None).tolist(), pa.float64()),
            confidence=pa.array(np.where(ok, rng.beta(8, 2, n), None).tolist(), pa.float64()),
            iou=pa.array(np.where(ok, rng.beta(5, 2, n), None).tolist(), pa.float64()))
        results.write_results(output, pa.table(columns, schema=results.RESULT_SCHEMA))


def cached_folder(workdir: str, rows: int, per_file: int, finish=None) -> tuple[str, str]:
    """(the synthetic results folder of these sizes, its note): written once and reused by
    later runs; `finish(output)` adds what a bench needs beyond the results and returns the
    note kept with them."""
    output = os.path.join(workdir, f"out-{rows}-{per_file}")
    marker = os.path.join(output, "_written")
    if not os.path.exists(marker):
        shutil.rmtree(output, ignore_errors=True)
        started = time.time()
        write_folder(output, rows, per_file)
        note = finish(output) if finish else ""
        with open(marker, "w") as f:
            f.write(note)
        print(f"wrote {rows} rows in {time.time() - started:.0f} s {note}", flush=True)
    with open(marker) as f:
        return output, f.read()


def summarize_once(output: str) -> None:
    """In a fresh process, as the job's driver: the sources it expects, then summarize."""
    import pyarrow as pa

    from raythyroid import infer, results

    sources = results.read_results(output, ["source_uri"]).column("source_uri")
    table = pa.table({"key": sources, "source_uri": sources})
    started = time.time()
    summary = infer.summarize(output, table, [], labelled=True)
    seconds = time.time() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "rows": summary["rows"],
                      "errors": summary["errors"], "skipped": summary["skipped"],
                      "n_iou": summary["metrics"]["n_iou"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rows-per-file", type=int, default=64)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "raythyroid-results-bench"))
    parser.add_argument("--summarize", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.summarize:
        summarize_once(args.summarize)
        return
    output, _ = cached_folder(args.workdir, args.rows, args.rows_per_file)
    done = subprocess.run([sys.executable, __file__, "--summarize", output], check=True,
                          capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    files = args.rows // args.rows_per_file
    met = result["seconds"] < 30 and result["peak_bytes"] < 2 * 1024 ** 3
    record(f"results pass: {args.rows:,} rows in {files:,} results files into metrics.json",
           ["| rows | results files | seconds | peak memory (whole process) |",
            "| ---: | ---: | ---: | ---: |",
            f"| {result['rows']:,} | {files:,} | {result['seconds']:.1f} | "
            f"{result['peak_bytes'] / 1024 ** 3:.2f} GiB |"],
           [f"infer.summarize in a fresh process: duplicate check (key column only), every "
            f"input has a row, counts by status and reason, pooled metrics "
            f"({result['errors']:,} errors, {result['skipped']:,} skipped)",
            f"target < 30 s and < 2 GiB: {'met' if met else 'not met'}"])


if __name__ == "__main__":
    main()
