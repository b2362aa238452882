"""Who owns an infer OUTPUT and what it holds: the job it was begun for (_JOB.json, read with
every older version's keys), the run lease only the current run's tasks commit under, the
sources already committed, and the summary counted from the union of every results file (each
key in one file only: compact_results)."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pyarrow as pa

from . import metrics, postprocess, results, storage, telemetry
from .errors import UserError


RUN_LEASE = "_RUN"  # id of the run that owns OUTPUT; only its tasks may commit results


def done_sources(output: str) -> set[str]:
    """Sources already committed by a results file; what a rerun skips."""
    return set(results.read_results(output, ["source_uri"]).column("source_uri").to_pylist())


def take_lease(output: str) -> str:
    """A new run's id, written as OUTPUT's lease before it reads what is done: tasks of an
    earlier run that outlived their driver stop committing from now on."""
    run_id = uuid.uuid4().hex
    storage.write_text(storage.join(output, RUN_LEASE), run_id)
    return run_id


def current_run(output: str) -> str | None:
    try:
        return storage.read_text(storage.join(output, RUN_LEASE)).strip()
    except (FileNotFoundError, OSError):
        return None


# _JOB.json of an OUTPUT begun by an older version. Versions with the zoomed-out view wrote
# tta_zoom whenever it applied, all but the first; missing reads as none (an OUTPUT of that
# first one is refused: it cannot be told from one begun before the view). They wrote none of
# JOB_KEYS_OLDER_VERSIONS_LACK: those are unknown there and not checked.
JOB_KEYS_OLDER_VERSIONS_IMPLIED = {"tta_zoom": 0.0}

JOB_KEYS_OLDER_VERSIONS_LACK = ("weights", "tta", "postprocess")

JOB_KEYS_OF_THE_MODEL = ("weights", "tta_zoom", "postprocess")  # no flag of this run sets them


def claim_output(output: str, job: dict) -> None:
    """A rerun resumes only the job that OUTPUT holds: keys of another input could collide
    with committed ones and mix two archives in one results table, and another model or
    inference would give other masks for the keys committed."""
    held = results.read_job(output)
    if held is None:
        storage.write_text(storage.join(output, results.JOB_FILE), json.dumps(job, indent=2))
        return
    held = {**JOB_KEYS_OLDER_VERSIONS_IMPLIED, **held}
    if "postprocess" in held:  # a setting added later reads as its default
        held["postprocess"] = {**postprocess.PostConfig().to_dict(), **held["postprocess"]}
    changed = [name for name in [*job, *(n for n in held if n not in job)]
               if held.get(name) != job.get(name)
               and (name in held or name not in JOB_KEYS_OLDER_VERSIONS_LACK)]
    if changed:
        name = changed[0]
        why = ("the model has changed since this OUTPUT began" if name in JOB_KEYS_OF_THE_MODEL
               else "to resume, give the same INPUT, MODEL, --labels, --fast and TTA flag")
        raise UserError(f"{output} holds the results of another job ({name}: "
                        f"{json.dumps(held.get(name))} there, {json.dumps(job.get(name))} in "
                        f"this run); {why}, else use a new OUTPUT")


@dataclass(frozen=True)
class InferSummary:
    """What an infer run ends with, counted from every results file of OUTPUT."""

    rows: int
    errors: int
    skipped: int  # not images (reports, plans, waveforms): neither failures nor segmented
    nodules: int
    error_reasons: dict[str, int]  # by class (telemetry.reason_class)
    skip_reasons: dict[str, int]
    dicom_seg: int  # SEG objects written
    metrics: dict | None = None  # pooled over the labelled frames (metrics.summarize)
    unlabelled: int | None = None  # frames segmented that --labels had no label for
    report: str | None = None  # the report's index.html, once written
    max_error_rate: float | None = None  # what the run was asked to stay under

    @property
    def error_rate(self) -> float:
        return self.errors / max(self.rows - self.skipped, 1)

    @property
    def too_many_errors(self) -> bool:
        return self.max_error_rate is not None and self.error_rate > self.max_error_rate


def summarize(output: str, table: pa.Table, problems: list[dict], labelled: bool
              ) -> InferSummary:
    """Counts and (with labels) metrics from every results file: the union, never a cache.
    Columns all the way (pyarrow compute): a million rows take seconds, not a dict each."""
    import pyarrow.compute as pc

    compact_results(output)
    rows = results.read_results(output, ["source_uri", "status", "error", "nodule", "seg_uid",
                                    "tp", "fp", "fn", "tn"])
    expected = pa.concat_arrays([table.column("source_uri").combine_chunks().cast(pa.string()),
                                 pa.array([p["source_uri"] for p in problems], pa.string())])
    present = pc.is_in(expected, value_set=pc.unique(rows.column("source_uri")))
    missing = expected.filter(pc.invert(present))
    if len(missing):
        raise RuntimeError(f"{len(missing)} inputs have no results row, e.g. {missing[0]}")
    status = rows.column("status")
    errors = rows.filter(pc.equal(status, "error"))
    skipped = rows.filter(pc.equal(status, "skipped"))
    scored = {}
    if labelled:
        ok = pc.equal(status, "ok")
        labelled_rows = rows.filter(pc.and_(ok, pc.is_valid(rows.column("tp"))))
        pooled = metrics.summarize(*(labelled_rows.column(c).to_numpy()
                                     for c in ("tp", "fp", "fn", "tn")),
                                   errors=errors.num_rows, skipped=skipped.num_rows)
        storage.write_text(storage.join(output, results.METRICS), json.dumps(pooled, indent=2))
        scored = {"metrics": pooled,
                  "unlabelled": int(pc.sum(ok).as_py() or 0) - labelled_rows.num_rows}
    return InferSummary(rows=rows.num_rows, errors=errors.num_rows, skipped=skipped.num_rows,
                        nodules=int(pc.sum(rows.column("nodule")).as_py() or 0),
                        error_reasons=_reason_classes(_count_reasons(errors)),
                        skip_reasons=_count_reasons(skipped),
                        dicom_seg=pc.count_distinct(rows.column("seg_uid")).as_py(), **scored)


def compact_results(output: str) -> int:
    """Make every key appear in one results file only; returns the rows removed.

    A task that outlived a killed driver can commit a block moments after a rerun read what was
    done, and the rerun then commits the same sources again. Both rows are identical (the same
    input, model and code), so the later copy (by file name) is dropped, atomically, file by
    file. Finding them reads only the key column; only files holding a copy are rewritten.
    """
    import pyarrow.compute as pc

    located = results.read_results(output, ["key"], with_files=True)
    counted = located.group_by("key").aggregate([("key", "count")])
    repeated = counted.filter(pc.greater(counted.column("key_count"), 1)).column("key")
    if not len(repeated):
        return 0  # the usual case, decided on a hash table of the keys alone
    copies = located.filter(pc.is_in(located.column("key"), value_set=repeated)).to_pylist()
    dropped: dict[str, set[str]] = {}  # file -> keys it holds a later copy of
    first: dict[str, str] = {}
    for row in sorted(copies, key=lambda r: r["__filename"]):
        if first.setdefault(row["key"], row["__filename"]) != row["__filename"]:
            dropped.setdefault(row["__filename"], set()).add(row["key"])
    folder = storage.join(output, results.RESULTS)
    for path, keys in sorted(dropped.items()):
        uri = storage.join(folder, path.rsplit("/", 1)[-1])
        table = storage.read_parquet(uri)
        kept = table.filter(pc.invert(pc.is_in(table.column("key"),
                                               value_set=pa.array(sorted(keys), pa.string()))))
        if kept.num_rows:
            storage.write_parquet(uri, kept)
        else:
            storage.delete(uri)
    return sum(len(keys) for keys in dropped.values())


def _count_reasons(rows: pa.Table) -> dict[str, int]:
    import pyarrow.compute as pc

    return {item["values"].as_py(): item["counts"].as_py()
            for item in pc.value_counts(rows.column("error"))}


def _reason_classes(reasons: dict[str, int]) -> dict[str, int]:
    classes: dict[str, int] = {}
    for reason, count in reasons.items():
        name = telemetry.reason_class(reason)
        classes[name] = classes.get(name, 0) + count
    return classes
