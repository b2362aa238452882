"""Monitoring against a real Prometheus: every dashboard panel query returns data after real
jobs ran, the alert rules check and behave, and both expositions lint clean."""
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from raythyroid import imaging, infer, phantom, preprocess, storage, telemetry, train, training
from raythyroid.imaging import PrepConfig

from helpers import ROOT, free_port, missing

MONITORING = ROOT / "k8s" / "monitoring"


@pytest.fixture(scope="session")
def promtools() -> Path:
    folder = Path(os.environ.get("PROMETHEUS_DIR", ROOT / ".cache" / "prometheus"))
    if not folder.is_absolute():
        folder = ROOT / folder
    binaries = folder / "usr" / "bin"
    if not (binaries / "prometheus").exists():
        missing(f"no Prometheus under {folder}: `make test` fetches it (make prometheus)")
    return binaries


def rules_file(tmp: Path) -> Path:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    path = tmp / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def test_alert_rules_check_and_fire_only_when_they_should(promtools, tmp_path):
    rules = rules_file(tmp_path)
    check = subprocess.run([promtools / "promtool", "check", "rules", str(rules)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "3 rules found" in check.stdout
    shutil.copy(ROOT / "tests" / "prometheus_alerts_test.yml", tmp_path / "alerts_test.yml")
    unit = subprocess.run([promtools / "promtool", "test", "rules", "alerts_test.yml"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout


def test_dashboard_is_portable():
    board = json.loads((MONITORING / "dashboard.json").read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
        assert re.search(r"\[jobs: [a-z, ]+\]", panel["description"])
    regenerated = subprocess.run(["python", str(MONITORING / "make_dashboard.py")],
                                 capture_output=True, text=True)
    assert regenerated.returncode == 0
    assert json.loads((MONITORING / "dashboard.json").read_text()) == board


# Late in a test session Ray's agent holds every series the session's jobs made and takes about
# a second to expose them (more on a slow machine): a 1 s scrape times out and records nothing.
# Its gauges stay exposed 4 s after a push (two 2 s export intervals), so 4 s scrapes see them.
RAY_SCRAPE = {"scrape_interval": "4s", "scrape_timeout": "4s"}


class Prometheus:
    def __init__(self, binaries: Path, folder: Path, targets: dict[str, str]):
        self.port = free_port()
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [dict({"job_name": name, "static_configs": [{"targets": [t]}]},
                                          **(RAY_SCRAPE if name == "ray" else {}))
                                     for name, t in targets.items()]}
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process = subprocess.Popen(
            [binaries / "prometheus", f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(folder / "prometheus.log", "w"))
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2)
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("Prometheus did not become ready")

    def query_range(self, expr: str, start: float, end: float) -> list:
        params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1"})
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/query_range?{params}",
                                    timeout=30) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


def panel_needs(panel) -> tuple[set, set]:
    jobs = set(re.search(r"\[jobs: ([a-z, ]+)\]", panel["description"]).group(1).split(", "))
    needs = set(re.findall(r"\[needs: ([a-z]+)\]", panel["description"]))
    return jobs, needs


# long enough for several epochs after the workers start (a good part of a minute while the
# other lane of `make test` keeps both cores busy), so scrapes see training midway and the
# workers' gauges while they live
TIME_LIMIT_MIN = 1.5


def check_time_limited_run(data: str, run_uri: str, result: dict, seconds: float) -> None:
    """Stopped near its time limit (500 epochs would take far longer; the slack covers starting
    the workers and the final test pass on a slow machine), with checkpoints, a model and test
    metrics, all on S3."""
    from raythyroid import metrics, model

    assert seconds < TIME_LIMIT_MIN * 60 + 90
    rows = storage.read_text(storage.join(run_uri, "history.jsonl")).splitlines()
    assert 1 <= len(rows) < 500
    assert set(result) == set(metrics.METRIC_KEYS)
    assert any("/checkpoints/checkpoint_" in n for n in storage.list_files(run_uri))
    _, info = model.load(storage.join(run_uri, "model"))
    assert info.data["uri"] == data and info.prep.size == 64


@pytest.mark.timeout(900)
def test_every_dashboard_panel_has_data_after_real_jobs(promtools, ray_local, s3, tmp_path):
    """Preprocess, train (on S3, stopped by its time limit: that guarantee is checked here
    too, on the same run) and infer with the model it made, while Prometheus scrapes."""
    bucket = s3.bucket("monitored")
    driver_port = free_port()
    prometheus = Prometheus(promtools, tmp_path, {
        "ray": f"127.0.0.1:{ray_local.metrics_port}",
        "raythyroid-driver": f"127.0.0.1:{driver_port}"})
    try:
        started = time.time()
        raw = tmp_path / "raw"
        phantom.write_folders(str(raw), 60, seed=31, height=180, width=280)
        (raw / "images" / "broken_1.jpg").write_bytes(b"not a jpeg")
        (raw / "masks" / "broken_1.png").write_bytes(
            (raw / "masks" / "1_1.png").read_bytes())
        prepared = storage.join(bucket, "prepared")
        preprocess.run(str(raw), prepared, config=PrepConfig(size=64),
                       log=lambda *_: None, metrics_port=driver_port)
        run_uri = storage.join(bucket, "runs", "r1")
        train_started = time.time()
        result = train.run(prepared, run_uri,
                           training.TrainConfig(epochs=500, batch_size=4,
                                                time_limit_min=TIME_LIMIT_MIN),
                           # one thread: a run stopped by the clock burns whatever cores it
                           # is given, and the lane beside it needs the other
                           workers=1, cpus_per_worker=0.5, log=lambda *_: None,
                           metrics_port=driver_port)
        train_seconds = time.time() - train_started
        # a night of 240 frames, one broken: Ray's agent drops a Predictor's counter seconds
        # after its last push, and over the 60 training frames the predictions spanned one or
        # two of its 4 s scrapes, too few for a rate at times (180 frames: three)
        night = tmp_path / "night"
        phantom.write_folders(str(night), 240, seed=32, height=180, width=280)
        for folder in ("images", "masks"):
            shutil.copy(raw / folder / f"broken_1.{'jpg' if folder == 'images' else 'png'}",
                        night / folder)
        infer.run(storage.join(run_uri, "model"), str(night / "images"), str(tmp_path / "out"),
                  labels=str(night / "masks"),
                  options=infer.InferOptions(batch_size=4, metrics_port=driver_port,
                                             block_size=8),
                  log=lambda *_: None)
        time.sleep(6)  # the last pushes from the workers and the last scrapes
        ended = time.time()
        check_time_limited_run(prepared, run_uri, result, train_seconds)
        # the driver's gauges moved while the epochs ran, not once when fit returned: a
        # scrape before the last epoch ended saw steps done; the ETA came from the time limit
        epochs = [json.loads(line) for line in storage.read_text(
            storage.join(run_uri, "history.jsonl")).splitlines()]
        partial = prometheus.query_range('raythyroid_job_done_inputs{pipeline="train"} > 0',
                                         train_started,
                                         train_started + epochs[-1]["elapsed_seconds"])
        assert partial, "no scrape saw training in progress"  # epochs, or steps within one
        # while it trained (an ETA above 0: a finished run's is 0, which proves nothing)
        eta = prometheus.query_range(
            f'raythyroid_job_eta_seconds{{pipeline="train"}} > 0 <= {TIME_LIMIT_MIN * 60}',
            train_started, train_started + train_seconds)
        assert eta, "a time-limited run's ETA comes from its time limit"
        # the stalled-job alert's age term on this real run: from the first step a scrape saw
        # to the end, its last progress stays seconds old (steps within an epoch count). Were
        # progress reported only at the end, as before live progress, no scrape would see a
        # step before the run ended, and every healthy run over 10 minutes would fire the
        # alert. (From the first step, not from the start: on a loaded machine the workers'
        # start-up takes a good part of the minute.)
        first_step = min(float(t) for series in partial for t, _ in series["values"])
        last = train_started + train_seconds - 2
        assert last - first_step >= 15, (first_step - train_started, train_seconds)
        age = prometheus.query_range(
            'time() - max by (pipeline, run) '
            '(raythyroid_job_last_progress_timestamp_seconds{pipeline="train"})',
            first_step, last)
        ages = [float(v) for series in age for _, v in series["values"]]
        assert ages and max(ages) < 15.0, (max(ages, default=None), first_step - train_started,
                                           train_seconds)

        board = json.loads((MONITORING / "dashboard.json").read_text())
        ran = {"preprocess", "infer", "train"}
        empty = []
        checked = 0
        for panel in board["panels"]:
            jobs, needs = panel_needs(panel)
            if needs or not jobs & ran:  # GPU panels need a GPU node
                continue
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "5s")
                checked += 1
                if not prometheus.query_range(expr, started, ended):
                    empty.append(f"{panel['title']}: {expr}")
        assert checked >= 15
        exposed = urllib.request.urlopen(
            f"http://127.0.0.1:{ray_local.metrics_port}/metrics", timeout=30).read().decode()
        scrapes = prometheus.query_range('scrape_duration_seconds{job="ray"}', started, ended)
        durations = [float(v) for _, v in scrapes[0]["values"]] if scrapes else []
        down = prometheus.query_range('up{job="ray"} == 0', started, ended)
        assert not empty, (
            "panels without data:\n" + "\n".join(empty)
            + f"\n({len(epochs)} epochs in {train_seconds:.0f} s, first ended at "
            f"{epochs[0]['elapsed_seconds']:.0f} s; Ray's agent exposes the training gauges "
            f"now: {'ray_raythyroid_train_epoch' in exposed}; {len(exposed) // 1000} kB exposed; "
            f"Ray's scrapes: {len(down[0]['values']) if down else 0} failed, longest "
            f"{max(durations, default=0):.2f} s)")
    finally:
        prometheus.stop()


@pytest.mark.timeout(120)
def test_the_last_epochs_gauges_outlive_the_agents_memory(ray_local):
    """Ray's agent drops a gauge two export intervals after a worker last set it; the last
    epoch's values must stay on the dashboard for as long as training runs."""
    interval_s = float(os.environ["RAY_metrics_report_interval_ms"]) / 1000

    @ray_local.remote(num_cpus=0)
    class RankZero:
        def end_an_epoch(self):
            telemetry.train_epoch("kept", steps=3, loss=0.5, images_per_s=10.0,
                                  val_n_iou=0.7, epoch=4)

    worker = RankZero.remote()
    ray_local.get(worker.end_an_epoch.remote())
    time.sleep(4 * interval_s)  # twice the agent's memory for a gauge set once
    exposed = urllib.request.urlopen(
        f"http://127.0.0.1:{ray_local.metrics_port}/metrics", timeout=30).read().decode()
    epochs = [line for line in exposed.splitlines()
              if line.startswith("ray_raythyroid_train_epoch{") and 'run="kept"' in line]
    assert epochs and float(epochs[0].rsplit(" ", 1)[1]) == 4, exposed[-2000:]
    ray_local.kill(worker)


@pytest.mark.timeout(600)
def test_expositions_lint_clean(promtools, ray_local, tmp_path):
    progress = telemetry.JobProgress("infer", "lint")
    progress.set_total(10)
    progress.advance(3, 1)
    driver = subprocess.run([promtools / "promtool", "check", "metrics"],
                            input=progress.exposition(), capture_output=True)
    assert driver.returncode == 0, driver.stdout + driver.stderr

    frame = next(phantom.generate(1, seed=2, height=180, width=280))
    storage.write_bytes(str(tmp_path / "in" / "a.png"), imaging.encode_png(frame.image))
    infer.run("ddti", str(tmp_path / "in"), str(tmp_path / "out"),
              options=infer.InferOptions(fast=True, batch_size=1), log=lambda *_: None)
    text = b""
    deadline = time.time() + 30
    while b"ray_raythyroid_images_predicted_total" not in text and time.time() < deadline:
        time.sleep(1)
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{ray_local.metrics_port}/metrics").read()
    whole = subprocess.run([promtools / "promtool", "check", "metrics"], input=text,
                           capture_output=True)
    assert whole.returncode in (0, 3), whole.stderr  # 1 would be a parse error; 3 is lint
    # Ray stamps every series it exports with its own camelCase labels (Component, NodeAddress,
    # SessionName, Version, WorkerId), which promtool's lint flags on Ray's metrics and ours
    # alike; everything raythyroid names itself must lint clean
    ray_labels = re.compile(r'(Component|NodeAddress|SessionName|Version|WorkerId)="[^"]*",?')
    ours = [ray_labels.sub("", line).replace(",}", "}")
            for line in text.decode().splitlines() if "raythyroid" in line]
    assert any(line.startswith("ray_raythyroid_images_predicted_total") for line in ours)
    node = subprocess.run([promtools / "promtool", "check", "metrics"],
                          input=("\n".join(ours) + "\n").encode(), capture_output=True)
    assert node.returncode == 0, node.stdout + node.stderr
