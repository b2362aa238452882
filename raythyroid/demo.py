"""`raythyroid demo`: the whole pipeline on generated phantoms, on local Ray and local disk."""
from __future__ import annotations

import os

from . import phantom, preprocess, storage
from .imaging import PrepConfig

DEMO_FRAMES = 200


def run(workdir: str, frames: int = DEMO_FRAMES, seed: int = 0, log=print) -> dict:
    workdir = os.path.abspath(workdir)
    data = storage.join(workdir, "phantoms")
    prepared = storage.join(workdir, "prepared")
    if not storage.exists(storage.join(data, "images")):
        log(f"demo: generating {frames} phantom frames in {data}")
        phantom.write_folders(data, frames, seed)
    manifest = preprocess.run(data, prepared, config=PrepConfig(size=128), log=log)
    return {"prepared": prepared, "manifest": manifest}
