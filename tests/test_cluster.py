"""The jobs as users run them: submitted through the Ray Jobs API to a multi-node Ray cluster
(cluster/local-cluster.sh), reading and writing a real S3 endpoint."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from raythyroid import infer, phantom, storage

ENTRY = "python jobs/{0}.py jobs/configs/{0}.yaml"


def sets(**values):
    return "".join(f" --set {k}={v}" for k, v in values.items())


@pytest.mark.timeout(1500)
def test_preprocess_train_infer_through_the_jobs_api_on_three_nodes(local_cluster, s3):
    bucket = s3.bucket("cluster")
    raw = storage.join(bucket, "raw")
    phantom.write_folders(raw, 60, seed=41, height=180, width=280)
    prepared, run, out = (storage.join(bucket, p) for p in ("prepared", "run", "predictions"))

    status, logs = local_cluster.run_job(
        ENTRY.format("preprocess") + sets(input=raw, output=prepared, size=64,
                                          metrics_port="null"))
    assert status == "SUCCEEDED", logs[-3000:]
    manifest = json.loads(storage.read_text(storage.join(prepared, "manifest.json")))
    assert manifest["rows"] == 60

    status, logs = local_cluster.run_job(
        ENTRY.format("train") + sets(data=prepared, run=run, epochs=3, time_limit="null",
                                     workers=2, cpus_per_worker=1, batch_size=4,
                                     metrics_port="null"))
    assert status == "SUCCEEDED", logs[-3000:]
    assert "epoch 3/3" in logs
    assert storage.exists(storage.join(run, "model", "model.json"))
    assert set(json.loads(storage.read_text(storage.join(run, "metrics.json")))) >= {"n_iou"}

    status, logs = local_cluster.run_job(
        ENTRY.format("infer") + sets(model=storage.join(run, "model"),
                                     input=storage.join(raw, "images"), output=out,
                                     labels=storage.join(raw, "masks"), workers=2,
                                     cpus_per_worker=1, batch_size=4, block_size=8,
                                     metrics_port="null"),
        # the pool starts whole before any block is fed, so both Predictors hold a node
        # even if the frames are done before a late one would have started
        env_vars={"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"})
    assert status == "SUCCEEDED", logs[-3000:]
    rows = infer.read_results(out).to_pylist()
    assert len(rows) == 60 and all(r["status"] == "ok" for r in rows)
    assert storage.exists(storage.join(out, "_SUCCESS"))
    assert storage.exists(storage.join(out, "metrics.json"))

    # the work ran on more than one node: Ray's state API saw the training workers and the
    # Predictor actors each spread over distinct nodes, and every result row names the node
    # of a Predictor. (Which Predictor gets each block is Ray Data's choice: on 60 small frames
    # one actor can take them all, so the rows alone cannot show the spread.)
    listed = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "list", "actors", "--address",
         local_cluster.dashboard, "--detail", "--format", "json", "--limit", "10000"],
        capture_output=True, text=True, timeout=120,
        env=dict(local_cluster.env, RAY_AUTH_MODE="token",
                 RAY_AUTH_TOKEN_PATH=str(local_cluster.state / "auth_token")))
    assert listed.returncode == 0, listed.stderr[-2000:]
    actors = json.loads(listed.stdout)
    train_nodes = {a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"}
    predictor_nodes = {a["node_id"] for a in actors
                       if "Predictor" in a["class_name"] and a["node_id"]}
    assert len(train_nodes) >= 2 and len(predictor_nodes) >= 2
    assert {r["node_id"] for r in rows} <= predictor_nodes
