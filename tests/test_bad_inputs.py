"""A corpus of bad inputs, generated here: each ends as an error row with a specific reason (or
works, where it should), and the rest of the run succeeds. Plus the keys and bytes a run must
never let out."""
import json
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from raythyroid import imaging, infer, phantom, results, storage

from helpers import (INSTITUTION, PATIENT_ID, PATIENT_NAME, make_dicom,
                      make_dicom_with_corrupt_frame, run_cli)
from s3proxy import FaultyS3Proxy
from test_imaging import ihdr_png


def frame_and_mask(seed):
    frame = next(phantom.generate(1, seed=seed, height=180, width=280))
    return frame.image, frame.mask


def png(arr):
    return imaging.encode_png(arr)


def jpg(arr):
    return cv2.imencode(".jpg", arr)[1].tobytes()


@pytest.mark.timeout(900)
def test_infer_corpus_every_bad_kind_is_a_specific_error_row(s3, trained_run):
    run_uri, _ = trained_run
    bucket = s3.bucket("corpus")
    archive, labels = storage.join(bucket, "archive"), storage.join(bucket, "labels")
    good, good_mask = frame_and_mask(1)
    gray = cv2.cvtColor(good, cv2.COLOR_BGR2GRAY)
    rgba = np.dstack([cv2.cvtColor(good, cv2.COLOR_BGR2RGB), np.full(gray.shape, 255, np.uint8)])
    frames = [cv2.cvtColor(frame_and_mask(s)[0], cv2.COLOR_BGR2GRAY) for s in (2, 3, 4)]
    files = {
        "good.png": png(good),
        "empty.png": b"",
        "truncated.png": png(good)[:3000],
        "truncated.jpg": jpg(good)[:3000],
        "notimage.jpg": b"%PDF-1.7 this is a document",
        "sixteen.png": png(gray.astype(np.uint16) * 256),
        "rgba.png": png(rgba),
        "tiny.png": png(np.zeros((1, 1), np.uint8)),
        "huge.png": ihdr_png(100_000, 100_000),
        "wronglabel.png": png(good),
        "nopixels.dcm": make_dicom(frames[:1], pixel_data=False),
        "cine.dcm": make_dicom_with_corrupt_frame(frames, corrupt_index=1),
        "dup.png": png(good),
        "dup.jpg": jpg(good),
        "forbidden.png": png(good),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(archive, name), data)
    for name in ("good", "sixteen", "rgba", "forbidden"):
        storage.write_bytes(storage.join(labels, f"{name}.png"), png(good_mask))
    storage.write_bytes(storage.join(labels, "wronglabel.png"), png(np.zeros((10, 10), np.uint8)))
    manifest = storage.join(bucket, "manifest.txt")
    storage.write_text(manifest, "\n".join(
        [storage.join(archive, n) for n in files] + [storage.join(archive, "missing.png")]))

    proxy = FaultyS3Proxy(s3.url, deny=r"/forbidden\.png")  # a 403 for that one object
    try:
        output = storage.join(bucket, "out")
        result = run_cli("infer", storage.join(run_uri, "model"), manifest, output,
                         "--labels", labels, env={"AWS_ENDPOINT_URL": proxy.url})
    finally:
        proxy.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    assert proxy.counts["denied"] >= 1
    rows = {r["key"]: r for r in results.read_results(output).to_pylist()}
    expected_errors = {
        "empty": "empty file (0 bytes)",
        "truncated": None,  # truncated.png and truncated.jpg share the key: see dup below
        "notimage": "not an image: unrecognised file format",
        "tiny": "image too small: 1x1",
        "huge": "image too large: 100000x100000",
        "wronglabel": "label is 10x10, image is 280x180",
        "nopixels": "DICOM without pixel data",
        "cine#2": "corrupt DICOM frame 2 of 3",
        "forbidden": "cannot read: permission denied",
        "missing": "cannot read: not found",
        "dup.jpg": "duplicate key: same name as dup.png",
        "truncated.jpg": "duplicate key: same name as truncated.png",
    }
    for key, reason in expected_errors.items():
        if reason is None:
            continue
        assert rows[key]["status"] == "error", key
        assert rows[key]["error"].startswith(reason), (key, rows[key]["error"])
    assert rows["truncated"]["error"].startswith("truncated PNG")
    for key in ("good", "sixteen", "rgba", "cine#1", "cine#3", "dup"):
        assert rows[key]["status"] == "ok", (key, rows[key]["error"])
    assert rows["sixteen"]["tp"] is not None and rows["rgba"]["tp"] is not None
    assert len(rows) == len(files) + 1 + 2  # every source once; the cine has three frames
    saved = json.loads(storage.read_text(storage.join(output, "metrics.json")))
    assert saved["errors"] == len(expected_errors) - 1 + 1  # + truncated.png


@pytest.mark.timeout(600)
def test_preprocess_corpus_masks_and_decoding(ray_local, tmp_path):
    from raythyroid import preprocess
    from raythyroid.imaging import PrepConfig

    root = tmp_path / "data"
    good, mask = frame_and_mask(5)
    graded = (mask.astype(np.float32) * np.linspace(0.2, 1.0, mask.shape[1])[None]).astype(
        np.uint8)  # a non-binary mask: 0..255 with soft values
    other, _ = frame_and_mask(9)
    pairs = {"good_1": (jpg(good), png(mask)),
             "graded_1": (jpg(other), png(graded)),
             "othersize_1": (jpg(good), png(np.zeros((90, 140), np.uint8))),
             "empty_1": (b"", png(mask)),
             "truncated_1": (png(good)[:2000], png(mask)),
             "huge_1": (ihdr_png(100_000, 100_000), png(mask))}
    for key, (image, label) in pairs.items():
        suffix = "png" if image.startswith(b"\x89PNG") or not image else "jpg"
        storage.write_bytes(str(root / "images" / f"{key}.{suffix}"), image)
        storage.write_bytes(str(root / "masks" / f"{key}.png"), label)
    out = str(tmp_path / "out")
    manifest = preprocess.run(str(root), out, config=PrepConfig(size=64), log=lambda *_: None)
    errors = {e["key"]: e for e in pq.read_table(f"{out}/errors.parquet").to_pylist()}
    assert errors["othersize_1"]["reason"] == "mask is 140x90, image is 280x180"
    assert errors["empty_1"]["reason"].startswith("empty file")
    assert errors["truncated_1"]["reason"].startswith("truncated PNG")
    assert errors["huge_1"]["reason"].startswith("image too large")
    assert manifest["rows"] == 2
    rows = {}
    for shard in (s for shards in manifest["shards"].values() for s in shards):
        rows.update({r["key"]: r for r in pq.read_table(f"{out}/{shard}").to_pylist()})
    graded_mask = imaging.decode_png(rows["graded_1"]["mask"])
    geometry = imaging.Geometry.from_dict(rows["graded_1"]["geometry"])
    assert np.array_equal(graded_mask, geometry.to_model(graded >= 128))  # thresholded at 128
    assert graded_mask.sum() < imaging.decode_png(rows["good_1"]["mask"]).sum()


def test_huge_header_is_rejected_before_any_large_allocation():
    """Under a 1 GiB address-space limit, decoding a 100000x100000 PNG header must fail with
    our reason, not a MemoryError: the size is checked before pixels are allocated."""
    code = textwrap.dedent("""
        import resource, sys
        sys.path.insert(0, "tests")
        from test_imaging import ihdr_png
        from raythyroid import imaging
        data = ihdr_png(100_000, 100_000)
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        try:
            imaging.decode(data)
        except imaging.DecodeError as exc:
            print("rejected:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
    assert "rejected: image too large: 100000x100000" in out.stdout, out.stderr[-2000:]


@pytest.mark.timeout(600)
def test_hostile_names_stay_inside_output(s3, trained_run):
    run_uri, _ = trained_run
    bucket = s3.bucket("names")
    image, _ = frame_and_mask(6)
    names = ["a/../../../../etc/escape.png", "/abs.png", "x" * 400 + ".png",
             "sp ace&semi;colon.png"]
    for name in names:  # S3 keys may hold all of these literally
        s3.client.put_object(Bucket=bucket[5:], Key=f"in/{name}", Body=png(image))
    output = storage.join(bucket, "out")
    summary = infer.run(storage.join(run_uri, "model"), storage.join(bucket, "in"), output,
                        log=lambda *_: None)
    assert summary.rows == len(names) and summary.errors == 0
    keys = [r["key"] for r in results.read_results(output).to_pylist()]
    for key in keys:
        assert ".." not in key.split("/") and not key.startswith("/") and len(key) <= 180
    written = storage.list_files(bucket[:])
    assert all(uri.startswith(f"{bucket}/in/") or uri.startswith(f"{output}/")
               for uri in written), written
    assert len(storage.list_files(f"{output}/masks")) == len(names)


@pytest.mark.timeout(900)
def test_no_secret_or_identifier_in_any_log_or_output(s3, trained_run, ray_local):
    """AWS and PACS credentials in the environment and patient identifiers in a DICOM: none
    appears in any output file, in the CLI's output, or in any log of the Ray session the
    command ran in (the suite's shared one: every job run in it so far is covered too)."""
    from pathlib import Path

    run_uri, _ = trained_run
    bucket = s3.bucket("secrets")
    frames = [cv2.cvtColor(frame_and_mask(s)[0], cv2.COLOR_BGR2GRAY) for s in (7, 8)]
    storage.write_bytes(storage.join(bucket, "in", "scan.dcm"), make_dicom(frames))
    storage.write_bytes(storage.join(bucket, "in", "plain.png"), png(frames[0]))
    output = storage.join(bucket, "out")
    result = run_cli("infer", storage.join(run_uri, "model"), storage.join(bucket, "in"),
                     output)
    assert result.returncode == 0, result.stderr[-3000:]
    forbidden = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["DICOMWEB_PASSWORD"],
                 PATIENT_NAME, PATIENT_ID, INSTITUTION, "Doe^Jane", "ACC-99"]
    places = {"stdout": result.stdout.encode(), "stderr": result.stderr.encode()}
    for uri in storage.list_files(output):
        places[uri] = storage.read_bytes(uri)
    logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file() and not path.is_symlink():
            places[str(path)] = path.read_bytes()
    assert sum("/logs/" in p for p in places) > 10, "the Ray session's logs were not found"
    for place, data in places.items():
        for value in forbidden:
            assert value.encode() not in data, f"{value!r} found in {place}"
