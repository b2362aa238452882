"""Things break for real: a flaky object store, processes killed mid-write (a worker node, a
training worker and a job's driver killed on the multi-node cluster: test_cluster). Every
image stays accounted for and the outputs match an undisturbed run."""
import json
import os
import pickle
import signal
import subprocess
import sys

import pyarrow as pa
import pytest

from raythyroid import claim, model, phantom, results, shards, storage

from cluster_jobs import wait_for
from helpers import ROOT, run_cli
from s3proxy import FaultyS3Proxy


def shard_rows(prepared: str) -> dict:
    manifest = shards.read_manifest(prepared)
    return {r["key"]: r for r in shards.read_rows(prepared, manifest, list(manifest["shards"]))}


@pytest.mark.timeout(900)
def test_flaky_s3_changes_no_preprocess_output(s3, ray_local):
    """503 SlowDown and reset connections on a fifth of all requests: preprocess still
    succeeds, with shards identical to a clean run's. (Infer through the same faults, with a
    worker node and its driver killed too: test_cluster; training's checkpoints: test_train,
    stopped and resumed.)"""
    from raythyroid import preprocess
    from raythyroid.imaging import PrepConfig

    bucket = s3.bucket("flaky")
    raw = storage.join(bucket, "raw")
    phantom.write_folders(raw, 20, seed=51, height=180, width=280)
    clean, flaky = storage.join(bucket, "clean"), storage.join(bucket, "flaky")

    # the clean reference on the session's Ray; the faulty run as users run it, a CLI process
    # whose job (and S3 clients) reach the store through a proxy that fails a fifth of requests
    preprocess.run(raw, f"{clean}/prepared", config=PrepConfig(size=64), log=lambda *_: None)
    proxy = FaultyS3Proxy(s3.url, seed=7, fault_rate=0.2)
    try:
        result = run_cli("preprocess", raw, f"{flaky}/prepared", "--size", "64",
                         env={"AWS_ENDPOINT_URL": proxy.url})
    finally:
        proxy.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    assert proxy.counts["slow_down"] >= 10 and proxy.counts["reset"] >= 10, proxy.counts
    assert shard_rows(f"{flaky}/prepared") == shard_rows(f"{clean}/prepared")


def write_results_files(output: str, count: int) -> str:
    """`count` results files of one ok row each under OUTPUT, as infer's blocks write them."""
    for i in range(count):
        row = {name: [None] for name in results.RESULT_SCHEMA.names}
        row.update(key=[f"case-{i:02d}"], source_uri=[f"s3://archive/{i}.png"], status=["ok"])
        storage.write_parquet(storage.join(output, results.RESULTS, f"part-{i:03d}.parquet"),
                              pa.table(row, schema=results.RESULT_SCHEMA))
    return output


@pytest.mark.timeout(300)
def test_sustained_s3_faults_never_exhaust_the_retries(s3, monkeypatch):
    """Three in ten requests throttled or reset, and one in ten responses cut off mid-body, for
    as long as the job runs: every read still succeeds, through pyarrow (results) and boto3
    (objects) alike. pyarrow's "standard" retry quota ran dry a few hundred requests in and
    failed every read after, and no SDK retries a body cut off after the request succeeded
    (the nightly infer died summarising its results)."""
    output = write_results_files(storage.join(s3.bucket("sustained"), "out"), 30)
    uris = storage.list_files(storage.join(output, results.RESULTS))
    clean = results.read_results(output).sort_by("key")
    objects = {uri: storage.read_bytes(uri) for uri in uris}
    proxy = FaultyS3Proxy(s3.url, seed=3, fault_rate=0.3, cut_rate=0.1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        for _ in range(6):
            assert results.read_results(output).sort_by("key").equals(clean)
        assert {uri: storage.read_bytes(uri) for uri in uris} == objects
    finally:
        proxy.stop()
    assert proxy.counts["slow_down"] + proxy.counts["reset"] >= 100, proxy.counts
    assert proxy.counts["cut"] >= 10, proxy.counts


@pytest.mark.timeout(300)
def test_a_damaged_results_file_fails_the_read_without_reading_each_file_again(s3, monkeypatch):
    """Only a transient fault sends a group read back file by file. A damaged file fails at
    once: the failing read makes about as many requests as a healthy read, where reading each
    file again first would double them."""
    output = write_results_files(storage.join(s3.bucket("damaged"), "out"), 30)
    proxy = FaultyS3Proxy(s3.url)  # no faults: it counts the requests
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        assert len(results.read_results(output)) == 30
        healthy = proxy.counts["forwarded"]
        # the last file in the group's order: a file-by-file retry would read all the others
        storage.write_bytes(storage.join(output, results.RESULTS, "part-029.parquet"),
                            b"not a parquet file")
        before = proxy.counts["forwarded"]
        with pytest.raises(pa.ArrowInvalid, match="part-029"):
            results.read_results(output)
        failing = proxy.counts["forwarded"] - before
    finally:
        proxy.stop()
    assert 0 < failing < 1.5 * healthy, (failing, healthy)


UNPICKLED_WRITES = """
import pickle, sys
import pyarrow.fs
fs = pickle.loads(sys.stdin.buffer.read())
for i in range(40):
    with fs.open_output_stream(f"{sys.argv[1]}/object-{i:02d}.json") as out:
        out.write(b'{"epoch": %d}' % i)
print(sum(1 for info in fs.get_file_info(pyarrow.fs.FileSelector(sys.argv[1])) if info.is_file))
"""


@pytest.mark.timeout(300)
def test_the_filesystem_ray_train_unpickles_keeps_the_retries(s3, monkeypatch):
    """Ray Train's controller and workers write checkpoints through the run's filesystem as
    they unpickle it in their own processes: three in ten requests throttled or reset still
    write every object there (pyarrow's own pickling dropped the retry strategy, and its
    default gave up within three attempts)."""
    bucket = s3.bucket("unpickled")
    proxy = FaultyS3Proxy(s3.url, seed=5, fault_rate=0.3)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        fs, path = storage.filesystem(storage.join(bucket, "checkpoints"))
        written = subprocess.run([sys.executable, "-c", UNPICKLED_WRITES, path],
                                 input=pickle.dumps(fs), capture_output=True, cwd=ROOT,
                                 timeout=240, env={k: v for k, v in os.environ.items()
                                                   if k != "AWS_ENDPOINT_URL"})
    finally:
        proxy.stop()
    assert written.returncode == 0, written.stderr.decode()[-2000:]
    assert written.stdout.decode().split() == ["40"]
    assert proxy.counts["slow_down"] + proxy.counts["reset"] >= 20, proxy.counts


WRITE = """
import os, sys
from raythyroid import storage
storage.write_bytes(sys.argv[1], os.urandom(1 << 20) * 600)
"""


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_write_killed_halfway_leaves_nothing_that_looks_complete(where, s3, tmp_path):
    root = str(tmp_path) if where == "local" else s3.bucket("halfway")
    target = storage.join(root, "results", "part-0001.parquet")
    writer = subprocess.Popen([sys.executable, "-c", WRITE, target], cwd=ROOT)

    def writing() -> bool:  # the write has visibly started: a temp file, or a multipart upload
        if where == "local":
            folder = tmp_path / "results"
            return folder.is_dir() and any(p.stat().st_size for p in folder.iterdir())
        return bool(s3.client.list_multipart_uploads(Bucket=root[5:]).get("Uploads"))

    wait_for(writing, timeout=120, every=0.01)
    writer.kill()
    assert writer.wait(timeout=60) == -signal.SIGKILL
    assert not storage.exists(target)
    assert storage.list_files(storage.join(root, "results"), (".parquet",)) == []
    assert claim.done_sources(root) == set()  # a rerun sees nothing as done


@pytest.mark.timeout(300)
def test_a_run_whose_driver_died_after_training_is_finished_without_retraining(
        phantom_dataset, trained_run, tmp_path):
    """Training ended (its last recorded checkpoint holds the final state) but the driver died
    before writing the model and metrics.json: a rerun writes them from that checkpoint, with
    no worker started, and a torn newer checkpoint folder (an upload cut off) is never read."""
    import shutil

    from raythyroid import train, training

    from helpers import TRAINED_EPOCHS
    _, prepared = phantom_dataset
    trained_uri, first = trained_run
    run_uri = str(tmp_path / "run")
    shutil.copytree(trained_uri, run_uri)
    for written_last in ("metrics.json", "history.jsonl"):
        (tmp_path / "run" / written_last).unlink()
    shutil.rmtree(tmp_path / "run" / "model")
    torn = tmp_path / "run" / training.CHECKPOINT_DIR / "checkpoint_2999-01-01_00-00-00.000000"
    torn.mkdir()
    (torn / training.STATE_FILE).write_bytes(b"\x80\x02 a torn upload")  # newest, unreadable
    lines = []
    again = train.run(prepared, run_uri, training.TrainConfig(epochs=TRAINED_EPOCHS, batch_size=8),
                      workers=2, log=lines.append)
    assert again == first
    assert any("training had ended" in str(line) for line in lines)
    assert not any("worker(s)" in str(line) for line in lines)  # Ray Train never started
    model.load(str(tmp_path / "run" / "model"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "history.jsonl")]
    assert [r["epoch"] for r in rows] == list(range(1, TRAINED_EPOCHS + 1))
