"""Joining or starting Ray, the same way for every job."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

def init(address: str | None = None, verbose: bool = False, dashboard: bool = True) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one (with Ray's
    dashboard unless `dashboard` is False: about ten processes that a Ray serving only
    programs, such as a test session's, never needs).

    Returns True when this call started Ray, so the caller knows to shut it down. Inside a Ray
    job (submitted with `ray job submit`) Ray is already up and nothing is started.
    """
    import ray

    if ray.is_initialized():
        return False
    quiet_ray_on_the_terminal(verbose)  # ray.init itself warns (token set-up)
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    options = {}
    if address == "local" and os.environ.get("RAYTHYROID_RAY_METRICS_PORT"):
        # a fixed port for Ray's metrics agent, so a local Prometheus can scrape worker metrics
        options["_metrics_export_port"] = int(os.environ["RAYTHYROID_RAY_METRICS_PORT"])
    if address == "local":
        if not dashboard:
            # only ever False: Ray's own default starts the dashboard and carries on should it
            # fail, where an explicit True would fail the whole start with it
            options["include_dashboard"] = False
        # cv trains folds side by side, each with its workers and Ray Data's tasks on
        # fractional CPUs: more Python workers than 4x the cores, by design. A raylet counts
        # that against how many workers it may start at once (one per core) and prints a
        # worker-pool warning on the user's terminal; the raylet this call starts allows more.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency",
                              str(4 * (os.cpu_count() or 1)))
    storage_env = storage_environment()
    ray.init(address=address, logging_level=logging.WARNING,
             # workers' output (Ray Train's and Ray Data's own lines, actor prefixes) stays in
             # Ray's log files unless asked for; what a person needs the driver says itself
             log_to_driver=verbose,
             runtime_env={"env_vars": storage_env} if storage_env else None,
             **options)
    context = ray.data.DataContext.get_current()
    # bars on a terminal; in job logs and CI they are only noise
    context.enable_progress_bars = sys.stderr.isatty()
    # Our own per-stage progress lines say more than Ray Data's per-operator chatter.
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    quiet_ray_on_the_terminal(verbose)
    return True


def quiet_ray_on_the_terminal(verbose: bool = False) -> None:
    """Ray's own warnings (deprecations, disabled progress bars, token set-up) stay in Ray's
    log files; only errors reach the terminal, unless --verbose."""
    import warnings

    if verbose:
        return
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*exclude_resources")
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and \
                    not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)


# Where object storage is, but never who we are: credentials (S3's, DICOMweb's) stay with the
# cluster (a Secret, a service account; a local Ray's workers inherit the driver's environment).
# A job's runtime environment is no place for them: Ray's runtime_env agent logs its env_vars.
STORAGE_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                     "RAYTHYROID_S3_MAX_ATTEMPTS",
                     # the model registry (models:/ URIs); its tokens stay with the cluster too
                     "MLFLOW_TRACKING_URI")


def storage_environment() -> dict:
    """The driver's object-storage location, for workers on nodes started without it. Inside
    a Ray job, less what the job's own runtime env sets (its workers get that anyway, and Ray
    refuses a driver that sets a job's variable again: a RayJob pointing AWS_ENDPOINT_URL at
    its MinIO failed to start)."""
    variables = {k: os.environ[k] for k in STORAGE_VARIABLES if os.environ.get(k)}
    return {k: v for k, v in variables.items() if k not in _job_env_vars()}


def _job_env_vars() -> dict:
    """The env_vars of the runtime env this process's Ray job was submitted with, if any."""
    import json

    try:  # set by Ray's job manager for a submitted job's driver
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return {}
    return ((config.get("runtime_env") or {}).get("env_vars")) or {}


@contextlib.contextmanager
def session(address: str | None = None, verbose: bool = False) -> Iterator[None]:
    import ray

    from . import stopping

    if not verbose and not ray.is_initialized():
        stopping.divert_native_stderr()
    started = init(address, verbose)
    stopping.install()  # after ray.init, whose own SIGTERM handler is a bare exit
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
