"""Shared test fixtures: the real DDTI sample, a real S3 endpoint (moto's server over HTTP) and
a real local Ray runtime."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DDTI = Path(os.environ.get("RAYTHYROID_DDTI", ROOT.parent / "shared" / "data" / "ddti"))

# Never attach to a cluster that happens to run on the machine; every Ray test starts its own.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def ddti() -> Path:
    if not (DDTI / "images").is_dir():
        pytest.skip(f"DDTI sample not found at {DDTI}: real-image tests read ../shared/data/ddti "
                    f"in place (set RAYTHYROID_DDTI to point elsewhere)")
    return DDTI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Endpoint:
    def __init__(self, url: str):
        self.url = url
        self._count = 0

    @property
    def client(self):
        from raythyroid import storage

        return storage.s3_client()

    def bucket(self, prefix: str = "bucket") -> str:
        """A new empty bucket; returns its s3:// URI."""
        self._count += 1
        name = f"{prefix}-{self._count}-{os.getpid()}"
        self.client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload_tree(self, local: Path, uri: str) -> int:
        from raythyroid import storage

        count = 0
        for path in sorted(local.rglob("*")):
            if path.is_file():
                storage.write_bytes(storage.join(uri, path.relative_to(local).as_posix()),
                                    path.read_bytes())
                count += 1
        return count


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
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing-secret", AWS_DEFAULT_REGION="us-east-1")
    yield S3Endpoint(url)
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for the in-process pipeline tests."""
    import ray

    from raythyroid import runtime

    started = runtime.init("local")
    yield ray
    if started:
        ray.shutdown()


def run_cli(*args: str, env: dict | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed console entry point in a fresh process, as a user runs it."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "raythyroid.cli", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd or ROOT)
