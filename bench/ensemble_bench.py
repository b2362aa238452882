"""Images/s of a fold ensemble (every member, TTA as chosen) against `--fast` (its one-pass
network: the distilled one where the model ships it, else its first member) and, with
--student, a distilled student (its own inference; also with its int8 weights where
`raythyroid quantize` wrote them), side by side in one Ray session over the same frames,
through the real infer job.

    python bench/ensemble_bench.py [--model ddti] [--student MODEL] [--frames FILE_LIST]
                                   [--repeats 2] [--json F]

--frames: a text file of frame paths (default: 120 phantom frames at DDTI's 560x360).
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

from common import median, phantom_archive, portable, record  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ddti")
    parser.add_argument("--student", default=None, help="a one-pass model to time beside it")
    parser.add_argument("--frames", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    from raythyroid import infer, model, runtime

    workdir = tempfile.mkdtemp(prefix="raythyroid-ensemble-bench-")
    if args.frames:
        listing = args.frames
    else:
        archive = phantom_archive(os.path.join(workdir, "phantoms"), 120, seed=9)
        listing = os.path.join(archive, "images")
    count = (sum(1 for line in open(listing) if line.strip()) if os.path.isfile(listing)
             else len(os.listdir(listing)))
    folder = model.resolve(args.model)
    _, info = model.load(folder)
    members = info.members
    rates: dict[str, list[float]] = {"ensemble": [], "fast": []}
    student_int8 = False
    if args.student:
        rates["student"] = []
        student_int8 = bool(model.read_info(model.resolve(args.student)).int8)
        if student_int8:
            rates["student int8"] = []
    with runtime.session():
        for repeat in range(args.repeats):
            for name in rates:
                out = os.path.join(workdir, f"{name}-{repeat}")
                started = time.time()
                options = infer.InferOptions(fast=name == "fast",
                                             precision="int8" if name == "student int8"
                                             else "auto")
                infer.run(args.student if name.startswith("student") else folder, listing, out,
                          options=options, log=lambda *_: None)
                rates[name].append(count / (time.time() - started))
                shutil.rmtree(out)
    ensemble, fast = median(rates["ensemble"]), median(rates["fast"])
    tta = model.describe_tta(info.inference.tta, info.inference.tta_zoom)
    figures = {"frames": count, "members": members, "tta": tta,
               "ensemble_images_per_s": ensemble, "fast_images_per_s": fast}
    student = median(rates.get("student", []))
    if args.student:
        figures["student_images_per_s"] = student
    if student_int8:
        figures["student_int8_images_per_s"] = median(rates["student int8"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    record(f"infer: {members}-model ensemble vs --fast, {count} frames", [
        "| inference | images/s (median of runs, job start included) | ratio |",
        "| --- | ---: | ---: |",
        f"| ensemble of {members}, TTA {tta} | {ensemble:.2f} "
        f"| 1.00x |",
        f"| `--fast`: {'the distilled network' if info.fast else 'first member, no TTA'} "
        f"| {fast:.2f} | {fast / ensemble:.2f}x |"]
        + ([f"| student `{portable(args.student)}`, its own inference | {student:.2f} "
            f"| {student / ensemble:.2f}x |"] if args.student else [])
        + ([f"| the same student, `--precision int8` | "
            f"{figures['student_int8_images_per_s']:.2f} | "
            f"{figures['student_int8_images_per_s'] / ensemble:.2f}x |"] if student_int8 else []),
        [f"each figure: frames / wall seconds of one `infer.run` on a local Ray (listing, "
         f"decoding, model, post-processing, writing), {args.repeats} runs each, alternating"])
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
