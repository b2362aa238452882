"""Who owns an infer OUTPUT and what it holds: the job it was begun for (_JOB.json, read with
every older release's keys), the model versions whose rows it holds, the run lease only the
current run's tasks commit under, the sources already committed (and those to do again), and
the summary counted from the union of every results file (each key in one file only, each
source from one model version: compact_results)."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pyarrow as pa

from . import metrics, postprocess, results, storage, telemetry
from .errors import UserError


RUN_LEASE = "_RUN"  # id of the run that owns OUTPUT; only its tasks may commit results


def done_sources(output: str) -> set[str]:
    """Sources already committed by a results file."""
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


# _JOB.json of an OUTPUT begun by an older release. Releases with the zoomed-out view wrote
# tta_zoom whenever it applied, all but the first; missing reads as none (an OUTPUT of that
# first one is refused: it cannot be told from one begun before the view). They wrote none of
# JOB_KEYS_OLDER_VERSIONS_LACK: those are unknown there and not checked.
JOB_KEYS_OLDER_VERSIONS_IMPLIED = {"tta_zoom": 0.0}

JOB_KEYS_OLDER_VERSIONS_LACK = ("weights", "tta", "postprocess")

JOB_KEYS_OF_THE_MODEL = ("weights", "tta_zoom", "postprocess")  # no flag of this run sets them

# what a new model version brings with it: its identity and the inference it chose (TTA
# included: a run without --tta/--no-tta applies the version's own choice)
KEYS_OF_A_VERSION = ("model", "weights", "tta", "tta_zoom", "postprocess")

# what OUTPUT records of the versions it holds, beside the job: `version`, the last run's;
# `versions`, each with its weights, by last run (the last run's last); `unversioned`, the one
# that made the rows written before rows named their version
VERSION_RECORD_KEYS = ("version", "versions", "unversioned")


@dataclass(frozen=True)
class Versions:
    """The model versions of OUTPUT as a run claims it."""

    current: str  # this run's: every row it commits names it (results.version_label)
    previous: str | None  # the last run's (None: a new OUTPUT)
    record: dict  # _JOB.json as this run leaves it (begin writes it)


def claim_output(output: str, job: dict, new_version: bool = False) -> Versions:
    """A rerun resumes only the job that OUTPUT holds: keys of another input could collide
    with committed ones and mix two archives in one results table, and another inference would
    give other masks for the keys committed. Another model goes on with the same job as a new
    model version (each row names the one that made it) when it is another version of the
    same registered or bundled model as one OUTPUT holds, a version it holds already (a
    rollback), or when `new_version` says so (a model folder replaced); any other model is a
    mistake and refused. A new OUTPUT's record is written here; a held one's only in `begin`,
    once the run holds the lease."""
    label = results.version_label(job)
    held = results.read_job(output)
    if held is None:
        record = dict(job, version=label, versions=[_entry(job)])
        storage.write_text(storage.join(output, results.JOB_FILE), json.dumps(record, indent=2))
        return Versions(current=label, previous=None, record=record)
    held = {**JOB_KEYS_OLDER_VERSIONS_IMPLIED, **held}
    if "postprocess" in held:  # a setting added later reads as its default
        held["postprocess"] = {**postprocess.PostConfig().to_dict(), **held["postprocess"]}
    known = held.get("versions") or [_entry(held)]
    held_label = held.get("version") or results.version_label(held)
    # the same label is the same version: what differs then is no new version's choice
    new_label = label != held_label
    another_version = _compare(output, held, job, new_label, new_label and (new_version or any(
        _same_lineage(seen.get("model"), job.get("model"))
        or (seen["version"], seen.get("weights")) == (label, job.get("weights"))
        for seen in known)))
    previous = held_label if another_version else label
    for seen in known:
        if seen["version"] == label and seen.get("weights") not in (None, job.get("weights")):
            raise UserError(f"{output} holds rows of model version {label} made with other "
                            f"weights ({seen['weights']}, {job.get('weights')} in this run): "
                            f"another registry under the same name? Use a new OUTPUT")
    record = dict(job, version=label,
                  versions=[v for v in known if v["version"] != label]
                  + [_entry(job)])
    unversioned = held.get("unversioned") if "version" in held else previous
    if unversioned:
        record["unversioned"] = unversioned
    return Versions(current=label, previous=previous, record=record)


def _entry(job: dict) -> dict:
    """A model version as OUTPUT's record lists it."""
    return {"version": results.version_label(job), "model": job.get("model"),
            "weights": job.get("weights")}


def _compare(output: str, held: dict, job: dict, new_label: bool, taken: bool) -> bool:
    """Whether `job` is held's job with another model version (one of `new_label`, `taken` as
    such); refuses any other change."""
    changed = [name for name in [*job, *(n for n in held if n not in job)]
               if name not in VERSION_RECORD_KEYS and held.get(name) != job.get(name)
               and (name in held or name not in JOB_KEYS_OLDER_VERSIONS_LACK)]
    if not changed:
        return False
    another_model = "model" in changed or "weights" in changed
    fixed = [n for n in changed if n not in KEYS_OF_A_VERSION] if another_model else changed
    name = (fixed or changed)[0]
    if fixed or not taken:
        why = ("the model has changed since this OUTPUT began" if name in JOB_KEYS_OF_THE_MODEL
               else "to resume, give the same INPUT, MODEL, --labels, --fast, TTA flag and "
                    "--precision int8 or not")
        if another_model and new_label and not fixed:
            why += ("; if MODEL is a new version of the model there, --new-version goes on "
                    "with it (each row names its version)")
        raise UserError(f"{output} holds the results of another job ({name}: "
                        f"{json.dumps(held.get(name))} there, {json.dumps(job.get(name))} in "
                        f"this run); {why}, else use a new OUTPUT")
    return True


def _same_lineage(held: str | None, model: str | None) -> bool:
    """Two versions of one model by construction: models:/NAME/N and models:/NAME/M, or the
    bundled model of one name in two releases. A folder's weights may be replaced by anyone
    (a retrain into the same RUN): only --new-version says that is a new version."""
    def lineage(uri: str | None) -> str | None:
        uri = str(uri or "")
        if uri.startswith(results.REGISTRY_PREFIX):
            return uri.rsplit("/", 1)[0]
        return uri if uri and "/" not in uri and "\\" not in uri else None  # a bundled name

    return lineage(held) is not None and lineage(held) == lineage(model)


def begin(output: str, versions: Versions) -> None:
    """Under the lease: OUTPUT's record names this run's version. When the last run's was
    another, that run may have stopped between committing a source it redid and compacting:
    compacted first, the record still naming that version the latest, its rows stay."""
    if versions.previous is not None and versions.previous != versions.current:
        compact_results(output)
    if results.read_job(output) != versions.record:
        storage.write_text(storage.join(output, results.JOB_FILE),
                           json.dumps(versions.record, indent=2))


@dataclass(frozen=True)
class Work:
    """What a run skips and what it does again, beyond what INPUT lists that is not done."""

    done: set[str]  # sources committed for good: skipped
    redo: pa.Table  # (key, source_uri) of committed sources to segment again (SOURCES_SCHEMA)
    notes: list[str]  # REDOING notes read: settled (deleted) once this run has finished

    @property
    def redoing(self) -> bool:
        """Whether this run rewrites the masks of committed sources (and so notes its blocks)."""
        return self.redo.num_rows > 0


def plan_work(output: str, current: str, redo_older: bool) -> Work:
    """Committed sources are done, except those a block began to redo and never committed (its
    masks may be newer than their rows) and, with `redo_older`, those another model version
    made. Both are redone from the source each row names, whether or not INPUT lists them
    tonight (a PACS query of the last day lists only the last day)."""
    import pyarrow.compute as pc

    rows = results.read_results(output, ["key", "source_uri", "frame", "model_version"])
    unsettled, notes = results.read_redoing(output)
    redo = pc.is_in(rows.column("source_uri"),
                    value_set=unsettled.column("source_uri").combine_chunks())
    if redo_older:
        made_by = results.row_versions(results.read_job(output), rows.column("model_version"))
        mine = rows.filter(pc.equal(made_by, current)).column("source_uri").combine_chunks()
        redo = pc.or_(redo, pc.invert(pc.is_in(rows.column("source_uri"), value_set=mine)))
    again = rows.filter(redo)
    # a source's input key: its frames' keys are KEY#N (with a frame number)
    keys = [key if frame is None else key.rsplit("#", 1)[0] for key, frame in
            zip(again.column("key").to_pylist(), again.column("frame").to_pylist())]
    both = pa.concat_tables([
        pa.table({"key": pa.array(keys, pa.string()),
                  "source_uri": again.column("source_uri").combine_chunks()}), unsettled])
    one_each = both.group_by("source_uri").aggregate([("key", "min")])
    redo_rows = pa.table({"key": one_each.column("key_min"),
                          "source_uri": one_each.column("source_uri")})
    done = set(rows.column("source_uri").to_pylist()) - set(
        redo_rows.column("source_uri").to_pylist())
    return Work(done=done, redo=redo_rows, notes=notes)


def settle(work: Work) -> None:
    """The REDOING notes a finished run has redone every source of."""
    for uri in work.notes:
        storage.delete(uri)


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
    versions: dict[str, int] | None = None  # rows by the model version that made them

    @property
    def error_rate(self) -> float:
        return self.errors / max(self.rows - self.skipped, 1)

    @property
    def too_many_errors(self) -> bool:
        return self.max_error_rate is not None and self.error_rate > self.max_error_rate


def summarize(output: str, table: pa.Table, problems: list[dict], labelled: bool
              ) -> InferSummary:
    """Counts and (with labels) metrics from every results file: the union, never a cache;
    metrics.json pools them all and splits them by model version (`by_version`). Columns all
    the way (pyarrow compute): a million rows take seconds, not a dict each."""
    import pyarrow.compute as pc

    compact_results(output)
    rows = results.read_results(output, ["source_uri", "status", "error", "nodule", "seg_uid",
                                         "tp", "fp", "fn", "tn", "model_version"])
    expected = pa.concat_arrays([table.column("source_uri").combine_chunks().cast(pa.string()),
                                 pa.array([p["source_uri"] for p in problems], pa.string())])
    present = pc.is_in(expected, value_set=pc.unique(rows.column("source_uri")))
    missing = expected.filter(pc.invert(present))
    if len(missing):
        raise RuntimeError(f"{len(missing)} inputs have no results row, e.g. {missing[0]}")
    job = results.read_job(output) or {}
    made_by = results.row_versions(job, rows.column("model_version"))
    order = [v["version"] for v in job.get("versions") or []]
    versions = {label: int(pc.sum(pc.equal(made_by, label)).as_py() or 0)
                for label in dict.fromkeys(order + pc.unique(made_by).to_pylist())}
    versions = {label: count for label, count in versions.items() if count}
    status = rows.column("status")
    errors = rows.filter(pc.equal(status, "error"))
    skipped = rows.filter(pc.equal(status, "skipped"))
    scored = {}
    if labelled:
        pooled, scored_frames = _scores(rows)
        pooled["by_version"] = {label: _scores(rows.filter(pc.equal(made_by, label)))[0]
                                if len(versions) > 1 else dict(pooled) for label in versions}
        storage.write_text(storage.join(output, results.METRICS), json.dumps(pooled, indent=2))
        scored = {"metrics": pooled, "unlabelled": int(pc.sum(pc.equal(status, "ok")).as_py()
                                                       or 0) - scored_frames}
    return InferSummary(rows=rows.num_rows, errors=errors.num_rows, skipped=skipped.num_rows,
                        nodules=int(pc.sum(rows.column("nodule")).as_py() or 0),
                        error_reasons=_reason_classes(_count_reasons(errors)),
                        skip_reasons=_count_reasons(skipped),
                        dicom_seg=pc.count_distinct(rows.column("seg_uid")).as_py(),
                        versions=versions, **scored)


def _scores(rows: pa.Table) -> tuple[dict, int]:
    """metrics.summarize over the labelled ok rows (and the error and skip counts); the number
    of frames scored."""
    import pyarrow.compute as pc

    status = rows.column("status")
    labelled = rows.filter(pc.and_(pc.equal(status, "ok"), pc.is_valid(rows.column("tp"))))
    return metrics.summarize(*(labelled.column(c).to_numpy() for c in ("tp", "fp", "fn", "tn")),
                             errors=int(pc.sum(pc.equal(status, "error")).as_py() or 0),
                             skipped=int(pc.sum(pc.equal(status, "skipped")).as_py() or 0)
                             ), labelled.num_rows


def compact_results(output: str) -> int:
    """Make every key appear in one results file only, and every source's rows come from one
    model version; returns the rows removed.

    A task that outlived a killed driver can commit a block moments after a rerun read what was
    done, and the rerun then commits the same sources again. Both rows are identical (the same
    input, model and code), so the later copy (by file name) is dropped. A source another model
    version redid keeps the rows of the version that ran last (_JOB.json's `versions` order):
    the masks on disk are its, as it wrote them last; a redo that could not read the source
    again does not replace rows that could. Atomically, file by file. Finding copies reads
    only the key and version columns while OUTPUT holds one version; only files holding a
    row to drop are rewritten.
    """
    import pyarrow.compute as pc

    job = results.read_job(output) or {}
    located = results.read_results(output, ["key", "model_version"], with_files=True)
    dropped: dict[str, set[str]] = {}  # file -> keys it holds a row to drop of
    if pc.count_distinct(results.row_versions(job, located.column("model_version"))).as_py() > 1:
        located = results.read_results(output, ["key", "source_uri", "error", "model_version"],
                                       with_files=True)
        superseded = _superseded(located, job)
        for row in located.filter(superseded).select(["key", "__filename"]).to_pylist():
            dropped.setdefault(row["__filename"], set()).add(row["key"])
        located = located.filter(pc.invert(superseded))
    counted = located.group_by("key").aggregate([("key", "count")])
    repeated = counted.filter(pc.greater(counted.column("key_count"), 1)).column("key")
    if len(repeated):
        copies = located.filter(pc.is_in(located.column("key"), value_set=repeated))
        first: dict[str, str] = {}
        for row in sorted(copies.select(["key", "__filename"]).to_pylist(),
                          key=lambda r: r["__filename"]):
            if first.setdefault(row["key"], row["__filename"]) != row["__filename"]:
                dropped.setdefault(row["__filename"], set()).add(row["key"])
    if not dropped:
        return 0  # the usual case, decided on a hash table of the keys alone
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


def _superseded(located: pa.Table, job: dict):
    """The rows of a source that a version run later also made rows of. A version ranks by its
    last run (the `versions` order); a row saying the source could not be read ranks under
    every row that could, so a redo finding the source gone keeps the older rows."""
    import pyarrow.compute as pc

    order = pa.array([v["version"] for v in job.get("versions") or []], pa.string())
    made_by = results.row_versions(job, located.column("model_version"))
    rank = pc.fill_null(pc.index_in(made_by, value_set=order), -1)
    unread = pc.fill_null(pc.starts_with(located.column("error"), "cannot read"), False)
    rank = pc.if_else(unread, pc.subtract(rank, len(order) + 1), rank)
    ranked = pa.table({"source_uri": located.column("source_uri"), "rank": rank})
    best = ranked.group_by("source_uri").aggregate([("rank", "max")])
    joined = ranked.append_column("row", pa.array(range(ranked.num_rows), pa.int64())).join(
        best, "source_uri").sort_by("row")
    return pc.less(joined.column("rank"), joined.column("rank_max"))


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
