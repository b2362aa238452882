"""The model loop against a real `mlflow server`: a training run (on two prepared sets as one)
logged and registered as a version, `promote` moving the champion alias only to a better
version, and infer following `models:/NAME@champion`."""
import json
import uuid

import pytest

from raythyroid import model, registry, shards, storage

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

    # no champion yet: version 1 takes the alias as it is; version 2 is better and replaces
    # it; version 1 again is refused (exit 4) and the champion stays
    for version, code in (("1", 0), ("2", 0), ("1", 4)):
        done = run_cli("promote", name, version, prepared, env=env)
        assert done.returncode == code, (version, done.stdout, done.stderr)
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    assert "stays 2" in done.stderr and len(done.stderr.strip().splitlines()) == 1

    # the nightly infer by alias runs version 2's weights, and its job record names it
    out = tmp_path / "night"
    done = run_cli("infer", f"models:/{name}@champion", f"{raw}/images", str(out), env=env)
    assert done.returncode == 0, done.stderr
    job = json.loads((out / "_JOB.json").read_text())
    assert job["model"] == f"models:/{name}/2"
    assert job["weights"] == model.read_info(trained).weights_sha256[:16]

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
