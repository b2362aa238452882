"""The model loop end to end, against the suite's PACS (Orthanc) and a real `mlflow server`:
a night segments the PACS with the registry's champion and files its SEGs; radiologists' SEGs,
saved by a viewer, correct some frames; preprocess over DICOMweb learns exactly their masks; a
fine-tune of a phantom model on those corrections and the phantoms is registered; `promote`
crowns it only because it is better; the next night follows the new champion into the same
OUTPUT."""
import json
import uuid

import numpy as np
import pytest

from raythyroid import imaging, model, phantom, registry, results, shards, storage
from raythyroid.dicom import read as dicom_read

import pacs as pacs_lib
from helpers import make_dicom, run_cli
from test_several_sets import check_trained_on_both

STUDY_DATE = "20240301"  # a day no other test files studies under


@pytest.mark.timeout(1200)
def test_corrections_in_the_pacs_teach_the_next_champion(
        pacs, mlflow_server, phantom_dataset, trained_run, ray_local, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    raw, prepared = phantom_dataset
    name = f"thyroid-nodules-{uuid.uuid4().hex[:8]}"  # a fresh model each session
    client = mlflow.MlflowClient(mlflow_server)

    # the model in use: a base-8 network that never trained (a model folder made elsewhere:
    # `register` takes any), registered by hand as version 1 and crowned as it is (the model
    # has no champion yet)
    weak = str(tmp_path / "weak")
    model.save(model.build(model.UNetConfig(base=8)), storage.join(weak, "model"),
               {"prep": shards.read_manifest(prepared)["prep"]})
    done = run_cli("register", storage.join(weak, "model"), name, env=env)
    assert done.returncode == 0 and f"{name} version 1" in done.stdout, done.stderr
    downloaded = model.resolve(f"models:/{name}/1")  # the folder registered, byte for byte
    assert model.read_info(downloaded).weights_sha256 == \
        model.read_info(storage.join(weak, "model")).weights_sha256
    assert promote(name, "1", prepared, env).returncode == 0

    # the PACS: phantom frames of six patients, each corrected by a radiologist in a viewer
    # (and among them our own SEG of a frame, and one more frame only our SEG covers)
    frames = list(phantom.generate(12, seed=61, height=180, width=280, max_frames_per_case=2))
    images = [f.image[..., 0] for f in frames]  # gray frames in RGB: ultrasound is 8-bit gray
    corrections = pacs_lib.upload_corrections(
        pacs, images, [f.mask > 0 for f in frames],
        [f"PAT-{f.key.split('_')[0]}" for f in frames], STUDY_DATE)

    # the night: the champion segments every frame there and files a SEG of each
    output = tmp_path / "nightly"
    night = ["infer", f"models:/{name}@champion", corrections.url, str(output), "--stow"]
    done = run_cli(*night, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    first_night = {r["key"]: r for r in results.read_results(str(output)).to_pylist()}
    sources = set(corrections.masks) | set(corrections.ours_only)
    assert set(first_night) == sources
    assert {r["model_version"] for r in first_night.values()} == {f"{name}/1"}
    committed = {uri: storage.read_bytes(uri)
                 for uri in storage.list_files(str(output / results.RESULTS), (".parquet",))}

    # the week: preprocess over DICOMweb learns the newest person's SEG of each frame, the
    # masks the test drew, and none of ours (those of the night, or the one under frame 0)
    corrected = str(tmp_path / "corrected")
    done = run_cli("preprocess", corrections.url, corrected, "--size", "128", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = shards.read_manifest(corrected)
    rows = shards.read_rows(corrected, manifest, ["train", "val", "test"],
                            ["key", "full_mask"])
    assert {r["key"] for r in rows} == set(corrections.masks)
    for row in rows:
        assert np.array_equal(imaging.decode_png(row["full_mask"]) > 0,
                              corrections.masks[row["key"]]), row["key"]

    # a fine-tune of the phantom model on the corrections and the phantoms as one (each set
    # split by its own cases), logged with its flags and epochs and registered as version 2
    tuned = str(tmp_path / "tuned")
    done = run_cli("train", prepared, corrected, tuned, "--epochs", "1", "--batch-size", "8",
                   "--init", storage.join(trained_run[0], "model"), "--register", name,
                   env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    second = client.get_model_version(name, "2")
    assert registry.version_of_run(name, storage.normalize(tuned)) == "2"
    assert client.get_run(second.run_id).data.params["epochs"] == "1"
    assert [m.step for m in client.get_metric_history(second.run_id, "val_n_iou")] == [1]
    check_trained_on_both(tuned, shards.read_prepared([prepared, corrected]), mlflow_server)
    info = model.read_info(storage.join(tuned, "model"))

    # promote: version 2 is better than the champion and replaces it; version 1 again is
    # refused (exit 4, one line) and the champion stays
    assert promote(name, "2", prepared, env).returncode == 0
    refused = promote(name, "1", prepared, env)
    assert refused.returncode == 4, refused.stderr
    assert "stays 2" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert client.get_model_version_by_alias(name, "champion").version == "2"

    # the next night: a new frame arrives; the same command runs version 2 into the same
    # OUTPUT, redoing nothing the first night committed
    newcomer = make_dicom([images[0][::-1]], patient_id="PAT-new", study_date=STUDY_DATE)
    pacs.upload(newcomer)
    done = run_cli(*night, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(sources)} already done, 1 to process" in done.stdout, done.stdout
    rows = {r["key"]: r for r in results.read_results(str(output)).to_pylist()}
    assert set(rows) == sources | {pacs_lib.infer_key(newcomer)}
    assert rows[pacs_lib.infer_key(newcomer)]["model_version"] == f"{name}/2"
    assert all(rows[key] == first_night[key] for key in first_night)
    assert all(storage.read_bytes(uri) == data for uri, data in committed.items())
    # the SEG filed tonight names the version that drew it, where a viewer shows it
    filed = next(i for i in pacs.instances("SEG")
                 if i["sop"] == rows[pacs_lib.infer_key(newcomer)]["seg_uid"])
    seg = dicom_read.read_dataset(pacs.file(filed["id"]), True)
    assert f"{name}/2" in seg.SeriesDescription
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == f"{name}/2"
    job = json.loads((output / results.JOB_FILE).read_text())
    assert job["model"] == f"models:/{name}/2" and job["version"] == f"{name}/2"
    assert job["weights"] == info.weights_sha256[:16]

    # a registry that does not know the name is one line, exit 2
    done = run_cli("infer", "models:/no-such-model@champion", corrections.url,
                   str(tmp_path / "none"), env=env)
    assert done.returncode == 2 and "no-such-model@champion" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def promote(name: str, version: str, labelled: str, env: dict):
    return run_cli("promote", name, version, labelled, env=env)
