"""The infer output contract: its folders, the results table, and the review sidecars.

A results file is the commit record of one block of inputs, named after the keys it holds, so a
retried block writes the same name again. Its review sidecar (review/, same name, written just
before it) holds small overlays of the block's frames most worth a person's eye, so the report
never has to read the archive again. Readers here go by columns: a million rows in seconds.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re

import pyarrow as pa

from . import storage

RESULTS = "results"
MASKS = "masks"
REVIEW = "review"
REPORT = "report"
DICOM_SEG = "dicom-seg"
SUCCESS = "_SUCCESS"  # the last run's record, written once every input has a row
JOB_FILE = "_JOB.json"  # the job whose results OUTPUT holds: input, model, labels, inference
METRICS = "metrics.json"
# a block that redoes committed sources writes their (key, source_uri) here before its masks
# and deletes it once its results file is written: a block cut off between the two leaves
# masks newer than its sources' rows, and the next run redoes them (claim.plan_work)
REDOING = "_REDOING"
FILES_PER_READ = 1000

# how the versions before the weights were kept apart wrote a bundled model's "model": its
# name (never a path) and its weights' hash
_OLDER_BUNDLED_MODEL = re.compile(r"([^/\\]+) \(bundled, weights ([0-9a-f]+)\)")

RESULT_SCHEMA = pa.schema([
    ("key", pa.string()), ("source_uri", pa.string()), ("frame", pa.int32()),
    ("status", pa.string()), ("error", pa.string()),
    ("nodule", pa.bool_()), ("n_components", pa.int32()), ("area_px", pa.int64()),
    ("area_mm2", pa.float64()), ("bbox_x", pa.int32()), ("bbox_y", pa.int32()),
    ("bbox_w", pa.int32()), ("bbox_h", pa.int32()), ("aspect_ratio", pa.float64()),
    ("confidence", pa.float64()), ("height", pa.int32()), ("width", pa.int32()),
    ("node_id", pa.string()),
    ("tp", pa.int64()), ("fp", pa.int64()), ("fn", pa.int64()), ("tn", pa.int64()),
    ("iou", pa.float64()), ("dice", pa.float64()),
    # DICOM sources: where the frame is in the archive (UIDs only, never who it shows), and
    # the SOP Instance UID of the SEG written (and stored, with --stow) for it
    ("study_uid", pa.string()), ("series_uid", pa.string()), ("sop_uid", pa.string()),
    ("seg_uid", pa.string()),
    # the model version that made the row (version_label): "NAME/N" for a registry
    # version, else the weights' hash; none in rows written before rows named it
    ("model_version", pa.string()),
])

# one row per frame a block kept for review: its overlay (JPEG) and what orders the queues
REVIEW_SCHEMA = pa.schema([
    ("key", pa.string()), ("confidence", pa.float64()), ("iou", pa.float64()),
    ("area_px", pa.int64()), ("area_mm2", pa.float64()), ("thumbnail", pa.binary()),
])


def block_name(keys, version: str | None = None) -> str:
    """The file name of the block holding these keys: the same block of one model version
    always gets one name, and another version's redo of it another, so the older version's
    rows stay until compaction chooses between them."""
    text = "\n".join(sorted(keys)) + (f"\0{version}" if version else "")
    return f"part-{hashlib.sha256(text.encode()).hexdigest()[:24]}.parquet"


def _version_of(table: pa.Table) -> str | None:
    """The model version a block's rows name (one block is one version's), if they name one."""
    if "model_version" not in table.column_names:
        return None
    return next((v for v in table.column("model_version").to_pylist() if v), None)


def write_results(output: str, table: pa.Table) -> None:
    if table.num_rows:
        storage.write_parquet(storage.join(
            output, RESULTS, block_name(table.column("key").to_pylist(), _version_of(table))),
            table)


def write_review(output: str, block_keys, table: pa.Table, version: str | None = None) -> None:
    """A block's review rows, under the name of the results file that will commit them."""
    if table.num_rows:
        storage.write_parquet(storage.join(output, REVIEW, block_name(block_keys, version)),
                              table)


def read_results(output: str, columns: list[str] | None = None,
                 with_files: bool = False) -> pa.Table:
    """Every results file as one table, read by columns on a thread pool (pyarrow datasets);
    `with_files` adds `__filename`, the file each row came from."""
    return _read(output, RESULTS, RESULT_SCHEMA, columns, with_files)


SOURCES_SCHEMA = pa.schema([("key", pa.string()), ("source_uri", pa.string())])  # infer's inputs


def write_redoing(output: str, block_keys, sources: pa.Table, version: str | None = None
                  ) -> str:
    """A block's note that it is about to rewrite the masks of these sources (REDOING)."""
    uri = storage.join(output, REDOING, block_name(block_keys, version))
    storage.write_parquet(uri, sources)
    return uri


def read_redoing(output: str) -> tuple[pa.Table, list[str]]:
    """Every source some block began to redo and never committed, and the notes saying so."""
    uris = storage.list_files(storage.join(output, REDOING), (".parquet",))
    return _read(output, REDOING, SOURCES_SCHEMA, None, with_files=False), uris


def read_review(output: str, columns: list[str] | None = None) -> pa.Table:
    """Every review row whose results file holds its key (a sidecar whose results file never
    landed was left by a block that failed, and a key another version redid is no longer in
    the file it first came with: either is kept again where it is committed now)."""
    import pyarrow.compute as pc

    wanted = list(columns or REVIEW_SCHEMA.names)
    table = _read(output, REVIEW, REVIEW_SCHEMA, list(dict.fromkeys(wanted + ["key"])),
                  with_files=True)
    committed = read_results(output, ["key"], with_files=True)
    committed = committed.filter(pc.is_in(committed.column("key"),
                                          value_set=table.column("key").combine_chunks()))
    where = {(name.rsplit("/", 1)[-1], key) for name, key in
             zip(committed.column("__filename").to_pylist(), committed.column("key").to_pylist())}
    keep = pa.array([(name.rsplit("/", 1)[-1], key) in where for name, key in
                     zip(table.column("__filename").to_pylist(), table.column("key").to_pylist())],
                    pa.bool_())
    return table.filter(keep).select(wanted)


def read_parts(folder: str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Every Parquet part under `folder` (results-like commit records of another job) as one
    table of `columns`; empty when there are none."""
    parent, name = folder.rstrip("/").rsplit("/", 1)
    return _read(parent, name, schema, columns, with_files=False)


def _read(output: str, folder: str, schema: pa.Schema, columns: list[str] | None,
          with_files: bool) -> pa.Table:
    import pyarrow.dataset as pads

    uris = storage.list_files(storage.join(output, folder), (".parquet",))
    wanted = list(columns or schema.names)
    if not uris:
        empty = pa.schema([schema.field(c) for c in wanted])
        if with_files:
            empty = empty.append(pa.field("__filename", pa.string()))
        return empty.empty_table()
    fs, _ = storage.filesystem(output)
    paths = [storage.filesystem(u)[1] for u in uris]

    def read_files(group: list[str]) -> pa.Table:
        dataset = pads.dataset(group, filesystem=fs, format="parquet", schema=schema)
        return dataset.to_table(
            columns=wanted + (["__filename"] if with_files else [])).combine_chunks()

    def read_group(group: list[str]) -> pa.Table:
        try:
            return read_files(group)
        except Exception as exc:
            if not storage.is_transient(exc):
                raise  # a damaged file fails alike however it is read
            # one file's fault (a body cut off mid-stream, which no SDK retries) fails the whole
            # group: retried as a group, a flaky store fails some file on every attempt
            return pa.concat_tables([
                storage.retry_transient(functools.partial(read_files, [path]))
                for path in group]).combine_chunks()

    # a thousand files at a time, each group made contiguous: one table of 15,000 tiny chunks
    # holds several times its data in per-chunk buffers
    return pa.concat_tables([read_group(paths[i:i + FILES_PER_READ])
                             for i in range(0, len(paths), FILES_PER_READ)])


REGISTRY_PREFIX = "models:/"


def version_label(job: dict) -> str:
    """The model version a job's rows name: NAME/N for a registry version (its `model` is the
    pinned models:/NAME/N), else the weights' hash as `weights` holds it."""
    model = str(job.get("model") or "")
    if model.startswith(REGISTRY_PREFIX):
        return model[len(REGISTRY_PREFIX):]
    return str(job.get("weights") or model)


def row_versions(job: dict | None, column) -> pa.Array:
    """The results column model_version with its nulls read as the version that made them:
    rows written before rows named their version all come from the one model such an OUTPUT
    could hold (_JOB.json's `unversioned`, or its model while it names no version yet)."""
    import pyarrow.compute as pc

    job = job or {}
    unnamed = job.get("unversioned") if "version" in job else version_label(job)
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return pc.fill_null(column, unnamed or "unrecorded")


def read_job(output: str) -> dict | None:
    """OUTPUT's _JOB.json (None if it has none), a bundled model as this version writes it:
    "model" its name, "weights" its hash."""
    uri = storage.join(output, JOB_FILE)
    if not storage.exists(uri):
        return None
    job = json.loads(storage.read_text(uri))
    older = _OLDER_BUNDLED_MODEL.fullmatch(str(job.get("model")))
    if older:
        job["model"] = older.group(1)
        job.setdefault("weights", older.group(2))  # an OUTPUT begun before "weights" was kept
    return job
