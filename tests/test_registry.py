"""The model loop against a real `mlflow server`: a training run (on two prepared sets as one)
logged and registered as a version, `promote` moving the champion alias only to a better
version, and the nightly infer following `models:/NAME@champion` into one OUTPUT across the
promotion."""
import json
import shutil
import uuid
from pathlib import Path

import pytest

from raythyroid import model, registry, results, shards, storage

from helpers import run_cli
from test_cli import in_process
from test_several_sets import check_trained_on_both


@pytest.mark.timeout(900)
def test_train_registers_promote_gates_and_infer_follows_the_champion(
        mlflow_server, phantom_dataset, hospital_set, trained_run, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    raw, prepared = phantom_dataset
    name = f"thyroid-nodules-{uuid.uuid4().hex[:8]}"  # a fresh model each session
    client = mlflow.MlflowClient(mlflow_server)

    # a one-epoch base-8 run, on the phantoms and a second prepared set as one: logged with
    # its flags and epochs, registered as version 1
    weak = str(tmp_path / "weak")
    assert in_process("train", prepared, hospital_set[1], weak, "--epochs", "1", "--base", "8",
                      "--workers", "1", "--register", name).returncode == 0
    check_trained_on_both(weak, shards.read_prepared([prepared, hospital_set[1]]),
                          mlflow_server)
    first = client.get_model_version(name, "1")
    logged = client.get_run(first.run_id)
    assert logged.data.params["base"] == "8" and logged.data.params["epochs"] == "1"
    assert [m.step for m in client.get_metric_history(first.run_id, "val_n_iou")] == [1]
    # the weekly loop finds the version its training run registered
    assert registry.version_of_run(name, storage.normalize(weak)) == "1"
    # its artifacts are the model folder train wrote, byte for byte
    downloaded = model.resolve(f"models:/{name}/1")
    assert model.read_info(downloaded).weights_sha256 == \
        model.read_info(storage.join(weak, "model")).weights_sha256

    # the well-trained phantom model as version 2
    trained = storage.join(trained_run[0], "model")
    done = run_cli("register", trained, name, env=env)
    assert done.returncode == 0 and f"{name} version 2" in done.stdout, done.stderr

    # no champion yet: version 1 takes the alias as it is, and the nightly infer by alias
    # runs it
    done = run_cli("promote", name, "1", prepared, env=env)
    assert done.returncode == 0, (done.stdout, done.stderr)
    archive, out = tmp_path / "archive", tmp_path / "night"
    archive.mkdir()
    images = sorted((Path(raw) / "images").iterdir())[:5]
    for image in images[:3]:
        shutil.copy(image, archive)
    nightly = ["infer", f"models:/{name}@champion", str(archive), str(out)]
    done = run_cli(*nightly, env=env)
    assert done.returncode == 0, done.stderr
    first_night = {p: p.read_bytes() for p in (out / "results").iterdir()}

    # version 2 is better and replaces it; version 1 again is refused (exit 4) and the
    # champion stays
    for version, code in (("2", 0), ("1", 4)):
        done = run_cli("promote", name, version, prepared, env=env)
        assert done.returncode == code, (version, done.stdout, done.stderr)
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    assert "stays 2" in done.stderr and len(done.stderr.strip().splitlines()) == 1

    # the next night runs version 2's weights on the night's new images, in the same OUTPUT:
    # the first night's rows stay as they were, each row names its version
    for image in images[3:]:
        shutil.copy(image, archive)
    done = run_cli(*nightly, env=env)
    assert done.returncode == 0, done.stderr
    assert "3 already done, 2 to process" in done.stdout
    job = json.loads((out / "_JOB.json").read_text())
    assert job["model"] == f"models:/{name}/2" and job["version"] == f"{name}/2"
    assert job["weights"] == model.read_info(trained).weights_sha256[:16]
    assert {p: p.read_bytes() for p in first_night} == first_night
    made = {r["key"]: r["model_version"] for r in results.read_results(str(out)).to_pylist()}
    assert made == {p.stem: f"{name}/{1 if p in images[:3] else 2}" for p in images}

    # a registry that does not know the name is one line, exit 2
    done = run_cli("infer", "models:/no-such-model@champion", f"{raw}/images",
                   str(tmp_path / "none"), env=env)
    assert done.returncode == 2 and "no-such-model@champion" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_registry_that_does_not_answer_is_never_no_champion(monkeypatch):
    """promote crowns a version as it is only when the model has no champion: a registry down
    (or refusing us) must be an error, not read as none."""
    from helpers import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(registry.UserError, match="cannot read thyroid-nodules@champion"):
        registry.champion("thyroid-nodules")
