"""Every metric the jobs export, named in one place.

Workers (read/prepare tasks, Predictor actors, train workers) record through `ray.util.metrics`,
so Ray's metrics agent on each node serves them on the node's metrics-export port, as on
KubeRay; Ray prefixes their names with `ray_`. The driver serves job progress (total, done,
errors, rate, ETA, state) with prometheus_client on `--metrics-port`, so a plain local run can be
scraped too. The dashboard and alert rules under k8s/monitoring/ query exactly these names.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
from typing import Iterator

PREFIX = "raythyroid"
# Ray exports worker metrics with this prefix; the dashboard and rules use the full names.
RAY_PREFIX = "ray_"
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
STATES = ("running", "succeeded", "failed", "interrupted")

# reason text (the start of an error row's reason) -> a low-cardinality label value
_REASON_CLASSES = (
    ("empty", "empty"), ("truncated", "truncated"), ("not an image", "not_image"),
    ("mask is not an image", "not_image"), ("image too large", "too_large"),
    ("mask too large", "too_large"), ("image too small", "too_small"),
    ("corrupt dicom frame", "dicom_frame"), ("dicom pixel data cut short", "truncated"),
    ("dicom frame", "dicom_frame"), ("dicom", "dicom"), ("unreadable dicom", "dicom"),
    ("unsupported transfer syntax", "dicom"), ("no decoder installed", "dicom"),
    ("unsupported dicom", "dicom"), ("multi-frame image", "dicom"),
    ("cannot read: not found", "missing"), ("cannot read: permission denied", "forbidden"),
    ("cannot read", "read"), ("label", "label"), ("mask", "mask"), ("no mask", "unpaired"),
    ("duplicate", "duplicate"), ("corrupt", "corrupt"), ("undecodable", "corrupt"),
)


def reason_class(reason: str | None) -> str:
    text = (reason or "").lower()
    for prefix, name in _REASON_CLASSES:
        if text.startswith(prefix):
            return name
    return "other"


# ---------------------------------------------------------------- worker side (Ray)

@functools.lru_cache(maxsize=None)
def _worker_metrics() -> dict:
    from ray.util import metrics as m

    return {
        "read": m.Counter(f"{PREFIX}_images_read", "Images (files or frames) read",
                          tag_keys=("pipeline",)),
        "prepared": m.Counter(f"{PREFIX}_images_prepared", "Images prepared for the model",
                              tag_keys=("pipeline",)),
        "predicted": m.Counter(f"{PREFIX}_images_predicted", "Images segmented by the model",
                               tag_keys=("pipeline",)),
        "failed": m.Counter(f"{PREFIX}_images_failed", "Inputs that ended as error rows",
                            tag_keys=("pipeline", "stage", "reason")),
        "skipped": m.Counter(f"{PREFIX}_inputs_skipped",
                             "Inputs that hold no image (DICOM reports, plans, waveforms...)",
                             tag_keys=("pipeline", "kind")),
        "bytes": m.Counter(f"{PREFIX}_bytes_read", "Bytes read from storage",
                           tag_keys=("pipeline",)),
        "latency": m.Histogram(f"{PREFIX}_batch_latency_seconds", "Seconds per batch and stage",
                               boundaries=LATENCY_BUCKETS_S, tag_keys=("pipeline", "stage")),
        "steps": m.Counter(f"{PREFIX}_train_steps", "Optimizer steps", tag_keys=("run",)),
        "loss": m.Gauge(f"{PREFIX}_train_loss", "Mean training loss of the last epoch",
                        tag_keys=("run",)),
        "train_rate": m.Gauge(f"{PREFIX}_train_images_per_second",
                              "Training images per second, all workers", tag_keys=("run",)),
        "val_n_iou": m.Gauge(f"{PREFIX}_val_n_iou", "Validation nodule IoU of the last epoch",
                             tag_keys=("run",)),
        "epoch": m.Gauge(f"{PREFIX}_train_epoch", "Epochs completed", tag_keys=("run",)),
    }


def _ray_ready() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except Exception:
        return False


def count(what: str, n: int = 1, pipeline: str = "infer") -> None:
    """Add to an images or bytes counter: what in read | prepared | predicted | bytes."""
    if n and _ray_ready():
        _worker_metrics()[what].inc(n, tags={"pipeline": pipeline})


def failed(stage: str, reason: str | None, pipeline: str = "infer", n: int = 1) -> None:
    if n and _ray_ready():
        _worker_metrics()["failed"].inc(n, tags={"pipeline": pipeline, "stage": stage,
                                                 "reason": reason_class(reason)})


def skipped(reason: str | None, pipeline: str = "infer") -> None:
    """An input that is not an image: counted apart, so error rates and alerts ignore it."""
    if _ray_ready():
        kind = (reason or "").partition("(")[2].rstrip(")") or "other"
        _worker_metrics()["skipped"].inc(1, tags={"pipeline": pipeline, "kind": kind})


class timed:
    """Context manager: observe a batch's wall time in the latency histogram."""

    def __init__(self, stage: str, pipeline: str = "infer"):
        self.stage, self.pipeline = stage, pipeline

    def __enter__(self):
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if _ray_ready():
            _worker_metrics()["latency"].observe(time.perf_counter() - self.started,
                                                 tags={"pipeline": self.pipeline,
                                                       "stage": self.stage})
        return False


def train_epoch(run: str, steps: int, loss: float, images_per_s: float, val_n_iou: float,
                epoch: int) -> None:
    if not _ray_ready():
        return
    if steps:
        _worker_metrics()["steps"].inc(steps, tags={"run": run})
    with _epoch_gauges_lock:
        _epoch_gauges[run] = {"loss": loss, "train_rate": images_per_s,
                              "val_n_iou": val_n_iou, "epoch": epoch}
    _set_epoch_gauges()
    global _epoch_gauges_kept
    if not _epoch_gauges_kept:
        _epoch_gauges_kept = True
        threading.Thread(target=_keep_epoch_gauges, daemon=True,
                         name="raythyroid-epoch-gauges").start()


# Ray's agent forgets a gauge two export intervals after its last set: a value set once per
# epoch would show in Prometheus for seconds after each epoch and be gone for the rest of it.
# The last epoch's values are set again every half interval while the worker lives.
_epoch_gauges: dict[str, dict] = {}
_epoch_gauges_lock = threading.Lock()
_epoch_gauges_kept = False


def _set_epoch_gauges() -> None:
    metrics = _worker_metrics()
    with _epoch_gauges_lock:
        for run, values in _epoch_gauges.items():
            for name, value in values.items():
                metrics[name].set(value, tags={"run": run})


def _keep_epoch_gauges() -> None:
    # the interval at which a worker exports its metrics to the node's agent (Ray's system
    # config, from the environment the raylet gave the worker; Ray floors it at 1 s)
    interval_s = max(float(os.environ.get("RAY_metrics_report_interval_ms", 10_000)), 1000) / 1000
    while True:
        time.sleep(interval_s / 2)
        _set_epoch_gauges()


# ---------------------------------------------------------------- workers -> driver

class ProgressBoard:
    """Where training's rank-0 worker posts its progress (steps within the epoch, finished
    epochs) and the driver collects it: a zero-CPU Ray actor (`board()`), because the driver
    waits on Ray Train and sees nothing else until it returns. The driver also posts here how
    many torch threads each worker should run (cv: folds still training take the cores of
    folds that finished); workers read it every epoch."""

    def __init__(self):
        self.events: list[dict] = []
        self.threads_per_worker: int | None = None

    def post(self, event: dict) -> None:
        self.events.append(event)

    def take(self) -> list[dict]:
        events, self.events = self.events, []
        return events

    def set_threads(self, threads: int) -> None:
        self.threads_per_worker = threads

    def threads(self) -> int | None:
        return self.threads_per_worker


def board():
    """On the driver's node: a zero-CPU actor may land anywhere, and a lost node must not
    take the driver's view of a healthy run with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(ProgressBoard).remote()


def _take(board) -> list[dict]:
    """The board's events; none if it cannot be reached (progress is best effort, the
    work's own outcome is what counts)."""
    import ray

    try:
        return ray.get(board.take.remote(), timeout=30)
    except (ray.exceptions.RayError, TimeoutError):
        return []


WATCH_EVERY_S = 2.0


def run_watched(work, board, on_events, every: float = WATCH_EVERY_S):
    """`work()` in a thread while the main thread hands the board's events to `on_events`
    every few seconds; returns what work returned or raises what it raised.

    The main thread stays free, so the job's gauges move while work runs and a signal lands
    where the driver can act on it (the thread is a daemon: a stopped job does not wait).
    """
    import threading

    outcome: dict = {}

    def target():
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the main thread, raised there
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="raythyroid-work", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(every)
        on_events(_take(board))
    on_events(_take(board))
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# ---------------------------------------------------------------- driver side (prometheus_client)

class JobProgress:
    """Progress of one job run on the driver, served over HTTP when a port is given.

    `raythyroid_job_last_progress_timestamp_seconds` moves whenever work completes, which is
    what the stalled-job alert watches.
    """

    def __init__(self, pipeline: str, run: str, port: int | None = None, unit: str = "inputs"):
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.pipeline, self.run, self.unit = pipeline, run, unit
        # a time-limited run ends at its deadline, whatever the count of work says
        self.deadline: float | None = None
        self.baseline = 0  # work done by earlier runs of a resumed job: not this run's rate
        # no cadence measured yet (training before its first epoch ends): the total and the
        # ETA would be guesses, so neither is shown
        self.estimating = False
        self.registry = CollectorRegistry()
        labels = ("pipeline", "run")

        def gauge(name, doc, extra=()):
            return Gauge(f"{PREFIX}_job_{name}", doc, labels + extra, registry=self.registry)

        self._total = gauge("total_inputs", "Inputs this run has to process")
        self._done = gauge("done_inputs", "Inputs processed so far (including errors)")
        self._errors = gauge("errors", "Inputs that ended as error rows")
        self._skipped = gauge("skipped", "Inputs skipped as not images (not errors)")
        self._rate = gauge("rate", "Inputs per second since the run started")
        self._eta = gauge("eta_seconds", "Estimated seconds to completion")
        self._state = gauge("state", "1 for the run's current state", ("state",))
        self._last = gauge("last_progress_timestamp_seconds",
                           "Unix time of the last completed work")
        self._start = gauge("start_timestamp_seconds", "Unix time the run started")
        self.started = time.time()
        self.done = self.errors = self.skipped = 0
        self.total = 0
        self._start.labels(pipeline, run).set(self.started)
        self._last.labels(pipeline, run).set(self.started)
        self.set_state("running")
        self.server = None
        if port is not None:
            self.server, _ = start_http_server(port, addr="0.0.0.0", registry=self.registry)

    def set_total(self, total: int) -> None:
        self.total = total
        self._total.labels(self.pipeline, self.run).set(total)
        self._publish()

    def reach(self, done: int, total: int | None = None) -> None:
        """Set the work done so far (and the total, when it is only now known)."""
        if total is not None:
            self.total = total
            self._total.labels(self.pipeline, self.run).set(total)
        self.advance(max(0, done - self.done))

    def touch(self) -> None:
        """Work is going on though nothing new completed (a validation pass, a restarted
        worker catching up): what keeps the stalled-job alert quiet on a healthy run."""
        self._last.labels(self.pipeline, self.run).set(time.time())

    def advance(self, done: int, errors: int = 0, skipped: int = 0) -> None:
        self.done += done
        self.errors += errors
        self.skipped += skipped
        if done:
            self._last.labels(self.pipeline, self.run).set(time.time())
        self._publish()

    @property
    def rate(self) -> float:
        return max(0, self.done - self.baseline) / max(time.time() - self.started, 1e-9)

    @property
    def eta_seconds(self) -> float | None:
        left = None if self.deadline is None else max(0.0, self.deadline - time.time())
        if self.estimating:
            return None
        if self.rate <= 0 or not self.total:
            return left
        by_rate = max(0.0, self.total - self.done) / self.rate
        return by_rate if left is None else min(by_rate, left)

    def _publish(self) -> None:
        labels = (self.pipeline, self.run)
        self._done.labels(*labels).set(self.done)
        self._errors.labels(*labels).set(self.errors)
        self._skipped.labels(*labels).set(self.skipped)
        self._rate.labels(*labels).set(self.rate)
        eta = self.eta_seconds
        self._eta.labels(*labels).set(eta if eta is not None else float("nan"))

    def line(self) -> str:
        if self.estimating:
            return f"{self.done} {self.unit}  {self.rate:.1f}/s  ETA estimating"
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        eta = self.eta_seconds
        eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta is not None else "?"
        errors = f"  errors {self.errors}" if self.unit == "inputs" or self.errors else ""
        return (f"{self.done}/{self.total} {self.unit} ({frac:.0%})  {self.rate:.1f}/s  "
                f"ETA {eta_text}{errors}" + (f"  skipped {self.skipped}" if self.skipped else ""))

    def set_state(self, state: str) -> None:
        for name in STATES:
            self._state.labels(self.pipeline, self.run, name).set(1.0 if name == state else 0.0)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@contextlib.contextmanager
def tracked(pipeline: str, run: str, port: int | None, total: int,
            unit: str = "inputs") -> Iterator[JobProgress]:
    """A JobProgress for the body of a job: `succeeded` when it returns, `interrupted` when a
    signal stopped it (what it had done is noted for the command's last line), `failed` when
    it raises, and its HTTP server closed either way."""
    from . import stopping

    progress = JobProgress(pipeline, run, port, unit)
    progress.set_total(total)
    try:
        yield progress
        progress.set_state("succeeded")
    except BaseException:
        # a stop may surface as KeyboardInterrupt or as what a Ray call raised on the way out
        if stopping.state.signal is not None:
            progress.set_state("interrupted")
            stopping.note_progress(pipeline, progress.done, progress.total, unit)
        else:
            progress.set_state("failed")
        raise
    finally:
        progress.close()


class ProgressPrinter:
    """A bar on a terminal, else a line every `interval` seconds, for a JobProgress."""

    def __init__(self, progress: JobProgress, log, interval: float = 5.0):
        self.progress, self.log, self.interval = progress, log, interval
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def say(self, text: str) -> None:
        """A line of its own (an epoch's result) above the bar."""
        if self.tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        self.log(text)
        if self.tty:
            self.update(force=True)

    def update(self, force: bool = False) -> None:
        now = time.time()
        finished = self.progress.done >= self.progress.total
        if not force and not finished and now - self.last < self.interval:
            return
        self.last = now
        name = self.progress.pipeline
        if self.tty:
            frac = min(1.0, self.progress.done / self.progress.total) if self.progress.total \
                else 1.0
            bar = "#" * int(frac * 30)
            print(f"\r{name} [{bar:<30}] {self.progress.line()}", end="\n" if finished else "",
                  file=sys.stderr, flush=True)
        else:
            self.log(f"{name}: {self.progress.line()}")
