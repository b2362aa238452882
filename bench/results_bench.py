"""The end-of-job results pass at paper scale: a synthetic results folder of 1,000,000 rows
(results files of one infer block each, as the job writes them) summarised into metrics.json by
claim.summarize (duplicate check, missing-input check, counts by status and reason, pooled
metrics), timed, with the peak memory of the process that does it.

    python bench/results_bench.py [--rows 1000000] [--rows-per-file 64]

Target: under 30 s and 2 GiB on the 2-core machine.
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


def summarize_once(output: str) -> None:
    """In a fresh process, as the job's driver: the sources it expects, then summarize."""
    import pyarrow as pa

    from raythyroid import claim, results

    sources = results.read_results(output, ["source_uri"]).column("source_uri")
    table = pa.table({"key": sources, "source_uri": sources})
    started = time.time()
    summary = claim.summarize(output, table, [], labelled=True)
    seconds = time.time() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "rows": summary.rows,
                      "errors": summary.errors, "skipped": summary.skipped,
                      "n_iou": summary.metrics["n_iou"]}))


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
           [f"claim.summarize in a fresh process: duplicate check (key column only), every "
            f"input has a row, counts by status and reason, pooled metrics "
            f"({result['errors']:,} errors, {result['skipped']:,} skipped)",
            f"target < 30 s and < 2 GiB: {'met' if met else 'not met'}"])


if __name__ == "__main__":
    main()
