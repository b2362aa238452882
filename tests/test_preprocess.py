"""The preprocess job end to end: real DDTI frames on a real S3 endpoint through the CLI."""
import io
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from raythyroid import imaging, phantom, preprocess, split, stopping, storage
from raythyroid.imaging import PrepConfig

from helpers import assert_clean_terminal, run_cli

BROKEN = {  # key -> (stage, words the reason must contain)
    "broken-empty_1": ("decode", "empty file"),
    "broken-truncated_1": ("decode", "truncated JPEG"),
    "broken-size_1": ("mask", "mask is 100x80"),
    "broken-nomask_1": ("layout", "no mask"),
    "broken-text_1": ("decode", "not an image"),
}


def read_split_rows(output: str, manifest: dict) -> list[dict]:
    rows = []
    for name, shards in manifest["shards"].items():
        for shard in shards:
            table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, shard))))
            rows += table.to_pylist()
    return rows


def upload_broken_files(dataset: str, ddti) -> None:
    jpg = (ddti / "images" / "10_1.jpg").read_bytes()
    frame = next(phantom.generate(1, seed=99))
    ok, other = cv2.imencode(".jpg", frame.image)
    other = other.tobytes()
    mask = (ddti / "masks" / "10_1.png").read_bytes()
    files = {
        "images/broken-empty_1.jpg": b"", "masks/broken-empty_1.png": mask,
        "images/broken-truncated_1.jpg": jpg[: len(jpg) // 2],
        "masks/broken-truncated_1.png": mask,
        "images/broken-size_1.jpg": other,
        "masks/broken-size_1.png": imaging.encode_png(np.zeros((80, 100), np.uint8)),
        "images/broken-nomask_1.jpg": other,
        "images/broken-text_1.png": b"%PDF-1.4 definitely not pixels",
        "masks/broken-text_1.png": mask,
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(dataset, name), data)


@pytest.mark.timeout(900)
def test_preprocess_ddti_on_s3_end_to_end(s3, ddti):
    bucket = s3.bucket("ddti")
    dataset = storage.join(bucket, "raw", "ddti")
    assert s3.upload_tree(ddti / "images", storage.join(dataset, "images")) == 300
    assert s3.upload_tree(ddti / "masks", storage.join(dataset, "masks")) == 300
    upload_broken_files(dataset, ddti)

    output = storage.join(bucket, "prepared")
    # standalone, as on a workstation: the command starts and stops a Ray of its own
    result = run_cli("preprocess", dataset, output, "--seed", "3", own_ray=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_clean_terminal(result.stdout + result.stderr)
    # Ray's native output went to the command's own log, removed when the command succeeded
    assert not Path(stopping.command_log(result.pid)).exists()
    assert re.search(r"preprocess: (\d+)/\1 inputs \(100%\)", result.stdout)  # progress
    manifest = json.loads(storage.read_text(storage.join(output, "manifest.json")))
    rows = read_split_rows(output, manifest)
    keys = [r["key"] for r in rows]

    # every pair but the byte-identical duplicates, each once
    assert len(rows) == 297 == len(set(keys)) == manifest["rows"]
    errors = pq.read_table(io.BytesIO(storage.read_bytes(
        storage.join(output, "errors.parquet")))).to_pylist()
    by_key = {}
    for error in errors:
        by_key.setdefault(error["key"], []).append(error)
    for key, (stage, words) in BROKEN.items():
        assert len(by_key.get(key, [])) == 1, key
        assert by_key[key][0]["stage"] == stage and words in by_key[key][0]["reason"], by_key[key]
    duplicates = {e["key"]: e["reason"] for e in errors if e["stage"] == "dedupe"}
    assert duplicates == {"1_2": "duplicate of 1_1", "92_4": "duplicate of 92_3",
                          "233_2": "duplicate of 150_1"}
    assert len(errors) == len(BROKEN) + 3

    # split by case, no leakage, 7:2:1 by case within 5 points
    case_split = {}
    for row in rows:
        case_split.setdefault(row["case_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in case_split.values()), "a case spans two splits"
    n_cases = len(case_split)
    for name, target in zip(("train", "val", "test"), (0.7, 0.2, 0.1)):
        share = sum(1 for s in case_split.values() if s == {name}) / n_cases
        assert abs(share - target) <= 0.05, (name, share)

    # prepared pairs: square images, 0/1 masks, crops that keep the nodule and drop borders
    areas = []
    for row in rows:
        image = imaging.decode_png(row["image"])
        mask = imaging.decode_png(row["mask"])
        assert image.shape == (256, 256) == mask.shape
        assert set(np.unique(mask)) <= {0, 1}
        g = row["geometry"]
        original = cv2.imread(str(ddti / "masks" / f"{row['key']}.png"), 0) > 0
        assert original.shape == (g["height"], g["width"])
        kept = original[g["y"]:g["y"] + g["h"], g["x"]:g["x"] + g["w"]].sum() / original.sum()
        assert kept >= 0.995, row["key"]
        areas.append(g["w"] * g["h"] / (g["width"] * g["height"]))
        assert row["source_uri"].startswith(dataset) and len(row["sha256"]) == 64
    assert np.mean(areas) < 0.85

    # every run gives every key the same split: what was written is the seeded, order-free
    # function of the cases (split.assign), whatever order the rows came in
    written = {r["key"]: r["split"] for r in rows}
    cases = [(r["key"], r["case_id"], None) for r in rows]
    assert split.assign(cases, seed=3) == written == split.assign(cases[::-1], seed=3)
    assert split.assign(cases, seed=4) != written


@pytest.mark.timeout(600)
def test_rerun_replaces_output_and_manifest_lists_only_its_shards(ray_local, tmp_path):
    data = tmp_path / "phantoms"
    phantom.write_folders(str(data), 24, seed=2, height=180, width=280)
    out = str(tmp_path / "out")
    stray = tmp_path / "out" / "train" / "stray.parquet"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"left over from an older run")
    first = preprocess.run(str(data), out, config=PrepConfig(size=64), log=lambda *_: None)
    assert not stray.exists()
    second = preprocess.run(str(data), out, config=PrepConfig(size=64), log=lambda *_: None)
    assert second["counts"] == first["counts"] and sum(first["counts"].values()) == 24
    listed = {s for shards in second["shards"].values() for s in shards}
    on_disk = {storage.relative(u, out) for u in storage.list_files(out, (".parquet",))
               if "/" in storage.relative(u, out)}
    assert listed == on_disk
    assert all(v > 0 for v in second["counts"].values())
