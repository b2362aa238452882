"""The infer job: real S3, DICOM, broken files, labels, resume, a killed Predictor, evaluate."""
import dataclasses
import hashlib
import json
import os
import re
import signal
import time

import cv2
import numpy as np
import pyarrow as pa
import pytest

from raythyroid import cli, claim, evaluate, imaging, infer, int8, phantom, results, storage
from raythyroid.errors import UserError

from helpers import (PATIENT_ID, PATIENT_NAME, assert_clean_terminal, assert_stopped,
                      make_dicom, ray_processes, run_cli, start_cli)


def results_rows(output):
    return results.read_results(output).to_pylist()


def all_output_bytes(output):
    for uri in storage.list_files(output):
        yield uri, storage.read_bytes(uri)


def upload_case(s3, ddti):
    """40 DDTI frames, a 3-frame DICOM with patient identifiers, and broken files, with labels."""
    bucket = s3.bucket("archive")
    archive, labels = storage.join(bucket, "archive"), storage.join(bucket, "labels")
    names = sorted(p.stem for p in (ddti / "images").glob("*.jpg"))[:42]
    for name in names:
        storage.write_bytes(storage.join(archive, "ddti", f"{name}.jpg"),
                            (ddti / "images" / f"{name}.jpg").read_bytes())
        storage.write_bytes(storage.join(labels, "ddti", f"{name}.png"),
                            (ddti / "masks" / f"{name}.png").read_bytes())
    frames = list(phantom.generate(3, seed=21, height=200, width=300))
    gray = [cv2.cvtColor(f.image, cv2.COLOR_BGR2GRAY) for f in frames]
    storage.write_bytes(storage.join(archive, "dicom", "cine.dcm"), make_dicom(gray))
    for i, f in enumerate(frames, 1):
        storage.write_bytes(storage.join(labels, "dicom", f"cine#{i}.png"),
                            imaging.encode_png(f.mask))
    broken = {"broken/empty.png": b"", "broken/notes.jpg": b"plain text, not a JPEG",
              "broken/half.jpg": (ddti / "images" / f"{names[0]}.jpg").read_bytes()[:5000],
              "broken/nopixels.dcm": make_dicom(gray[:1], pixel_data=False)}
    for name, data in broken.items():
        storage.write_bytes(storage.join(archive, name), data)
    # a label of another size than its image
    storage.write_bytes(storage.join(archive, "broken", "wrongsize.png"),
                        imaging.encode_png(gray[0]))
    storage.write_bytes(storage.join(labels, "broken", "wrongsize.png"),
                        imaging.encode_png(np.zeros((50, 60), np.uint8)))
    return archive, labels, names


@pytest.mark.timeout(900)
def test_infer_archive_on_s3_with_dicom_broken_files_and_labels(s3, ddti, trained_run):
    run_uri, _ = trained_run
    archive, labels, names = upload_case(s3, ddti)
    output = storage.join(storage.normalize(archive).rsplit("/", 1)[0], "out")
    result = run_cli("infer", storage.join(run_uri, "model"), archive, output,
                     "--labels", labels, "--batch-size", "8", "--block-size", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5 error(s)" in result.stdout  # exit 0 and the error count printed

    rows = results_rows(output)
    keys = [r["key"] for r in rows]
    expected = {f"ddti/{n}" for n in names} | {"dicom/cine#1", "dicom/cine#2", "dicom/cine#3"} \
        | {"broken/empty", "broken/notes", "broken/half", "broken/nopixels", "broken/wrongsize"}
    assert sorted(keys) == sorted(expected)  # one row per input key
    errors = {r["key"]: r["error"] for r in rows if r["status"] == "error"}
    assert errors["broken/empty"].startswith("empty file")
    assert errors["broken/notes"].startswith("not an image")
    assert errors["broken/half"].startswith("truncated JPEG")
    assert errors["broken/nopixels"] == "DICOM without pixel data"
    assert errors["broken/wrongsize"].startswith("label is 60x50")
    assert len(errors) == 5

    ok = [r for r in rows if r["status"] == "ok"]
    for row in ok:  # masks in each input's original size
        mask = imaging.decode_png(storage.read_bytes(storage.join(output, "masks",
                                                                  row["key"] + ".png")))
        assert mask.shape == (row["height"], row["width"])
        assert set(np.unique(mask)) <= {0, 255}
    dicom_rows = [r for r in ok if r["key"].startswith("dicom/")]
    assert [r["frame"] for r in sorted(dicom_rows, key=lambda r: r["key"])] == [1, 2, 3]
    assert all(r["height"] == 200 and r["width"] == 300 for r in dicom_rows)
    assert all(r["area_mm2"] is None or r["area_mm2"] == pytest.approx(r["area_px"] * 0.01)
               for r in dicom_rows)

    # pooled metrics = numpy over the written mask PNGs and the labels
    hist = np.zeros((2, 2), np.int64)
    for row in ok:
        pred = imaging.decode_png(storage.read_bytes(
            storage.join(output, "masks", row["key"] + ".png"))) > 0
        label = imaging.decode_png(storage.read_bytes(
            storage.join(labels, row["key"] + ".png"))) > 0
        hist += np.array([[np.sum(~label & ~pred), np.sum(~label & pred)],
                          [np.sum(label & ~pred), np.sum(label & pred)]])
    saved = json.loads(storage.read_text(storage.join(output, "metrics.json")))
    assert saved["hist"] == hist.tolist()
    assert saved["images"] == len(ok) and saved["errors"] == 5
    assert saved["n_iou"] == pytest.approx(hist[1, 1] / (hist[1, 1] + hist[0, 1] + hist[1, 0]))
    assert storage.exists(storage.join(output, "_SUCCESS"))

    # no patient identifier in any output file
    for uri, data in all_output_bytes(output):
        for secret in (PATIENT_NAME, PATIENT_ID, "Doe^Jane"):
            assert secret.encode() not in data, uri

    # resume on S3: a block whose commit record is lost is done again, and only that block
    def committed_sources():
        return set(results.read_results(output, ["source_uri"]).column("source_uri").to_pylist())

    every_source = committed_sources()
    storage.delete(storage.list_files(storage.join(output, "results"))[0])
    lost = every_source - committed_sources()
    assert lost and lost != every_source  # one block of several (16 inputs each)
    rerun = run_cli("infer", storage.join(run_uri, "model"), archive, output,
                    "--labels", labels, "--batch-size", "8", "--block-size", "16")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(every_source) - len(lost)} already done, {len(lost)} to process" in (
        rerun.stdout + rerun.stderr)
    assert sorted(r["key"] for r in results_rows(output)) == sorted(expected)
    assert json.loads(storage.read_text(storage.join(output, "metrics.json")))["hist"] == \
        hist.tolist()
    applied_tta = json.loads(storage.read_text(storage.join(output, results.JOB_FILE)))["tta"]
    other = run_cli("infer", storage.join(run_uri, "model"), archive, output,
                    "--labels", labels, "--no-tta" if applied_tta else "--tta")
    assert other.returncode == 2 and "holds the results of another job (tta:" in other.stderr


@pytest.fixture(scope="module")
def phantom_inference(phantom_dataset, trained_run, tmp_path_factory):
    """One undisturbed infer run over the phantoms, with labels (batches and blocks of 8):
    the reference the tests below compare with. Returns OUTPUT."""
    raw, _ = phantom_dataset
    run_uri, _ = trained_run
    output = str(tmp_path_factory.mktemp("phantom-inference") / "out")
    infer.run(storage.join(run_uri, "model"), f"{raw}/images", output, labels=f"{raw}/masks",
              options=infer.InferOptions(batch_size=8, block_size=8), log=lambda *_: None)
    return output


@pytest.mark.timeout(900)
def test_ctrl_c_stops_and_the_rerun_resumes_exactly_once_with_identical_metrics(
        phantom_dataset, trained_run, phantom_inference, tmp_path):
    """SIGINT to a running `raythyroid infer` once masks are being written: exit 130 with one
    line within 30 s; the same command again, though one of its Predictor actors is killed
    mid-run, finishes with every key once and the metrics of the undisturbed run. The terminal
    shows none of Ray's own chatter."""
    raw, _ = phantom_dataset
    run_uri, _ = trained_run
    model = storage.join(run_uri, "model")
    clean, resumed = phantom_inference, str(tmp_path / "resumed")
    args = ["infer", model, f"{raw}/images", resumed, "--labels", f"{raw}/masks",
            "--batch-size", "8", "--block-size", "8"]
    first = start_cli(*args)
    deadline = time.time() + 300
    while not storage.list_files(f"{resumed}/results", (".parquet",)):
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    out, err = assert_stopped(first, signal.SIGINT, "infer", time.time())
    assert_clean_terminal(out + err)
    partial = results_rows(resumed)
    assert 0 < len(partial) < 120
    assert not storage.exists(storage.join(resumed, "_SUCCESS"))
    done_before = {r["source_uri"] for r in partial}

    # the rerun loses a Predictor actor once it has committed a block of its own
    files_before = len(storage.list_files(f"{resumed}/results", (".parquet",)))
    second = start_cli(*args, "--workers", "2")
    killed = kill_a_predictor_once(resumed, committed_before=files_before, run=second)
    out, err = second.communicate(timeout=600)
    assert killed, "no Predictor actor was killed"
    assert second.returncode == 0, err[-3000:]
    assert_clean_terminal(out + err)
    # blocks still in flight when the driver stopped may commit just after it: never fewer
    already = int(re.search(r"(\d+) already done", out).group(1))
    assert len(done_before) <= already < 120

    rows = results_rows(resumed)
    assert sorted(r["key"] for r in rows) == sorted(r["key"] for r in results_rows(clean))
    assert len({r["key"] for r in rows}) == len(rows) == 120  # every key exactly once
    resumed_metrics = json.loads(storage.read_text(f"{resumed}/metrics.json"))
    clean_metrics = json.loads(storage.read_text(f"{clean}/metrics.json"))
    assert resumed_metrics == clean_metrics
    # the report's review queue spans both runs: the least confident of all 120, each drawn
    queue = re.findall(r'<figure data-key="([^"]+)" data-rank="\d+"><img ',
                       storage.read_text(f"{resumed}/report/index.html").split(
                           'id="worst-iou"')[0])
    assert queue == [r["key"] for r in sorted(rows, key=lambda r: (r["confidence"], r["key"]))
                     ][:24]


@pytest.mark.timeout(600)
def test_int8_weights_segment_as_fp32_does_in_an_output_of_their_own(
        phantom_dataset, trained_run, phantom_inference, tmp_path):
    """`raythyroid quantize` stores int8 weights calibrated on training frames; infer
    --precision int8 runs them: other probabilities than fp32's, nearly its masks, rows that
    name the int8 weights, and an OUTPUT begun with int8 weights is not resumed with the fp32
    ones nor with int8 weights quantized again."""
    raw, prepared = phantom_dataset
    run_uri, _ = trained_run
    quantized = str(tmp_path / "int8-model")
    # the command's own main in this process (test_cli shows it is the console entry point's)
    assert cli.main(["quantize", storage.join(run_uri, "model"), prepared, quantized,
                     "--frames", "16"]) == 0
    entry = json.loads(storage.read_text(f"{quantized}/model.json"))["int8"]
    assert entry["calibration"]["frames"] == 16
    assert entry["sha256"] == hashlib.sha256(
        storage.read_bytes(f"{quantized}/{entry['weights']}")).hexdigest()

    output = str(tmp_path / "out")
    options = infer.InferOptions(precision="int8")  # default blocks: fewer tasks than above
    infer.run(quantized, f"{raw}/images", output, labels=f"{raw}/masks", options=options,
              log=lambda *_: None)
    fp32 = {r["key"]: r["confidence"] for r in results_rows(phantom_inference)}
    rows = results_rows(output)
    assert sorted(fp32) == sorted(r["key"] for r in rows)
    assert sum(r["confidence"] != fp32[r["key"]] for r in rows) > len(rows) / 2
    # the rows name the weights that made them: the int8 ones
    assert {r["model_version"] for r in rows} == {entry["sha256"][:16]}
    # the int8 masks scored against the fp32 run's as if those were the labels
    agreement, _ = evaluate.evaluate_folders(f"{output}/masks", f"{phantom_inference}/masks")
    assert agreement["n_iou"] >= 0.9, agreement
    with pytest.raises(UserError, match=r"another job \(int8: "):
        infer.run(quantized, f"{raw}/images", output, labels=f"{raw}/masks",
                  options=dataclasses.replace(options, precision="auto"), log=lambda *_: None)
    # quantized again in place (other calibration frames): other int8 weights, other masks
    first_weights = storage.read_bytes(f"{quantized}/{entry['weights']}")
    int8.write(storage.join(run_uri, "model"), prepared, quantized, frames=4, log=lambda *_: None)
    with pytest.raises(UserError, match=r"another job \(weights: .*the model has changed"):
        infer.run(quantized, f"{raw}/images", output, labels=f"{raw}/masks", options=options,
                  log=lambda *_: None)
    # weights that are not the ones model.json names are refused, not run under its name
    storage.write_bytes(f"{quantized}/{entry['weights']}", first_weights)
    with pytest.raises(UserError, match="is not the file its model.json names"):
        int8.load(quantized)


def kill_a_predictor_once(output: str, committed_before: int, run) -> list[int]:
    """SIGKILL one Predictor actor of a running infer once OUTPUT holds a results file more
    than `committed_before`; the killed pid, or nothing if the run ended first."""
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None:
        if len(storage.list_files(f"{output}/results", (".parquet",))) > committed_before:
            actors = [p for p in ray_processes("MapWorker") if "Predictor" in
                      " ".join(p.cmdline())]
            if actors:
                os.kill(actors[0].pid, signal.SIGKILL)
                return [actors[0].pid]
        time.sleep(0.05)
    return []


@pytest.mark.timeout(600)
def test_evaluate_matches_infer_metrics(phantom_dataset, phantom_inference, tmp_path):
    raw, _ = phantom_dataset
    output = phantom_inference
    result = run_cli("evaluate", f"{output}/masks", f"{raw}/masks", "--out",
                     str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr
    assert "n_IoU" in result.stdout
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    saved = json.loads(storage.read_text(f"{output}/metrics.json"))
    by_version = saved.pop("by_version")  # one model version made every row: its own are these
    assert evaluated == saved and list(by_version.values()) == [saved]


def test_safe_keys_never_leave_the_output():
    hostile = ["../../etc/passwd", "/abs/path", "a/../../b", "nul\x00byte", "x" * 500,
               "..", "./.hidden/../up", "weird name (1)"]
    for name in hostile:
        key = storage.safe_key(name)
        parts = key.split("/")
        assert ".." not in parts and "" not in parts and not key.startswith("/")
        assert "\x00" not in key and len(key) <= storage.MAX_KEY_LENGTH
        resolved = os.path.normpath(os.path.join("/out/masks", key + ".png"))
        assert resolved.startswith("/out/masks/")
    assert storage.safe_key("x" * 500) != storage.safe_key("x" * 499 + "y")


@pytest.mark.timeout(600)
def test_max_error_rate_turns_errors_into_exit_3(trained_run, tmp_path):
    run_uri, _ = trained_run
    archive = tmp_path / "archive"
    archive.mkdir()
    frame = next(phantom.generate(1, seed=4, height=180, width=280))
    (archive / "good.png").write_bytes(imaging.encode_png(frame.image))
    (archive / "bad.png").write_bytes(b"")
    result = run_cli("infer", storage.join(run_uri, "model"), str(archive),
                     str(tmp_path / "out"), "--max-error-rate", "0.2")
    assert result.returncode == 3
    assert "above --max-error-rate" in result.stderr
    assert storage.exists(str(tmp_path / "out" / "_SUCCESS"))
    # the same OUTPUT for another archive is a user mistake, not a resume
    other = tmp_path / "other"
    other.mkdir()
    (other / "good.png").write_bytes(imaging.encode_png(frame.image))
    again = run_cli("infer", storage.join(run_uri, "model"), str(other), str(tmp_path / "out"))
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "holds the results of another job (input" in again.stderr
    # the same archive with other TTA would give other masks for keys already written
    chose_tta = json.loads(storage.read_text(storage.join(run_uri, "model", "model.json")))["tta"]
    other_tta = run_cli("infer", storage.join(run_uri, "model"), str(archive),
                        str(tmp_path / "out"), "--no-tta" if chose_tta else "--tta")
    assert other_tta.returncode == 2
    assert (f"another job (tta: {json.dumps(chose_tta)} there, {json.dumps(not chose_tta)} in "
            f"this run); to resume") in other_tta.stderr


def test_an_output_begun_by_an_older_version_resumes_unless_its_inference_differs(tmp_path):
    """Older versions wrote no weights, TTA or post-processing into _JOB.json: those are not
    checked there, while a zoomed view they did not record means none was applied. What
    differs is named with both values, and whether a flag or the model changed."""
    job = {"input": "s3://archive", "labels": None, "model": "s3://models/m",
           "weights": "0123456789abcdef", "tta": True, "tta_zoom": 0.0,
           "postprocess": {"threshold": 0.5, "min_area_fraction": 0.0005, "fill_holes": True,
                           "keep_largest": 2}}
    older = {k: job[k] for k in ("input", "labels", "model")}

    def resume_with(held, now):
        output = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        output.mkdir()
        (output / results.JOB_FILE).write_text(json.dumps(held))
        return claim.claim_output(str(output), now)

    resume_with(older, job)  # resumes
    resume_with(job, job)
    # as the version before wrote them: tta_zoom only where applied, post-processing without
    # a setting added since (its default)
    resume_with(dict(older, tta_zoom=0.8), dict(job, tta_zoom=0.8))
    resume_with(dict(job, postprocess={k: v for k, v in job["postprocess"].items()
                                       if k != "fill_holes"}), job)
    model_changed = "the model has changed since this OUTPUT began"
    with pytest.raises(infer.UserError, match=rf"\(tta_zoom: 0.0 there, 0.8 in this run\); "
                                              rf"{model_changed}"):
        resume_with(older, dict(job, tta_zoom=0.8))  # begun before the zoomed view existed
    with pytest.raises(infer.UserError, match=rf"\(weights: .*; {model_changed}"):
        resume_with(job, dict(job, weights="fedcba9876543210"))  # retrained in place
    with pytest.raises(infer.UserError, match=r"\(postprocess: .*\"keep_largest\": 2"):
        resume_with(job, dict(job, postprocess=dict(job["postprocess"], keep_largest=0)))
    with pytest.raises(infer.UserError, match=r"\(fast: null there, true in this run\); to "
                                              r"resume, give the same"):
        resume_with(older, dict(job, fast=True))

    # a bundled model is its name and its weights: new weights under its name (a new release)
    # are a new version of it, going on in OUTPUT (test_versions.py); another name is another
    # MODEL given. Older versions wrote the weights into the name
    def older_bundled(name, weights, kept_weights=True):  # before "weights" was kept: False
        held = dict(job, model=f"{name} (bundled, weights {weights})", weights=weights)
        return held if kept_weights else {k: v for k, v in held.items() if k != "weights"}

    def bundled(name, weights):
        return dict(job, model=name, weights=weights)

    for held in (bundled("ddti", "aaaa"), older_bundled("ddti", "aaaa"),
                 older_bundled("ddti", "aaaa", kept_weights=False)):
        resume_with(held, bundled("ddti", "aaaa"))  # resumes
        assert resume_with(held, bundled("ddti", "bbbb")).previous == "aaaa"
        with pytest.raises(infer.UserError, match=r"\(model: \"ddti\" there, \"ddti-small\" "
                                                  r"in this run\); to resume, give the same"):
            resume_with(held, bundled("ddti-small", "bbbb"))
    odd_path = dict(job, model="/models/ddti (bundled, weights aaaa)/model")  # not bundled
    resume_with(odd_path, odd_path)


def test_compaction_keeps_each_key_once(tmp_path):
    output = str(tmp_path)
    row = {n: None for n in results.RESULT_SCHEMA.names}

    def write(*keys):
        results.write_results(output, pa.Table.from_pylist(
            [dict(row, key=k, source_uri=f"s/{k}", status="ok") for k in keys],
            schema=results.RESULT_SCHEMA))

    write("a", "b")
    write("b", "c")
    write("a")
    assert claim.compact_results(output) == 2
    keys = results.read_results(output, ["key"]).column("key").to_pylist()
    assert sorted(keys) == ["a", "b", "c"]
    assert len(storage.list_files(f"{output}/results")) == 2


@pytest.mark.timeout(300)
def test_labels_matching_no_input_stop_the_run_and_a_partial_match_warns(trained_run, ray_local,
                                                                        tmp_path, capsys):
    import shutil

    from raythyroid import cli

    run_uri, _ = trained_run
    model = storage.join(run_uri, "model")
    raw = tmp_path / "raw"
    phantom.write_folders(str(raw), 3, seed=8, height=120, width=160)
    archive = tmp_path / "archive"  # inputs keyed images/<stem>, labels keyed <stem>
    shutil.copytree(raw / "images", archive / "images")
    assert cli.main(["infer", model, str(archive), str(tmp_path / "none"),
                     "--labels", str(raw / "masks")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--labels matches no input" in err, err
    assert "keyed like 'images/" in err and "labels like '" in err
    assert not (tmp_path / "none" / "_JOB.json").exists()  # a corrected rerun is not refused

    labelled = sorted((raw / "masks").iterdir())[0]
    (tmp_path / "some" / "images").mkdir(parents=True)
    shutil.copy(labelled, tmp_path / "some" / "images" / labelled.name)
    assert cli.main(["infer", model, str(archive), str(tmp_path / "out"), "--labels",
                     str(tmp_path / "some"), "--batch-size", "4"]) == 0
    assert "--labels matches 1 of 3 inputs" in capsys.readouterr().out
    scored = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert scored["images"] == 1
