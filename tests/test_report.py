"""The morning-after reports, opened in a real browser (headless Chromium over file://, as a
person opens a downloaded output folder), and the review queue they lead with."""
import json
import os

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from raythyroid import (imaging, infer, metrics, outputs, phantom, report, results, review_bar,
                        storage)

from helpers import INSTITUTION, PATIENT_ID, PATIENT_NAME, make_dicom, run_cli

QUEUE = 5
FRAMES = 18


def rendered(browser, page) -> dict:
    """What the browser made of the page: every image and each queue's keys in page order."""
    browser.get(page.as_uri())
    return browser.execute_script("""
        const keys = id => Array.from(document.querySelectorAll('#' + id + ' figure'))
                                .map(f => f.dataset.key);
        return {images: Array.from(document.images).map(
                    i => [i.getAttribute('src'), i.complete, i.naturalWidth]),
                queue: keys('review-queue'), worst: keys('worst-iou'),
                validation: keys('worst-validation'),
                catch: (document.getElementById('queue-catch') || {}).textContent || '',
                kinds: Array.from(document.querySelectorAll('#failure-kinds tr')).slice(1)
                            .map(r => Array.from(r.cells).map(c => c.textContent)),
                text: document.body.innerText};""")


def download(prefix: str, folder) -> None:
    for uri in storage.list_files(prefix):
        target = folder / uri[len(prefix) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(uri))


@pytest.fixture(scope="module")
def labelled_run(trained_run, s3):
    """A labelled infer run on S3 (the CLI, small blocks) over phantom PNGs and DICOM files
    with made-up patient values; its OUTPUT."""
    run_uri, _ = trained_run
    bucket = s3.bucket("report")
    archive, labels = storage.join(bucket, "archive"), storage.join(bucket, "labels")
    for i, frame in enumerate(phantom.generate(FRAMES, seed=70, height=180, width=280)):
        gray = cv2.cvtColor(frame.image, cv2.COLOR_BGR2GRAY)
        name = f"case-{i:02d}"
        data = make_dicom([gray]) if i % 6 == 0 else imaging.encode_png(frame.image)
        storage.write_bytes(storage.join(archive, name + (".dcm" if i % 6 == 0 else ".png")),
                            data)
        storage.write_bytes(storage.join(labels, name + ".png"), imaging.encode_png(frame.mask))
    storage.write_bytes(storage.join(archive, "broken.png"), b"\x89PNG\r\n\x1a\n truncated")
    output = storage.join(bucket, "out")
    done = run_cli("infer", storage.join(run_uri, "model"), archive, output, "--labels", labels,
                   "--block-size", "4", "--review", str(QUEUE))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "report: " + storage.join(output, "report", "index.html") in done.stdout
    return output


@pytest.mark.timeout(600)
def test_infer_report_in_a_browser(labelled_run, browser, tmp_path):
    """Downloaded from S3 and opened over file://: every image loads, both queues hold the
    expected frames in order, and the page says how many failures the queue catches."""
    download(labelled_run, tmp_path / "out")
    page = tmp_path / "out" / "report" / "index.html"
    seen = rendered(browser, page)
    browser.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000

    assert seen["images"] and all(width > 0 for _, _, width in seen["images"]), seen["images"]
    table = results.read_results(labelled_run)
    ok = table.filter(pc.equal(table.column("status"), "ok")).to_pylist()
    assert len(ok) == FRAMES
    by_confidence = sorted(ok, key=lambda r: (r["confidence"], r["key"]))
    by_iou = sorted(ok, key=lambda r: (r["iou"], r["key"]))
    assert seen["queue"] == [r["key"] for r in by_confidence[:QUEUE]]
    assert seen["worst"] == [r["key"] for r in by_iou[:QUEUE]]
    assert len(seen["images"]) == 2 * QUEUE + 2  # overlays, distributions, IoU histogram

    failures = [r["iou"] < report.FAILURE_IOU for r in by_confidence]
    quarter = round(len(ok) / 4)
    assert (f"The least confident quarter ({quarter} frames) holds {sum(failures[:quarter])} "
            f"of the {sum(failures)} failures") in seen["catch"]
    # every failure under one kind, the quarter's among them; no table without failures
    assert bool(seen["kinds"]) == any(failures)
    assert sum(int(row[1]) for row in seen["kinds"]) == sum(failures)
    assert sum(int(row[2]) for row in seen["kinds"]) == sum(failures[:quarter])
    assert "broken" in seen["text"] and "error" in seen["text"]  # errors by reason
    assert "images/s" in seen["text"] and "19 inputs this run" in seen["text"]
    job = json.loads(storage.read_text(storage.join(labelled_run, results.JOB_FILE)))
    assert f"weights {job['weights']}" in seen["text"]


@pytest.mark.timeout(300)
def test_no_patient_value_in_the_report_or_the_overlays(labelled_run):
    forbidden = [PATIENT_NAME, PATIENT_ID, INSTITUTION, "Doe^Jane", "ACC-99"]
    places = {uri: storage.read_bytes(uri)
              for folder in (results.REPORT, results.REVIEW)
              for uri in storage.list_files(storage.join(labelled_run, folder))}
    assert any(p.endswith("index.html") for p in places) and \
        any(f"/{results.REVIEW}/" in p for p in places)
    for place, data in places.items():
        for value in forbidden:
            assert value.encode() not in data, f"{value!r} found in {place}"


@pytest.mark.timeout(300)
def test_report_command_rewrites_the_page_on_s3(labelled_run, s3):
    before = set(storage.list_files(storage.join(labelled_run, results.REPORT)))
    done = run_cli("report", labelled_run, "--review", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    after = set(storage.list_files(storage.join(labelled_run, results.REPORT)))
    assert {u.rsplit("/", 1)[-1] for u in after if "/queue/" in u} == {"001.jpg", "002.jpg"}
    assert len(after) < len(before)  # no stale overlays of the longer queue
    # typed, so a bucket served as a static site shows the page instead of downloading it
    bucket, key = labelled_run[len("s3://"):].split("/", 1)
    head = s3.client.head_object(Bucket=bucket, Key=f"{key}/report/index.html")
    assert head["ContentType"].startswith("text/html")
    head = s3.client.head_object(Bucket=bucket, Key=f"{key}/report/queue/001.jpg")
    assert head["ContentType"] == "image/jpeg"


def test_the_failures_are_told_apart_by_how_the_mask_sits_against_the_label():
    """Drawn masks against a drawn nodule (IoU < 0.5 each): review_catch, which the report's
    table shows, gives each kind once and counts those the least confident quarter holds; a
    mask holding exactly 80% of the nodule counts as covering it."""
    label = np.zeros((64, 64), bool)
    label[20:40, 20:40] = True
    drawn = {"missed": np.zeros_like(label), "lobe": np.ones_like(label),
             "sliver": np.zeros_like(label), "beside": np.zeros_like(label),
             "shifted": np.zeros_like(label), "good": label.copy()}
    drawn["sliver"][25:32, 25:32] = True
    drawn["beside"][45:60, 45:60] = True
    drawn["shifted"][30:50, 30:50] = True
    # 16 of the nodule's 20 rows (80%) and twice as much beside it: too large, at the boundary
    drawn["lobe-at-80%"] = np.zeros_like(label)
    drawn["lobe-at-80%"][24:40, 5:60] = True
    rows = []
    for confidence, (key, mask) in enumerate(drawn.items()):
        counts = metrics.counts(label, mask)
        rows.append(dict(key=key, confidence=float(confidence), **counts,
                         iou=metrics.image_iou(counts["tp"], counts["fp"], counts["fn"])))
    rows.append(dict(key="no-nodule", confidence=9.0, tp=0, fp=40, fn=0, tn=4056, iou=0.0))
    caught = report.review_catch(pa.Table.from_pylist(rows))
    assert caught["failures"] == 7 and caught["quarter"] == 2  # of 8 frames
    assert caught["by_kind"] == [  # in FAILURE_KINDS' order; missed and lobe lead the queue
        ("no mask: the nodule missed", 1, 1), ("a mask where the label has none", 1, 0),
        ("a mask away from the nodule", 1, 0), ("outline off the nodule", 1, 0),
        ("inside the nodule, too small", 1, 0), ("covers the nodule, too large", 2, 1)]


def test_the_review_bar_keeps_every_queued_frame_and_few_others():
    """Blocks of a long run keep an overlay only under the bar: every one of the run's lowest
    values is kept, while an archive of 20,000 frames keeps a few hundred overlays; a retried
    block's frames count once, and ties (many failures at IoU 0) keep no more than needed."""
    rng = np.random.default_rng(3)
    values = np.round(rng.random(20_000), 2)  # many ties
    keys = [f"k{i:05d}" for i in range(len(values))]
    bar = review_bar.ReviewBar(24)
    kept = []
    for start in range(0, len(values), 64):
        block = sorted(zip(values[start:start + 64], keys[start:start + 64]))[:24]
        for _ in range(2):  # every block retried once
            limit = bar.offer({"confidence": block, "iou": []})["confidence"]
        kept += [key for pair in block for key in [pair[1]] if limit is None or pair <= limit]
    assert set(k for _, k in sorted(zip(values, keys))[:24]) <= set(kept)
    assert len(kept) < 800
    assert len(bar.lowest["confidence"]) == 24


@pytest.mark.timeout(300)
def test_train_report_in_a_browser(trained_run, browser):
    run_uri, _ = trained_run
    page = storage.join(run_uri, "report", "index.html")
    assert os.path.exists(page)
    seen = rendered(browser, __import__("pathlib").Path(page))
    assert seen["images"] and all(width > 0 for _, _, width in seen["images"]), seen["images"]
    meta = json.loads(storage.read_text(storage.join(run_uri, "model", "model.json")))
    assert len(seen["validation"]) == min(report.WORST_VALIDATION,
                                          meta["data"]["counts"]["val"])
    assert "chosen" in seen["text"] and "test split" in seen["text"]


@pytest.mark.timeout(300)
def test_a_lost_review_bar_costs_no_block_its_overlays(ray_local):
    """The bar's actor gone (its node died): the block keeps its own lowest frames, more than
    needed but none missing, and commits as ever."""
    bar = infer.SharedReviewBar.start(2)
    ray_local.kill(bar.actor)
    geometry = imaging.Geometry(height=40, width=40, x=0, y=0, w=40, h=40, size=32)
    keys = [f"f{i}" for i in range(4)]
    batch = {"image": np.zeros((4, 32, 32), np.uint8),
             "geometry": np.array([geometry.to_row()] * 4, np.int32)}
    masks = {i: np.pad(np.ones((10, 10), bool), 15) for i in range(4)}
    columns = {"key": keys, "confidence": [0.9, 0.2, 0.5, 0.1], "iou": [None] * 4,
               "area_px": [100] * 4, "area_mm2": [None] * 4}
    kept = outputs.review_rows(batch, columns, masks, {}, {"size": 2, "bar": bar})
    assert sorted(kept.column("key").to_pylist()) == ["f1", "f3"]
    assert all(t.startswith(b"\xff\xd8") for t in kept.column("thumbnail").to_pylist())
