"""Infer from a PACS over DICOMweb (Orthanc on loopback) against the same DICOM instances read
from a local folder: the throughput ratio, side by side in one run (target: 0.8x or better).

Needs Orthanc with its DICOMweb plugin (Debian packages orthanc, orthanc-dicomweb). The runs
alternate (folder, PACS, folder, PACS, ...) on one Ray runtime, each into a fresh OUTPUT.

    python bench/dicomweb_bench.py [--instances 200] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

from common import make_model, median, record  # noqa: E402


def ultrasound_instances(folder: Path, count: int) -> list[bytes]:
    """`count` single-frame ultrasound DICOM instances (phantom frames, 8-bit, uncompressed;
    the tests' make_dicom), in studies of 20, as a night's archive holds them."""
    from pydicom.uid import generate_uid

    from helpers import make_dicom
    from raythyroid import imaging, phantom

    datasets = []
    for i, frame in enumerate(phantom.generate(count, seed=23)):
        if i % 20 == 0:
            study, series = generate_uid(), generate_uid()
        data = make_dicom([imaging.to_gray(frame.image)], study_uid=study, series_uid=series)
        (folder / f"{i:05d}.dcm").write_bytes(data)
        datasets.append(data)
    return datasets


def main() -> None:
    import pacs as pacs_lib

    from raythyroid import infer, runtime

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "raythyroid-dicomweb-bench"))
    args = parser.parse_args()
    reason = pacs_lib.missing()
    if reason:
        sys.exit(f"dicomweb_bench: {reason}")
    work = Path(args.workdir)
    shutil.rmtree(work / "archive", ignore_errors=True)
    (work / "archive").mkdir(parents=True)
    instances = ultrasound_instances(work / "archive", args.instances)
    model_dir = make_model(256, str(work))
    from helpers import free_port

    import secrets

    orthanc = pacs_lib.Orthanc(work / f"orthanc-{os.getpid()}", free_port(), "bench",
                               secrets.token_hex(8))
    # before Ray starts: its workers inherit the credentials
    os.environ.update(DICOMWEB_USERNAME=orthanc.user, DICOMWEB_PASSWORD=orthanc.password)
    try:
        for data in instances:
            orthanc.upload(data)
        sources = {"folder": str(work / "archive"), "DICOMweb": f"dicomweb+{orthanc.dicomweb}"}
        seconds: dict[str, list[float]] = {name: [] for name in sources}
        with runtime.session():
            for repeat in range(args.repeats + 1):  # the first round warms up, not counted
                for name, source in sources.items():
                    out = work / f"out-{name}"
                    shutil.rmtree(out, ignore_errors=True)
                    started = time.time()
                    summary = infer.run(model_dir, source, str(out),
                                        options=infer.InferOptions(batch_size=16),
                                        log=lambda *_: None)
                    assert summary.rows == args.instances and not summary.errors
                    if repeat:
                        seconds[name].append(time.time() - started)
    finally:
        orthanc.stop()
    rate = {name: args.instances / median(values) for name, values in seconds.items()}
    ratio = rate["DICOMweb"] / rate["folder"]
    lines = ["| source | median s | images/s |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {median(seconds[name]):.1f} | {rate[name]:.1f} |" for name in sources]
    record(f"infer from DICOMweb (Orthanc on loopback) vs a local folder, {args.instances} "
           f"instances", lines,
           [f"DICOMweb/folder throughput: {ratio:.2f}x (target 0.8x or better: "
            f"{'met' if ratio >= 0.8 else 'NOT met'})",
            f"medians of {args.repeats} alternating runs after one warm-up round; 256 px model, "
            f"1 Predictor, batch 16; 8-bit 560x360 uncompressed instances in studies of 20"])


if __name__ == "__main__":
    main()
