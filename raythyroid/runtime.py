"""Joining or starting Ray, the same way for every job."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator


def init(address: str | None = None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one.

    Returns True when this call started Ray, so the caller knows to shut it down. Inside a Ray
    job (submitted with `ray job submit`) Ray is already up and nothing is started.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    options = {}
    if address == "local" and os.environ.get("RAYTHYROID_RAY_METRICS_PORT"):
        # a fixed port for Ray's metrics agent, so a local Prometheus can scrape worker metrics
        options["_metrics_export_port"] = int(os.environ["RAYTHYROID_RAY_METRICS_PORT"])
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True,
             runtime_env={"env_vars": storage_environment()} if storage_environment() else None,
             **options)
    context = ray.data.DataContext.get_current()
    # bars on a terminal; in job logs and CI they are only noise
    context.enable_progress_bars = sys.stderr.isatty()
    # Our own per-stage progress lines say more than Ray Data's per-operator chatter.
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return True


# Where object storage is, but never who we are: credentials (S3's, DICOMweb's) stay with the
# cluster (a Secret, a service account; a local Ray's workers inherit the driver's environment).
# A job's runtime environment is no place for them: Ray's runtime_env agent logs its env_vars.
STORAGE_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                     "RAYTHYROID_S3_MAX_ATTEMPTS")


def storage_environment() -> dict:
    """The driver's object-storage location, for workers on nodes started without it."""
    return {k: os.environ[k] for k in STORAGE_VARIABLES if os.environ.get(k)}


@contextlib.contextmanager
def session(address: str | None = None) -> Iterator[None]:
    import ray

    started = init(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def plan_workers(workers: int, gpu: bool, cpus_per_worker: float | None = None
                 ) -> tuple[float, int]:
    """(CPUs each worker or actor reserves, torch threads it runs) for `workers` of them.

    Without a GPU each leaves a core for Ray Data's read and write tasks and the driver where
    there is one to spare: on a 2-core machine, workers holding every CPU deadlock the tasks
    that feed them, so reservations are fractional. Threads use what is reserved plus the
    spare half core, never more than the cores shared out.
    """
    total = cluster_cpus()
    if cpus_per_worker is None:
        cpus_per_worker = 1.0 if gpu else max(0.5, (total - 1) / workers)
    threads = max(1, int(round(min(cpus_per_worker + 0.5, total / workers))))
    return cpus_per_worker, threads
