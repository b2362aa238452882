"""The jobs on the multi-node cluster (cluster/local-cluster.sh), submitted through the Ray Jobs
API as users submit them, and the helpers the cluster tests share.

One pipeline run serves every cluster test: preprocess, then training (with a weight average
and deep supervision) with one of its workers killed mid-run, then an undisturbed infer whose
outputs the fault tests compare against.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from raythyroid import phantom, results, storage, training


FRAMES = 40
EPOCHS = 3
WORKERS, BATCH_SIZE, EMA = 2, 4, 0.9


def infer_outputs(output: str) -> tuple[dict, dict, dict]:
    """(rows by key without the node, mask bytes by name, metrics) of an infer OUTPUT: what two
    runs of one archive must agree on, bit for bit."""
    rows = {r["key"]: {k: v for k, v in r.items() if k != "node_id"}
            for r in results.read_results(output).to_pylist()}
    masks = {uri.rsplit("/masks/", 1)[1]: storage.read_bytes(uri)
             for uri in storage.list_files(storage.join(output, "masks"))}
    return rows, masks, json.loads(storage.read_text(storage.join(output, "metrics.json")))


def cluster_entry(job: str, **values) -> str:
    return f"python jobs/{job}.py jobs/configs/{job}.yaml" + "".join(
        f" --set {k}={v}" for k, v in values.items())


def cluster_processes(cluster, title: str) -> list:
    """Processes of this cluster (by the token path in their environment) titled `title`."""
    token_path = str(cluster.state / "auth_token")
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if title not in cmdline:
            continue
        try:
            if proc.environ().get("RAY_AUTH_TOKEN_PATH") == token_path:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            pass
    return found


def wait_for(condition, timeout: float = 300, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not reached")


@dataclass
class ClusterPipeline:
    bucket: str
    raw: str
    prepared: str
    run: str
    predictions: str
    # what every infer run of the archive passes, the reference run included
    infer_settings: dict
    logs: dict = field(default_factory=dict)  # job name -> its log
    actors: list = field(default_factory=list)  # Ray's state API after the jobs

    def infer_entry(self, output: str, **overrides) -> str:
        return cluster_entry("infer", output=output, **dict(self.infer_settings, **overrides))


def run_pipeline(cluster, s3) -> ClusterPipeline:
    bucket = s3.bucket("cluster")
    raw = storage.join(bucket, "raw")
    phantom.write_folders(raw, FRAMES, seed=41, height=180, width=280)
    pipeline = ClusterPipeline(
        bucket=bucket, raw=raw, prepared=storage.join(bucket, "prepared"),
        run=storage.join(bucket, "run"), predictions=storage.join(bucket, "predictions"),
        infer_settings=dict(model=storage.join(bucket, "run", "model"),
                            input=storage.join(raw, "images"), labels=storage.join(raw, "masks"),
                            batch_size=4, block_size=4, metrics_port="null"))

    status, pipeline.logs["preprocess"] = cluster.run_job(cluster_entry(
        "preprocess", input=raw, output=pipeline.prepared, size=64, metrics_port="null"))
    assert status == "SUCCEEDED", pipeline.logs["preprocess"][-3000:]

    # two one-CPU workers on three one-CPU nodes: they must take two distinct nodes
    job = cluster.submit(cluster_entry(
        "train", data=pipeline.prepared, run=pipeline.run, epochs=EPOCHS, time_limit="null",
        workers=WORKERS, cpus_per_worker=1, batch_size=BATCH_SIZE, ema=EMA, deep_supervision=2,
        metrics_port="null"))

    client = cluster.client()

    def recorded_or_ended():  # a checkpoint in Ray Train's record is what a restart resumes
        if client.get_job_status(job).is_terminal():
            return "ended"
        return len(training.recorded_checkpoints(pipeline.run))

    assert wait_for(recorded_or_ended, timeout=600, every=0.5) != "ended", \
        client.get_job_logs(job)[-3000:]
    workers = wait_for(lambda: cluster_processes(cluster, "ray::RayTrainWorker"))
    workers[-1].kill()  # test_cluster finds the restart in the run's history
    status, pipeline.logs["train"] = cluster.wait(job, timeout=900)
    assert status == "SUCCEEDED", pipeline.logs["train"][-3000:]

    status, pipeline.logs["infer"] = cluster.run_job(
        pipeline.infer_entry(pipeline.predictions, workers=2, cpus_per_worker=1),
        # the pool starts whole before any block is fed, so both Predictors hold a node
        # even if the frames are done before a late one would have started
        env_vars={"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"})
    assert status == "SUCCEEDED", pipeline.logs["infer"][-3000:]

    listed = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "list", "actors", "--address",
         cluster.dashboard, "--detail", "--format", "json", "--limit", "10000"],
        capture_output=True, text=True, timeout=120,
        env=dict(cluster.env, RAY_AUTH_MODE="token",
                 RAY_AUTH_TOKEN_PATH=str(cluster.state / "auth_token")))
    assert listed.returncode == 0, listed.stderr[-2000:]
    pipeline.actors = json.loads(listed.stdout)
    return pipeline
