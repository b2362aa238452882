"""Shared test fixtures: the real DDTI sample, a real S3 endpoint (moto's server over HTTP), a
real local Ray runtime, a trained phantom model, a PACS and a browser. Helpers: helpers.py."""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import pytest

import helpers
from helpers import DDTI, TRAINED_EPOCHS, S3Endpoint, free_port, missing

# Never attach to a cluster that happens to run on the machine; every Ray test starts its own.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
os.environ.pop("RAY_ADDRESS", None)
# Workers push their metrics to the node's agent every 2 s (default 10), so a short job shows
# up in a 1 s Prometheus scrape; the agent keeps a gauge for two of these intervals after its
# last push, so Ray Data's iterator gauges (set every 5 s) are seen most of the time.
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")
# Ray Train's controller sees a finished worker group at its next 2 s health check, and every
# run starts a preemption-watcher process: a second and a process per run, ten runs a session
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Two lanes share two cores, so a torch process of one lane running two threads competes with
# the other lane. OpenMP's threads spin between parallel regions by default, burning the time
# slices the other lane needs: two such processes side by side ran the U-Net's training steps
# at half the rate they reach with PASSIVE, its forward passes at a quarter
# (bench/threads_bench.py; a process alone is faster spinning, but the lanes seldom leave a
# core idle: bench/suite_bench.py). Set before torch loads here and inherited by every
# process the suite starts (Ray nodes, their workers, CLI commands). Users' jobs keep
# OpenMP's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# `make test` runs two lanes side by side (pytest-xdist, -n 2). Every test that uses the
# session's trained phantom model runs in one lane, as one scope, so the model trains once; the
# other tests go module by module to whichever lane has room, the longest first, so that both
# lanes end together on a fast machine or a slow one. Each lane starts its own session
# fixtures (Ray, S3, a PACS...); what one lane waits on (a job's start-up, a time limit, a
# scrape) the other fills with work. The scopes are dealt by fixture, which only the workers'
# collection knows: they write each test's scope to a file the controller's scheduler reads
# (xdist's own loadgroup loses its groups on pytest 9.2).
LANES_FILE = "RAYTHYROID_TEST_LANES"
TRAINED_SCOPE = "trained"
# the other modules that take longest, longest first (pytest --durations; a three-node
# cluster and five jobs, a time-limited training run under Prometheus, ...): dealt first, so
# the short ones fill in around them at the end. An order gone stale costs balance only.
LONGEST_MODULES = ("tests/test_cluster.py", "tests/test_monitoring.py", "tests/test_cv.py",
                   "tests/test_demo.py", "tests/test_faults.py", "tests/test_train.py",
                   "tests/test_preprocess.py", "tests/test_bundled_model.py")


def pytest_configure(config):
    if "PYTEST_XDIST_WORKER" not in os.environ:
        # The package's bytecode, written once: where Python runs with PYTHONDONTWRITEBYTECODE
        # (as CI images often do), each of the suite's few hundred processes (Ray workers, CLI
        # commands) would otherwise compile the package's sources again.
        import compileall

        compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "raythyroid"),
                               quiet=1)
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="lanes-")
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
        os.environ[LANES_FILE] = os.path.join(folder, "lanes.json")


def scope_of(nodeid: str, fixturenames) -> str:
    """The trained model's tests share one scope; any other test's scope is its module."""
    return TRAINED_SCOPE if "trained_run" in fixturenames else nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config, items):
    path = os.environ.get(LANES_FILE)
    if path and "PYTEST_XDIST_WORKER" in os.environ:
        import json

        scopes = {item.nodeid: scope_of(item.nodeid, item.fixturenames) for item in items}
        partial = f"{path}.{os.environ['PYTEST_XDIST_WORKER']}"
        Path(partial).write_text(json.dumps(scopes))
        os.replace(partial, path)  # both workers write the same scopes


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    import json

    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        """Each scope goes whole to one lane; a lane takes the next scope when it is nearly
        done with its own: the trained model's first, then the longest modules."""
        scopes: dict | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.scopes is None:
                self.scopes = json.loads(Path(os.environ[LANES_FILE]).read_text())
            return self.scopes.get(nodeid) or scope_of(nodeid, ())

        def next_scope(self) -> str:
            def rank(scope: str) -> int:
                if scope == TRAINED_SCOPE:
                    return 0
                return 1 + LONGEST_MODULES.index(scope) if scope in LONGEST_MODULES \
                    else 1 + len(LONGEST_MODULES)
            # the first of equals in the queue's order: xdist's (most tests first, by default)
            return min(self.workqueue, key=rank)

        def _assign_work_unit(self, node) -> None:
            self.workqueue.move_to_end(self.next_scope(), last=False)
            super()._assign_work_unit(node)

    return Lanes(config, log)


@pytest.fixture(scope="session")
def ddti() -> Path:
    if not (DDTI / "images").is_dir():
        missing(f"DDTI sample not found at {DDTI}: real-image tests read ../shared/data/ddti "
                    f"in place (set RAYTHYROID_DDTI to point elsewhere)")
    return DDTI


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> S3Endpoint:
    """moto's S3 server on 127.0.0.1, with the environment every client (pyarrow, boto3, Ray
    workers, CLI subprocesses) reads its endpoint and credentials from."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                             "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    # a secret distinctive enough that finding it anywhere in a log or output means a leak
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="AKIARAYTHYROIDTEST",
                      AWS_SECRET_ACCESS_KEY="rt-secret-" + secrets.token_hex(12),
                      AWS_DEFAULT_REGION="us-east-1")
    yield S3Endpoint(url)
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_local(s3):
    """One local Ray runtime for the in-process pipeline tests. Started after the S3 endpoint so
    its worker processes inherit the endpoint and credentials."""
    import ray

    from raythyroid import runtime

    # a known port for this runtime's metrics agent (the monitoring test scrapes it); set only
    # around init so CLI subprocesses, each with its own Ray, do not all try to take it
    port = free_port()
    # PACS credentials in every worker's environment, as a Secret puts them in a cluster's pods
    # (they never travel in a job's runtime_env, which Ray logs): the pacs fixture's Orthanc
    # accepts them
    os.environ.setdefault("DICOMWEB_USERNAME", "nightly")
    os.environ.setdefault("DICOMWEB_PASSWORD", "pacs-" + secrets.token_hex(10))
    os.environ["RAYTHYROID_RAY_METRICS_PORT"] = str(port)
    try:
        started = runtime.init("local", dashboard=False)  # nothing here reads it
    finally:
        os.environ.pop("RAYTHYROID_RAY_METRICS_PORT", None)
    ray.metrics_port = port
    helpers.SESSION_RAY_ADDRESS = ray.get_runtime_context().gcs_address
    yield ray
    helpers.SESSION_RAY_ADDRESS = None
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory, ray_local):
    """120 phantom frames preprocessed at 128 px with the real pipeline: (raw root, output)."""
    from raythyroid import phantom, preprocess
    from raythyroid.imaging import PrepConfig

    root = tmp_path_factory.mktemp("phantoms")
    raw, prepared = str(root / "raw"), str(root / "prepared")
    phantom.write_folders(raw, 120, seed=1, height=180, width=280)
    preprocess.run(raw, prepared, config=PrepConfig(size=128), log=lambda *_: None)
    return raw, prepared


@pytest.fixture(scope="session")
def hospital_set(phantom_dataset, tmp_path_factory):
    """A second prepared set at the phantoms' size, of other frames (another seed), to train
    on with phantom_dataset as one: its keys and case ids ("1_1", "1", ...) are the phantom
    set's too, as two sources' ids would be. (raw root, output)"""
    from raythyroid import phantom, preprocess
    from raythyroid.imaging import PrepConfig

    root = tmp_path_factory.mktemp("hospital")
    raw, prepared = str(root / "raw"), str(root / "prepared")
    phantom.write_folders(raw, 40, seed=2, height=180, width=280)
    preprocess.run(raw, prepared, config=PrepConfig(size=128), log=lambda *_: None)
    return raw, prepared


@pytest.fixture(scope="session")
def trained_run(phantom_dataset, tmp_path_factory):
    """A U-Net trained on the phantoms by 2 Ray Train workers: (run uri, test metrics)."""
    from raythyroid import train, training

    _, prepared = phantom_dataset
    run_uri = str(tmp_path_factory.mktemp("run") / "run")
    result = train.run(prepared, run_uri, training.TrainConfig(epochs=TRAINED_EPOCHS, batch_size=8),
                       workers=2, log=lambda *_: None)
    return run_uri, result


@pytest.fixture(scope="session")
def dicom_corpus(ddti, tmp_path_factory):
    """Six DDTI frames in every container dcmtk and GDCM write, plus a cine
    (dicom_corpus.build): (the JPEGs, container -> files)."""
    import dicom_corpus as corpus

    absent = corpus.missing_tools()
    if absent:
        missing(f"needs dcmtk, libgdcm-tools and dicom3tools (missing {', '.join(absent)}): "
                f"`make test` installs them with apt-get when run as root")
    jpegs = sorted((ddti / "images").glob("*.jpg"))[:6]
    root = tmp_path_factory.mktemp("dicom-corpus")
    return jpegs, corpus.build(jpegs, root)


@pytest.fixture(scope="session")
def pacs(tmp_path_factory, ray_local):
    """Orthanc with DICOMweb on a loopback port, basic auth on, empty at the start; it accepts
    the credentials the shared Ray runtime's workers hold."""
    import pacs as pacs_lib

    reason = pacs_lib.missing()
    if reason:
        missing(reason)
    server = pacs_lib.Orthanc(tmp_path_factory.mktemp("orthanc"), free_port(),
                              os.environ.get("DICOMWEB_USERNAME", "nightly"),
                              os.environ.get("DICOMWEB_PASSWORD", "pacs-" + secrets.token_hex(10)))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for every page test, driven by Selenium through Debian's
    chromedriver (no driver download: the machine may be offline)."""
    import shutil

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        missing("no chromium and chromedriver: `make test` installs Debian's chromium and "
                "chromium-driver when it runs as root")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # as root Chromium needs --no-sandbox; a tall window shows whole pages in one screenshot
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,3000"):
        options.add_argument(flag)
    session = webdriver.Chrome(options=options,
                               service=webdriver.ChromeService(executable_path=driver))
    session.set_page_load_timeout(60)
    yield session
    session.quit()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` on 127.0.0.1 (sqlite store, artifacts served by it): its
    tracking URI."""
    import subprocess
    import sys
    import time
    import urllib.request

    command = Path(sys.executable).with_name("mlflow")
    if not command.exists():
        missing("MLflow not installed: `make test` installs it (the dev extra)")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [str(command), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'registry.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
        # its job runner (five polling consumer processes) serves features we do not use, and
        # would take CPU from the rest of the suite for the whole session
        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise RuntimeError(f"mlflow server did not start: "
                               f"{(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()
