"""The preprocess job: layout rows -> prepared pairs -> dedupe + case split -> Parquet shards.

OUTPUT gets train/ val/ test/ shards, errors.parquet and, last, manifest.json. The manifest lists
the shards it vouches for, so a reader never takes a half-written output, or stray files from an
earlier run, for the dataset.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from . import dicomweb, imaging, layouts, shards, split, storage, telemetry
from .errors import UserError
from .imaging import DecodeError, PrepConfig, SkipInput

FILES_PER_TASK = 32  # one Ray task reads and prepares this many pairs: never a task per file
READ_THREADS = 8  # object-store reads are latency-bound; overlap them within a task

GEOMETRY_TYPE = pa.struct([(name, pa.int32()) for name in
                           ("height", "width", "x", "y", "w", "h", "size")])
PREPARED_SCHEMA = pa.schema([
    ("key", pa.string()), ("case_id", pa.string()), ("fixed_split", pa.string()),
    ("source_uri", pa.string()), ("sha256", pa.string()),
    ("image", pa.binary()), ("mask", pa.binary()), ("full_mask", pa.binary()),
    ("geometry", GEOMETRY_TYPE),
    ("nodule_pixels", pa.int64()), ("nodule_kept", pa.float32()),
    ("error_stage", pa.string()), ("error_reason", pa.string()),
])
SHARD_COLUMNS = ["key", "case_id", "split", "image", "mask", "full_mask", "geometry", "source_uri",
                 "sha256"]
ERROR_SCHEMA = pa.schema([("key", pa.string()), ("source_uri", pa.string()),
                          ("stage", pa.string()), ("reason", pa.string())])


class StageError(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage, self.reason = stage, reason


# a PACS down or refusing our credentials stops the run (exit 75 or 2), as it stops infer's:
# the rerun does it all, where error rows would have left those pairs out unnoticed
STOPS_THE_RUN = (dicomweb.Unreachable, UserError)


def _fetch(uri: str, stage: str) -> bytes:
    try:
        data = dicomweb.retrieve(uri) if dicomweb.is_dicomweb(uri) else storage.read_bytes(uri)
    except STOPS_THE_RUN:
        raise
    except dicomweb.RetrieveError as exc:
        raise StageError(stage, f"cannot read: {exc}") from None
    except Exception as exc:
        raise StageError(stage, f"cannot read: {storage.describe_error(exc)}") from None
    telemetry.count("bytes", len(data), pipeline="preprocess")
    return data


class Source:
    """One image file as the rows of a block use it: read and opened once, however many of its
    frames (a cine's) are annotated, with the mask files those rows name (a SEG holds many)."""

    def __init__(self, uri: str, max_pixels: int):
        self.uri, self.max_pixels = uri, max_pixels
        self.data = self.frames = None
        self._failure: StageError | None = None
        self._masks: dict[str, object] = {}

    def open(self):
        """(bytes, frames); the same StageError for every row when the file cannot be used."""
        if self.frames is None and self._failure is None:
            try:
                self.data = _fetch(self.uri, "read")
                self.frames = imaging.open_frames(self.data, self.max_pixels)
            except StageError as exc:
                self._failure = exc
            except SkipInput as exc:
                self._failure = StageError("skipped", str(exc))
            except DecodeError as exc:
                self._failure = StageError("decode", str(exc))
        if self._failure is not None:
            raise self._failure
        return self.data, self.frames

    def mask(self, uri: str, seg_frame: int | None) -> np.ndarray:
        """A mask file decoded, or one frame of a DICOM SEG (the SEG parsed once)."""
        from .dicom import read as dicom_read, seg_read

        if uri not in self._masks:
            data = _fetch(uri, "mask")
            self._masks[uri] = dicom_read.read_dataset(data) if seg_frame else data
        if seg_frame:
            return seg_read.seg_mask(self._masks[uri], seg_frame)
        return imaging.decode_mask(self._masks[uri], self.max_pixels)


def prepare_pair(row: dict, config: PrepConfig, max_pixels: int,
                 source: Source | None = None) -> dict:
    """One layout row -> one prepared row, or raise StageError with the reason."""
    source = source or Source(row["image_uri"], max_pixels)
    data, frames = source.open()
    try:
        if frames.count > 1 and not row.get("frame"):
            raise DecodeError(f"multi-frame image ({frames.count} frames): name its masks "
                              f"<name>#<frame>, or annotate it with DICOM SEG (--layout dicom)")
        if (row.get("frame") or 1) > frames.count:
            raise StageError("mask", f"the mask is of frame {row['frame']}, the image has "
                                     f"{frames.count} frame(s)")
        frame = frames.frame((row.get("frame") or 1) - 1)
    except DecodeError as exc:
        raise StageError("decode", str(exc)) from None
    height, width = frame.shape[:2]
    if row.get("mask_polygons") is not None:
        mask = imaging.fill_polygons(json.loads(row["mask_polygons"]), height, width)
    else:
        try:
            mask = source.mask(row["mask_uri"], row.get("mask_frame"))
        except DecodeError as exc:
            raise StageError("mask", str(exc)) from None
        if mask.shape != (height, width):
            raise StageError("mask", f"mask is {mask.shape[1]}x{mask.shape[0]}, "
                                     f"image is {width}x{height}")
    image, geometry = imaging.prepare(frame, config)
    nodule_pixels = int(mask.sum())
    kept = mask[geometry.y:geometry.y + geometry.h, geometry.x:geometry.x + geometry.w].sum()
    prepared = {
        # DICOM: the frame's pixels, so one image filed twice (another container, other
        # headers) is found as a duplicate; other files: the bytes, as published
        "sha256": split.content_hash(data if isinstance(frames, imaging.RasterFrames)
                                     else frame.tobytes()),
        "image": imaging.encode_png(image),
        "mask": imaging.encode_png(geometry.to_model(mask)),
        # the label in the frame's own geometry: validation scores there, as infer does
        "full_mask": imaging.encode_png(mask.astype(np.uint8)),
        "geometry": geometry.to_dict(),
        "nodule_pixels": nodule_pixels,
        "nodule_kept": float(kept / nodule_pixels) if nodule_pixels else 1.0,
    }
    if frames.case_id:  # DICOM: the case is the patient, never the file name
        prepared["case_id"] = frames.case_id
    return prepared


def _prepare_row(row: dict, config: PrepConfig, max_pixels: int, source: Source) -> dict:
    out = {"key": row["key"], "case_id": row["case_id"], "fixed_split": row.get("split"),
           "source_uri": row["image_uri"]}
    try:
        out.update(prepare_pair(row, config, max_pixels, source))
        telemetry.count("prepared", pipeline="preprocess")
    except StageError as exc:
        out.update(error_stage=exc.stage, error_reason=exc.reason)
    except STOPS_THE_RUN:
        raise
    except Exception as exc:  # a bug or an exotic file must not take the block down
        out.update(error_stage="prepare", error_reason=storage.describe_error(exc))
    if out.get("error_stage") == "skipped":
        telemetry.skipped(out["error_reason"], pipeline="preprocess")
    elif out.get("error_stage"):
        telemetry.failed(out["error_stage"], out["error_reason"], pipeline="preprocess")
    return out


def prepare_block(batch: pa.Table, config: dict, max_pixels: int) -> pa.Table:
    """Ray Data UDF over a block of layout rows; failures become rows, never a failed task.

    Rows of one image file (a cine's annotated frames) share one Source, handled by one
    thread in row order; files are spread over threads, which overlap the object-store reads
    (OpenCV releases the GIL while decoding).
    """
    prep = PrepConfig.from_dict(config)
    rows = batch.to_pylist()
    telemetry.count("read", len(rows), pipeline="preprocess")
    by_source: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_source.setdefault(row["image_uri"], []).append(index)
    results: list[dict | None] = [None] * len(rows)

    def prepare_source(indices: list[int]) -> None:
        source = Source(rows[indices[0]]["image_uri"], max_pixels)
        for index in indices:
            results[index] = _prepare_row(rows[index], prep, max_pixels, source)

    with telemetry.timed("prepare", pipeline="preprocess"), \
            ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(by_source)))) as pool:
        list(pool.map(prepare_source, by_source.values()))
    return pa.Table.from_pylist(results, schema=PREPARED_SCHEMA)


def _select_split(batch: pa.Table, keys: set[str], name: str) -> pa.Table:
    mask = np.fromiter((k in keys for k in batch.column("key").to_pylist()), bool, batch.num_rows)
    chosen = batch.filter(pa.array(mask))
    chosen = chosen.append_column("split", pa.array([name] * chosen.num_rows, pa.string()))
    return chosen.select(SHARD_COLUMNS)


def _package_versions() -> dict:
    versions = {}
    for name in ("raythyroid", "ray", "numpy", "opencv-python-headless", "pyarrow", "pillow"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def clear_output(output: str) -> None:
    """A rerun replaces the previous output; the manifest goes first so nothing half-replaced
    is ever vouched for."""
    storage.delete(storage.join(output, shards.MANIFEST))
    storage.delete(storage.join(output, shards.ERRORS))
    for name in split.SPLITS:
        storage.delete_tree(storage.join(output, name))


@dataclass(frozen=True)
class Job:
    """One preprocess run as the driver settled it: where from, where to, and how."""

    input_uri: str
    output: str
    layout: str  # as scanned (auto resolved)
    config: PrepConfig
    fractions: tuple  # train, val, test
    seed: int
    max_pixels: int
    started: float


def run(input_uri: str, output: str, layout: str = "auto", config: PrepConfig = PrepConfig(),
        fractions=(0.7, 0.2, 0.1), seed: int = 0,
        max_pixels: int = imaging.DEFAULT_MAX_PIXELS, log=print,
        scanned: tuple | None = None, metrics_port: int | None = None,
        dicom_rules: layouts.DicomRules = layouts.DicomRules()) -> dict:
    """Run the job on the connected Ray cluster; returns the manifest.

    `scanned` is `layouts.scan`'s result when the caller listed the input already (the CLI does,
    to report layout mistakes before starting Ray).
    """
    started = time.time()
    output = storage.normalize(output)
    if dicomweb.is_dicomweb(input_uri):
        layout, pairs, problems = scanned or scan_pacs(input_uri, layout, dicom_rules, log)
        # the manifest names the server and the filters as written, a patient's hashed
        input_uri = dicomweb.parse(input_uri).identity
    else:
        input_uri = storage.normalize(input_uri)
        layout, pairs, problems = scanned or layouts.scan(input_uri, layout, dicom_rules)
    log(f"preprocess: {len(pairs)} pairs found ({layout} layout), {len(problems)} unpaired files")
    with telemetry.tracked("preprocess", f"{int(started)}", metrics_port,
                           len(pairs) + len(problems)) as progress:
        job = Job(input_uri=input_uri, output=output, layout=layout, config=config,
                  fractions=tuple(fractions), seed=seed, max_pixels=max_pixels, started=started)
        return _run(job, pairs, problems, progress, log)


SEG_HEADER_SCHEMA = pa.schema([("index", pa.int64()), ("key", pa.string()), ("uri", pa.string()),
                               ("header", pa.binary()), ("error", pa.string())])


def scan_pacs(input_uri: str, layout: str, rules: layouts.DicomRules, log=print
              ) -> tuple[str, list[layouts.Pair], list[layouts.Problem]]:
    """A DICOMweb INPUT read as the dicom layout reads a folder: the SEGs of the studies the
    filters match, retrieved by Ray tasks for their headers, paired with the images they
    reference by the same rules (layouts.pair_segs); prepare_block retrieves those images.
    Images no SEG annotates are left out silently: a PACS holds many more than people
    corrected, and each of raythyroid's own SEGs annotates one."""
    layout = layouts.pacs_layout(layout)
    listing = layouts.list_pacs(input_uri)
    log(f"preprocess: {len(listing.segs)} SEG(s) in the {listing.studies} matched stud(ies) "
        f"with a SEG series")
    segs, problems = _seg_headers(listing.segs)
    found = layouts.pair_segs(segs, listing.images, rules, problems, layouts.PACS_WHERE)
    ours_only = len(found.ours - found.annotated)
    if ours_only:
        log(f"preprocess: {ours_only} image(s) annotated only by raythyroid's own SEGs, which "
            f"no person edited: left out (--segs-from any learns from them)")
    if not found.pairs:
        raise UserError(f"no image/SEG pairs found in {dicomweb.safe_uri(input_uri)}: "
                        f"{len(listing.segs)} SEG(s), {ours_only} image(s) annotated only by "
                        f"raythyroid's own")
    return layout, found.pairs, problems


def _seg_headers(segs: list[tuple[str, str]]
                 ) -> tuple[list[layouts.SegHeader], list[layouts.Problem]]:
    """Every SEG (key, URI) retrieved by Ray tasks, its header read back in listing order; an
    error row for each that cannot be read."""
    import ray

    from .dicom import read as dicom_read

    if not segs:
        return [], []
    items = [{"index": i, "key": key, "uri": uri} for i, (key, uri) in enumerate(segs)]
    rows = (ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / FILES_PER_TASK))
            .map_batches(read_seg_headers, batch_size=FILES_PER_TASK, batch_format="pyarrow")
            .take_all())
    headers, problems = [], []
    for row in sorted(rows, key=lambda r: r["index"]):
        if row["error"]:
            problems.append(layouts.Problem(row["key"], row["uri"], row["error"], "mask"))
        else:
            headers.append(layouts.SegHeader(row["key"], row["uri"], dicom_read.read_dataset(
                row["header"], stop_before_pixels=True)))
    return headers, problems


def read_seg_headers(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: SEGs (index, key, uri) retrieved, each kept as its header only (what
    pairing reads: a few kB, however many frames it has) or the reason it cannot be read."""
    from .dicom import read as dicom_read

    def header(row: dict) -> dict:
        try:
            ds = dicom_read.read_dataset(_fetch(row["uri"], "mask"), stop_before_pixels=True)
            return {**row, "header": dicom_read.header_bytes(ds), "error": None}
        except StageError as exc:
            return {**row, "header": None, "error": exc.reason}
        except DecodeError as exc:
            return {**row, "header": None, "error": str(exc)}
        except STOPS_THE_RUN:
            raise
        except Exception as exc:  # a bug or an exotic file must not take the block down
            return {**row, "header": None, "error": storage.describe_error(exc)}

    rows = batch.to_pylist()
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(rows)))) as pool:
        return pa.Table.from_pylist(list(pool.map(header, rows)), schema=SEG_HEADER_SCHEMA)


def _prepare(pairs, config, max_pixels, progress, log):
    """Every pair prepared by Ray tasks -> a dataset held in the object store."""
    import ray

    n_blocks = max(1, math.ceil(len(pairs) / FILES_PER_TASK))
    preparing = (ray.data.from_items([p.to_dict() for p in pairs], override_num_blocks=n_blocks)
                 .map_batches(prepare_block, fn_args=(config.to_dict(), max_pixels),
                              batch_size=FILES_PER_TASK, batch_format="pyarrow"))
    # block by block as they finish, so the job's gauges and progress line move meanwhile;
    # the blocks stay in the object store and make the dataset the splits are written from
    printer = telemetry.ProgressPrinter(progress, log)
    blocks = []
    for bundle in preparing.iter_internal_ref_bundles():
        blocks += bundle.block_refs
        progress.advance(bundle.num_rows() or 0)
        printer.update()
    return ray.data.from_arrow_refs(blocks) if blocks else preparing.materialize()


def _run(job: Job, pairs: list, problems: list, progress, log) -> dict:
    progress.advance(len(problems), len(problems))  # unpaired files: error rows already
    prepared = _prepare(pairs, job.config, job.max_pixels, progress, log)
    summary = prepared.select_columns(
        ["key", "case_id", "fixed_split", "source_uri", "sha256", "nodule_kept",
         "error_stage", "error_reason"]).take_all()

    errors = [p.to_dict() for p in problems]
    good = []
    for row in summary:
        if row["error_stage"]:
            errors.append({"key": row["key"], "source_uri": row["source_uri"],
                           "stage": row["error_stage"], "reason": row["error_reason"]})
        else:
            good.append(row)
    duplicates = split.find_duplicates((r["key"], r["sha256"]) for r in good)
    for row in good:
        if row["key"] in duplicates:
            errors.append({"key": row["key"], "source_uri": row["source_uri"], "stage": "dedupe",
                           "reason": f"duplicate of {duplicates[row['key']]}"})
    kept = [r for r in good if r["key"] not in duplicates]
    progress.advance(0, len(summary) - len(kept))
    assignment = split.assign(((r["key"], r["case_id"], r["fixed_split"]) for r in kept),
                              job.fractions, job.seed)

    clear_output(job.output)
    fs, _ = storage.filesystem(job.output)
    shard_files, counts, cases = {}, {}, {}
    for name in split.SPLITS:
        keys = {k for k, s in assignment.items() if s == name}
        counts[name] = len(keys)
        cases[name] = len({r["case_id"] for r in kept if r["key"] in keys})
        shard_files[name] = []
        if not keys:
            continue
        target = storage.join(job.output, name)
        storage.make_dirs(target)
        (prepared.map_batches(_select_split, fn_args=(keys, name), batch_format="pyarrow",
                              batch_size=None)
         .write_parquet(storage.filesystem(target)[1], filesystem=fs, min_rows_per_file=1000))
        shard_files[name] = sorted(storage.relative(u, job.output)
                              for u in storage.list_files(target, (".parquet",)))

    errors.sort(key=lambda e: split.natural_key(e["key"]))
    storage.write_parquet(storage.join(job.output, shards.ERRORS),
                          pa.Table.from_pylist(errors, schema=ERROR_SCHEMA))
    manifest = {
        "format": "raythyroid-preprocess/2",  # 2: shards carry full_mask
        "input": job.input_uri,
        "layout": job.layout,
        "prep": job.config.to_dict(),
        "split": {"fractions": list(job.fractions), "seed": job.seed, "by": "case"},
        "counts": counts,
        "cases": cases,
        "rows": len(kept),
        "errors": sum(1 for e in errors if e["stage"] != "skipped"),
        "skipped": sum(1 for e in errors if e["stage"] == "skipped"),
        "duplicates": len(duplicates),
        "nodule_kept_min": min((r["nodule_kept"] for r in kept), default=1.0),
        "shards": shard_files,
        "packages": _package_versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - job.started, 1),
    }
    storage.write_text(storage.join(job.output, shards.MANIFEST), json.dumps(manifest, indent=2))
    log(f"preprocess: wrote {len(kept)} rows (train {counts['train']}, val {counts['val']}, "
        f"test {counts['test']}) and {len(errors)} error rows ({manifest['skipped']} of them "
        f"skipped non-images) to {job.output} "
        f"in {manifest['seconds']} s")
    return manifest
