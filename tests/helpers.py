"""What the tests share besides fixtures: running the CLI as a user does, checking a stopped
command, free ports, DICOM written for a test, the multi-node cluster, and `missing` (a real
part absent: a skip here, a failure under CI=true). Fixtures live in conftest.py."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DDTI = Path(os.environ.get("RAYTHYROID_DDTI", ROOT.parent / "shared" / "data" / "ddti"))


def missing(reason: str) -> None:
    """A real part the suite needs is not here (a Debian tool, Prometheus, the shared data):
    skipped with the reason on a developer's machine, failed with it under CI=true, so no
    guarantee silently stops being tested in CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


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


# The shared runtime's address once ray_local has started it.
SESSION_RAY_ADDRESS: str | None = None


def _cli_env(env: dict | None, own_ray: bool) -> dict:
    full_env = dict(os.environ)
    if SESSION_RAY_ADDRESS and not own_ray:
        full_env["RAY_ADDRESS"] = SESSION_RAY_ADDRESS
    full_env.update(env or {})
    return full_env


def run_cli(*args: str, env: dict | None = None, timeout: float = 600,
            cwd: Path | None = None, own_ray: bool = False) -> subprocess.CompletedProcess:
    """The installed console entry point in a fresh process, as a user runs it.

    While the session's Ray runtime is up the command joins it (RAY_ADDRESS), as a job does on
    a cluster, instead of starting and stopping a Ray of its own (10-15 s each here);
    `own_ray` keeps the standalone path. The result's `pid` names the command's files (its
    log: stopping.command_log).
    """
    with subprocess.Popen([sys.executable, "-m", "raythyroid.cli", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=_cli_env(env, own_ray), cwd=cwd or ROOT) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:  # its own timeout, or the test's (pytest-timeout) while it waits
            process.kill()
            raise
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    result.pid = process.pid
    return result


def start_cli(*args: str, env: dict | None = None, own_ray: bool = False) -> subprocess.Popen:
    """run_cli, without waiting: for the tests that signal a running command."""
    return subprocess.Popen([sys.executable, "-m", "raythyroid.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_cli_env(env, own_ray), cwd=ROOT)


# Ray's own chatter that a command's terminal must not show (it stays in Ray's log files)
RAY_NOISE = ("core_worker.cc", "Progress bars disabled", "execution finished in",
             "RayDeprecationWarning", "authentication_token_setup", "pid=")


def assert_clean_terminal(output: str) -> None:
    found = [line for line in output.splitlines() if any(n in line for n in RAY_NOISE)]
    assert not found, "Ray's own lines on the terminal:\n" + "\n".join(found[:10])


def assert_stopped(process: subprocess.Popen, signum: int, job: str, signalled_at: float,
                   ) -> tuple[str, str]:
    """The command stopped by `signum` within 30 s: exit 128 + signum and one last line saying
    what was done and how to resume; no traceback, no stack dump. Returns (stdout, stderr)."""
    import re
    import signal
    import time

    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, (process.returncode, err[-3000:])
    assert time.time() - signalled_at < 30
    name = signal.Signals(signum).name
    assert re.fullmatch(rf"raythyroid: {job} interrupted \({name}\) after \d+ of \d+ \w+; "
                        r"rerun the same command to resume", err.strip().splitlines()[-1]), err
    assert "Traceback" not in out + err, err[-3000:]
    # Ray's C++ crash handler (absl) would dump its stack on SIGTERM into the command's own
    # log, where native stderr goes: the command's handler must have taken the signal first
    from raythyroid import stopping

    native = Path(stopping.command_log(process.pid))
    assert native.exists()  # Ray's native output went there, not to the terminal
    dumped = native.read_text(errors="replace")
    assert "*** SIG" not in dumped and "Fatal Python" not in dumped, dumped[-3000:]
    return out, err


TRAINED_EPOCHS = 10


def ray_processes(name: str) -> list:
    """Live processes of the session's Ray runtime whose title Ray set to `ray::<name>...`
    (workers, actors: the children of its raylet). The other lane's runtime has its own."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if cmdline.startswith(f"ray::{name}") and proc.info.get("ppid") == raylet:
            found.append(proc)
    return found


PATIENT_NAME = "Doe^Jane^Private"
PATIENT_ID = "PID-7731-SECRET"
INSTITUTION = "St Example Thyroid Clinic"


def make_dicom(frames, spacing_mm=(0.1, 0.1), ultrasound_region=False, pixel_data=True,
               study_uid: str | None = None, series_uid: str | None = None,
               patient_id: str = PATIENT_ID, study_date: str = "20260101") -> bytes:
    """An ultrasound DICOM (single- or multi-frame, 8-bit gray) carrying patient identifiers
    that must never reach an output; in a new study and series unless given."""
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    frames = [np.asarray(f, np.uint8) for f in frames]
    multi = len(frames) > 1
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ("1.2.840.10008.5.1.4.1.1.3.1" if multi
                                    else "1.2.840.10008.5.1.4.1.1.6.1")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = PATIENT_NAME, patient_id
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.InstitutionName = INSTITUTION
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID, ds.AccessionNumber = "S1", "ACC-99"
    ds.StudyDate, ds.StudyTime = study_date, "101010"
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "US", 1, 1
    ds.Manufacturer = "Phantom"
    ds.Rows, ds.Columns = frames[0].shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if multi:
        ds.NumberOfFrames = len(frames)
    if ultrasound_region:
        region = Dataset()
        region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
        region.PhysicalDeltaX, region.PhysicalDeltaY = spacing_mm[1] / 10, spacing_mm[0] / 10
        ds.SequenceOfUltrasoundRegions = [region]
    elif spacing_mm:
        ds.PixelSpacing = list(spacing_mm)
    if pixel_data:
        ds.PixelData = np.stack(frames).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class LocalCluster:
    """cluster/local-cluster.sh: a head and two worker nodes of one Ray cluster, on loopback."""

    def __init__(self, state: Path, env: dict):
        self.state, self.env = state, env
        self.dashboard = f"http://127.0.0.1:{env['DASHBOARD_PORT']}"
        self.token = None

    def script(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "cluster" / "local-cluster.sh"), *args,
                               str(self.state)], capture_output=True, text=True,
                              env=self.env, timeout=timeout)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard,
                                   headers={"Authorization": f"Bearer {self.token}"})

    def submit(self, entrypoint: str, env_vars: dict | None = None) -> str:
        """Submit through the Jobs API with the project as working_dir; the job id."""
        # as the k8s RayJobs: a stopped job gets 30 s to end cleanly before it is killed
        env_vars = dict({"RAY_JOB_STOP_WAIT_TIME_S": "30"}, **(env_vars or {}))
        return self.client().submit_job(entrypoint=entrypoint,
                                        runtime_env={"working_dir": str(ROOT),
                                                     "env_vars": env_vars})

    def wait(self, job_id: str, timeout: float = 600) -> tuple[str, str]:
        """(final status, logs) of a submitted job; a job still running at `timeout` is
        stopped and reported as TIMEOUT."""
        import time

        client = self.client()
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = client.get_job_status(job_id)
            if status.is_terminal():
                return str(status).rsplit(".", 1)[-1], client.get_job_logs(job_id)
            time.sleep(1)
        client.stop_job(job_id)
        return "TIMEOUT", client.get_job_logs(job_id)

    def run_job(self, entrypoint: str, timeout: float = 600,
                env_vars: dict | None = None) -> tuple[str, str]:
        return self.wait(self.submit(entrypoint, env_vars), timeout)


def free_port_block(size: int) -> int:
    """The first of `size` consecutive free ports."""
    import random

    for _ in range(100):
        # below Linux's ephemeral range, so ports the OS hands out elsewhere never land inside
        start = random.randint(20000, 32000 - size)
        try:
            sockets = []
            for port in range(start, start + size):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            return start
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port block")


def make_dicom_with_corrupt_frame(frames, corrupt_index: int) -> bytes:
    """A multi-frame RLE Lossless DICOM whose frame `corrupt_index` is cut off."""
    import io

    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.pixels.encoders import RLELosslessEncoder
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(io.BytesIO(make_dicom(frames)))
    rows, cols = frames[0].shape
    encoded = [RLELosslessEncoder.encode(
        f, rows=rows, columns=cols, samples_per_pixel=1, bits_allocated=8, bits_stored=8,
        pixel_representation=0, photometric_interpretation="MONOCHROME2", number_of_frames=1)
        for f in frames]
    encoded[corrupt_index] = encoded[corrupt_index][:20]
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
