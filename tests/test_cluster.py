"""The jobs as users run them: submitted through the Ray Jobs API to a multi-node Ray cluster
(cluster/local-cluster.sh), reading and writing a real S3 endpoint, and what survives a worker
node or a job's driver killed there. The pipeline itself runs once, in the cluster_pipeline
fixture (cluster_jobs.run_pipeline); the cluster lives for this module only, so its daemons
do not share the two cores with the rest of the suite."""
import io
import json
import os
import re
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raythyroid import model, results, shards, storage, training

from cluster_jobs import (BATCH_SIZE, EMA, EPOCHS, FRAMES, WORKERS, cluster_processes,
                          infer_outputs, run_pipeline, wait_for)
from helpers import LocalCluster, free_port, free_port_block


@pytest.fixture(scope="module")
def local_cluster(s3, tmp_path_factory):
    """Started for this module's tests, with the S3 endpoint in its nodes' environment, and
    stopped after them."""
    import shutil
    import tempfile

    # Ray's socket paths live under the state folder: keep it short
    state = Path(tempfile.mkdtemp(prefix="rtc", dir="/tmp"))
    base = free_port_block(3003)  # three nodes' port ranges, then their metrics ports
    metrics = base + 3000
    env = dict(os.environ, GCS_PORT=str(free_port()), DASHBOARD_PORT=str(free_port()),
               METRICS_PORT=str(metrics), PORT_BASE=str(base),
               RAY_BIN=str(Path(sys.executable).with_name("ray")),
               # Every job here ships the same working_dir package; Ray uploads it once, pins
               # it for 10 minutes, then deletes it when no job holds it. On a slow day this
               # module outlasts the pin, and a job submitted as the previous one ends found
               # its working directory gone (FileNotFoundError from os.getcwd in import torch).
               RAY_RUNTIME_ENV_TEMPORARY_REFERENCE_EXPIRATION_S="3600")
    cluster = LocalCluster(state, env)
    started = cluster.script("start")
    assert started.returncode == 0, started.stdout + started.stderr
    cluster.token = (state / "auth_token").read_text().strip()
    cluster.metrics_ports = [metrics, metrics + 1, metrics + 2]
    yield cluster
    cluster.script("stop")
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_pipeline(local_cluster, s3):
    """Preprocess, train (a worker killed mid-run) and infer as Jobs API jobs on the cluster,
    once for every cluster test (cluster_jobs.run_pipeline)."""
    return run_pipeline(local_cluster, s3)



@pytest.mark.timeout(1500)
def test_preprocess_train_infer_through_the_jobs_api_on_three_nodes(cluster_pipeline):
    pipeline = cluster_pipeline
    manifest = json.loads(storage.read_text(storage.join(pipeline.prepared, "manifest.json")))
    assert manifest["rows"] == FRAMES

    assert f"epoch {EPOCHS}/{EPOCHS}" in pipeline.logs["train"]
    assert storage.exists(storage.join(pipeline.run, "model", "model.json"))
    assert set(json.loads(storage.read_text(storage.join(pipeline.run, "metrics.json")))) \
        >= {"n_iou"}

    rows = results.read_results(pipeline.predictions).to_pylist()
    assert len(rows) == FRAMES and all(r["status"] == "ok" for r in rows)
    assert storage.exists(storage.join(pipeline.predictions, "_SUCCESS"))
    assert storage.exists(storage.join(pipeline.predictions, "metrics.json"))

    # the work ran on more than one node: Ray's state API saw the training workers and the
    # Predictor actors each spread over distinct nodes, and every result row names the node
    # of a Predictor. (Which Predictor gets each block is Ray Data's choice: on 60 small frames
    # one actor can take them all, so the rows alone cannot show the spread.)
    train_nodes = {a["node_id"] for a in pipeline.actors if a["class_name"] == "RayTrainWorker"}
    predictor_nodes = {a["node_id"] for a in pipeline.actors
                       if "Predictor" in a["class_name"] and a["node_id"]}
    assert len(train_nodes) >= 2 and len(predictor_nodes) >= 2
    assert {r["node_id"] for r in rows} <= predictor_nodes


@pytest.mark.timeout(1500)
def test_training_worker_killed_mid_epoch_on_the_cluster(cluster_pipeline, ray_local):
    """A training worker of the pipeline's train job was SIGKILLed once its first checkpoint
    was recorded: Ray Train restarted the group from the last checkpoint, every epoch ran once,
    and the weight
    average went on where it was. What ships is the average at the best epoch, without the
    deep-supervision heads, with its own validation score."""
    import io

    import torch

    pipeline = cluster_pipeline
    rows = [json.loads(line)
            for line in storage.read_text(f"{pipeline.run}/history.jsonl").splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    resumed = [r for r in rows if "resumed_from_epoch" in r]
    assert len(resumed) == 1 and resumed[0]["resumed_from_epoch"] >= 1
    assert resumed[0]["epoch"] == resumed[0]["resumed_from_epoch"] + 1

    # one average update per optimizer step, and it went on from the checkpoint: each worker
    # takes full batches of an equal shard every epoch, so a restarted average falls short
    manifest = shards.read_manifest(pipeline.prepared)
    steps_per_epoch = manifest["counts"]["train"] // WORKERS // BATCH_SIZE
    saved = [torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu",
                        weights_only=False)
             for uri in storage.list_files(f"{pipeline.run}/checkpoints")
             if uri.endswith("/" + training.STATE_FILE)]
    assert {s["ema"]["steps"] / s["epoch"] for s in saved if s["epoch"]} == {steps_per_epoch}
    last = max(saved, key=lambda s: s["epoch"])
    assert last["epoch"] == EPOCHS

    shipped_net, info = model.load(storage.join(pipeline.run, "model"))
    assert info.architecture.deep_supervision == 0
    assert info.training["config"]["ema"] == EMA
    shipped = shipped_net.state_dict()
    assert not any(k.startswith("aux.") for k in shipped)
    assert any(not torch.equal(shipped[k], last["model"][k]) for k in shipped
               if shipped[k].dtype.is_floating_point)
    best_averaged = last["best"]["model"]  # the average at the best epoch
    assert all(torch.equal(shipped[k], best_averaged[k]) for k in shipped)

    # the validation score kept with the model is the shipped (averaged) weights' own
    val = training.load_split(shards.read_prepared(pipeline.prepared), "val", full=True)
    bf16 = rows[0]["precision"] == "bf16"
    rescored = training.evaluate(shipped_net, val, 0, 1, torch.device("cpu"), bf16, 16)
    assert rescored["n_iou"] == pytest.approx(info.training["best_val"]["n_iou"], abs=2e-3)

    # an average restored from a checkpoint is the saved one, step count included
    restored = training.loop.WeightAverage(model.build(model.UNetConfig(deep_supervision=2)), EMA,
                                   last["ema"])
    assert restored.steps == last["ema"]["steps"]
    assert all(torch.equal(v, last["ema"]["weights"][k])
               for k, v in restored.model.state_dict().items())


# ---------------------------------------------------------------- things break

@pytest.fixture(scope="module")
def reference(cluster_pipeline):
    """The pipeline's undisturbed infer run, to compare disturbed runs of the archive with."""
    return infer_outputs(cluster_pipeline.predictions)


@pytest.mark.timeout(1500)
def test_worker_node_then_driver_killed_mid_infer_then_rerun(local_cluster, cluster_pipeline,
                                                             reference, s3):
    """One infer job of the archive loses a worker node (and the Predictor on it, if it was
    there) and goes on committing blocks; then its driver is killed; the same job again
    finishes it. Both jobs reach S3 through a proxy that answers a fifth of all requests with
    503 SlowDown or a reset connection. Nothing committed is redone, nothing is missing, and
    masks, rows and metrics are bit-identical to the undisturbed run. (One job for all three
    faults: each cluster job costs a driver's and a pool's start-up.)"""
    from s3proxy import FaultyS3Proxy

    # One Predictor actor of one CPU: the cluster has three one-CPU nodes, so losing one still
    # leaves a CPU for the read and write tasks wherever the actor restarts. (Two half-CPU
    # actors could leave half a CPU free on each node and no room for a one-CPU task.)
    output = storage.join(cluster_pipeline.bucket, "disturbed")
    entry = cluster_pipeline.infer_entry(output, workers=1, cpus_per_worker=1)
    proxy = FaultyS3Proxy(s3.url, seed=7, fault_rate=0.2)
    flaky = {"AWS_ENDPOINT_URL": proxy.url}
    try:
        before, logs = disturbed_then_rerun(local_cluster, entry, output, flaky)
    finally:
        proxy.stop()
    assert proxy.counts["slow_down"] >= 10 and proxy.counts["reset"] >= 10, proxy.counts
    done = int(re.search(r"(\d+) already done", logs).group(1))
    assert done == sum(pq.read_table(io.BytesIO(d)).num_rows for d in before.values())
    after = {uri: storage.read_bytes(uri)
             for uri in storage.list_files(f"{output}/results", (".parquet",))}
    assert all(after[uri] == data for uri, data in before.items())  # nothing redone
    new_keys = [k for uri, data in after.items() if uri not in before
                for k in pq.read_table(io.BytesIO(data)).column("key").to_pylist()]
    old_keys = [k for data in before.values()
                for k in pq.read_table(io.BytesIO(data)).column("key").to_pylist()]
    assert not set(new_keys) & set(old_keys)
    rows, masks, metrics = infer_outputs(output)
    clean_rows, clean_masks, clean_metrics = reference
    assert rows == clean_rows and masks == clean_masks
    assert metrics == clean_metrics  # bit for bit: the same JSON numbers


def disturbed_then_rerun(cluster, entry: str, output: str, env_vars: dict) -> tuple[dict, str]:
    """Submit the infer job, kill a worker node once a block is committed and the job's driver
    once another is, then run the same job again: (result files before the rerun, its logs)."""
    job = cluster.submit(entry, env_vars=env_vars)
    client = cluster.client()

    def committed() -> int:
        return len(storage.list_files(f"{output}/results", (".parquet",)))

    def at_least(count: int):
        return lambda: "ended" if client.get_job_status(job).is_terminal() else \
            committed() >= count

    try:
        assert wait_for(at_least(1)) is True, client.get_job_logs(job)[-3000:]
        # found now so that it dies the moment the run is seen going on without the node: the
        # blocks left after the first few commit in seconds, and the rerun needs some left
        drivers = wait_for(lambda: [p for p in cluster_processes(cluster, "jobs/infer.py")
                                    if "python" in p.name()])
        killed = cluster.script("kill-node", "1")
        assert killed.returncode == 0, killed.stderr
        # the run outlived the node: a block committed after it
        assert wait_for(at_least(committed() + 1), every=0.05) is True, \
            client.get_job_logs(job)[-3000:]
        for driver in drivers:
            driver.kill()
        cluster.wait(job, timeout=120)
    finally:
        cluster.script("add-node", "1")
    time.sleep(3)  # let tasks the driver left behind die or commit
    before = {uri: storage.read_bytes(uri)
              for uri in storage.list_files(f"{output}/results", (".parquet",))}
    assert 0 < sum(pq.read_table(io.BytesIO(d)).num_rows for d in before.values()) < FRAMES
    assert not storage.exists(f"{output}/_SUCCESS")

    status, logs = cluster.run_job(entry, env_vars=env_vars)
    assert status == "SUCCEEDED", logs[-3000:]
    return before, logs
