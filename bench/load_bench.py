"""Load: infer over a large archive of small phantom frames with bounded memory.

Runs the infer job over 5,000 and then 20,000 frames (128x128 by default), sampling the RSS of
every Ray process (and the driver) twice a second. Records peak RSS, object-store spilling and
images/s in BENCHMARKS.md. Memory is bounded when the peak does not grow with the archive.

    python bench/load_bench.py [--frames 5000 20000] [--side 128]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

from common import make_model, record  # noqa: E402


def write_archive(folder: str, frames: int, side: int) -> None:
    import cv2

    from raythyroid import phantom

    os.makedirs(folder, exist_ok=True)
    if len(os.listdir(folder)) >= frames:
        return
    for frame in phantom.generate(frames, seed=3, height=side, width=side):
        cv2.imwrite(os.path.join(folder, f"{frame.key}.png"), frame.image)


class RssSampler:
    """Peak summed RSS of the driver and every Ray process on this machine."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak, self.peak_single = interval, 0, 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        me = os.getpid()
        while not self._stop.is_set():
            total = single = 0
            for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmdline = " ".join(proc.info.get("cmdline") or [])
                if proc.info["pid"] == me or cmdline.startswith("ray::") or any(
                        name in cmdline for name in ("raylet", "gcs_server", "dashboard",
                                                     "runtime_env", "log_monitor")):
                    rss = proc.info["memory_info"].rss if proc.info["memory_info"] else 0
                    total += rss
                    single = max(single, rss)
            self.peak = max(self.peak, total)
            self.peak_single = max(self.peak_single, single)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def spilled_mib() -> float:
    from ray._private.internal_api import memory_summary

    text = memory_summary(stats_only=True)
    match = re.search(r"Spilled ([0-9.]+) MiB", text)
    return float(match.group(1)) if match else 0.0


def main() -> None:
    from raythyroid import infer, runtime

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "raythyroid-load-bench"))
    args = parser.parse_args()
    model_dir = make_model(args.side, os.path.join(args.workdir, "model"))
    lines = ["| frames | images/s | peak RSS, all Ray processes + driver | largest process "
             "| object store spilled | errors |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    results = []
    for frames in args.frames:
        archive = os.path.join(args.workdir, f"archive-{frames}")
        write_archive(archive, frames, args.side)
        out = os.path.join(args.workdir, f"out-{frames}")
        shutil.rmtree(out, ignore_errors=True)
        with runtime.session():
            with RssSampler() as rss:
                started = time.time()
                summary = infer.run(model_dir, archive, out,
                                    options=infer.InferOptions(batch_size=args.batch),
                                    log=lambda *_: None)
                seconds = time.time() - started
            spilled = spilled_mib()
        rate = summary.rows / seconds
        results.append((frames, rss.peak))
        lines.append(f"| {frames} | {rate:.1f} | {rss.peak / 2**30:.2f} GiB | "
                     f"{rss.peak_single / 2**30:.2f} GiB | {spilled:.0f} MiB | "
                     f"{summary.errors} |")
    growth = results[-1][1] / results[0][1] if len(results) > 1 else 1.0
    record(f"load: infer over {' and '.join(str(f) for f in args.frames)} phantom frames "
           f"{args.side}x{args.side}, batch {args.batch}, 1 Predictor actor", lines,
           [f"peak RSS grows {growth:.2f}x for {args.frames[-1] / args.frames[0]:.0f}x the "
            f"frames: memory is bounded by the pipeline's in-flight blocks, not the archive"])


if __name__ == "__main__":
    main()
