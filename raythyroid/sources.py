"""Archive inputs -> prepared frames: what infer (and distill's teacher) read.

    INPUT (folder or prefix, .txt/.parquet manifest, DICOMweb query)
      -> list_inputs: (key, source_uri) rows, paged, keys unique
      -> read_and_prepare: read (threads overlap the reads), decode every frame of every
         format, imaging.prepare; a bad input becomes an error or skipped row, never an
         exception (except a PACS that stops answering: the run stops and resumes later)
"""
from __future__ import annotations

import io
import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import dicomweb, imaging, storage, telemetry
from .dicom import read as dicom_read
from .errors import UserError
from .imaging import DecodeError, PrepConfig, SkipInput

INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", "")
URIS_PER_BLOCK = 64
ROWS_PER_CHUNK = 32  # rows a read task yields at a time, so a long cine loop streams
READ_THREADS = 8
READ_TASK_MEMORY = 256 * 1024 * 1024

# ---------------------------------------------------------------- keys

def _strip_suffix(name: str) -> str:
    stem, ext = posixpath.splitext(name)
    return stem if ext.lower() in INPUT_SUFFIXES and ext else name


# ---------------------------------------------------------------- listing (driver)

def _manifest_uris(uri: str) -> list[str]:
    data = storage.read_bytes(uri)
    if uri.lower().endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        column = "uri" if "uri" in table.column_names else table.column_names[0]
        return [u for u in table.column(column).to_pylist() if u]
    return [line.strip() for line in data.decode("utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _common_root(uris: list[str]) -> str:
    folders = [u.rsplit("/", 1)[0] for u in uris]
    root = posixpath.commonpath(folders) if not any("://" in f for f in folders) else None
    if root is None:  # commonpath would collapse the scheme's '//'
        scheme = folders[0].split("://", 1)[0] + "://"
        rest = posixpath.commonpath([f.split("://", 1)[1] for f in folders])
        root = scheme + rest
    return root


def _list_dicomweb(input_uri: str, log=print) -> tuple[pa.Table, list[dict]]:
    """Every image instance the query finds; key STUDY/SERIES/SOP (hashed when too long).
    Instances the search reports as reports, SEGs (ours among them) or other non-images are
    not retrieved at all: night after night they would only add skipped rows."""
    query = dicomweb.parse(input_uri)
    keys, sources, not_images = [], [], 0
    for instance in dicomweb.search(query):
        if not instance.has_pixels:
            not_images += 1
            continue
        keys.append(storage.safe_key(instance.key))
        sources.append(instance.uri(query))
    if not_images:
        log(f"{not_images} instance(s) in these studies are not images (SEG, SR, ...): "
            f"left out")
    return pa.table({"key": pa.array(keys, pa.string()),
                     "source_uri": pa.array(sources, pa.string())}), []


def list_inputs(input_uri: str, log=print) -> tuple[pa.Table, list[dict]]:
    """INPUT -> table (key, source_uri) of unique keys, plus problem rows for name clashes."""
    if dicomweb.is_dicomweb(input_uri):
        return _list_dicomweb(input_uri, log)
    is_manifest = input_uri.lower().endswith((".txt", ".parquet")) and not storage.is_dir(input_uri)
    if is_manifest:
        uris = [storage.normalize(u) for u in _manifest_uris(input_uri)]
        if not uris:
            raise UserError(f"manifest {input_uri} lists no URIs")
        root = _common_root(uris)
        pages = [uris[i:i + storage.LIST_PAGE_SIZE]
                 for i in range(0, len(uris), storage.LIST_PAGE_SIZE)]
    else:
        root = storage.normalize(input_uri)
        pages = storage.list_pages(root, INPUT_SUFFIXES)
    keys, sources, problems = [], [], []
    seen: dict[str, str] = {}
    for page in pages:
        for uri in page:
            key = storage.safe_key(_strip_suffix(storage.relative(uri, root)))
            if key in seen:
                clash = storage.safe_key(storage.relative(uri, root))
                problems.append({"key": clash, "source_uri": uri,
                                 "error": f"duplicate key: same name as "
                                          f"{storage.basename(seen[key])}"})
                continue
            seen[key] = uri
            keys.append(key)
            sources.append(uri)
    return pa.table({"key": pa.array(keys, pa.string()),
                     "source_uri": pa.array(sources, pa.string())}), problems


# ---------------------------------------------------------------- stage 1: read + prepare

def error_meta(key: str, source: str, reason: str, frame: int | None = None) -> dict:
    return {"key": key, "source_uri": source, "frame": frame, "status": "error", "error": reason}


def _skipped_meta(key: str, source: str, reason: str) -> dict:
    return {"key": key, "source_uri": source, "frame": None, "status": "skipped",
            "error": reason}


def frames_of(row: dict, data: bytes, prep: PrepConfig, max_pixels: int,
               keep_header: bool = False):
    """Yield (meta, prepared image or None) for every frame of one source, whatever its format
    (imaging.open_frames recognises DICOM by content). A DICOM source's metas carry its UIDs
    and, with `keep_header`, its header (what a SEG copies and references)."""
    key, source = row["key"], row["source_uri"]
    try:
        frames = imaging.open_frames(data, max_pixels)
    except SkipInput as exc:
        yield _skipped_meta(key, source, str(exc)), None
        return
    dataset = frames.ds  # DICOM only
    described = dicom_read.instance_uids(dataset) if dataset is not None else {}
    if keep_header and dataset is not None:
        described["dicom_header"] = dicom_read.header_bytes(dataset)
    for index in range(frames.count):
        frame_key = f"{key}#{index + 1}" if frames.count > 1 else key
        frame_no = index + 1 if frames.count > 1 else None
        try:
            image, geometry = imaging.prepare(frames.frame(index), prep)
        except DecodeError as exc:
            if frames.count == 1:
                raise
            yield error_meta(frame_key, source, str(exc), frame_no), None
            continue
        yield {"key": frame_key, "source_uri": source, "frame": frame_no, "status": "ok",
               "error": None, "geometry": geometry, "spacing": frames.spacing_mm,
               **described}, image


def _read_source(uri: str) -> bytes:
    if dicomweb.is_dicomweb(uri):
        return dicomweb.retrieve(uri)
    return storage.read_bytes(uri)


def read_and_prepare(batch: pa.Table, prep: dict, max_pixels: int, keep_header: bool = False):
    """Block of (key, source_uri, labels) -> chunks of frame rows (the metadata as columns,
    see chunk, plus the prepared image). A chunk never splits a source: the SEG of a cine is
    built from all its frames, in the one finish_block call that gets the chunk."""
    config = PrepConfig.from_dict(prep)
    rows = batch.to_pylist()

    def fetch(row):
        try:
            return row, _read_source(row["source_uri"]), None
        except dicomweb.RetrieveError as exc:
            return row, None, f"cannot read: {exc}"
        except (dicomweb.Unreachable, UserError):
            # the server down or refusing us: no row is committed, the next run retries
            raise
        except Exception as exc:
            return row, None, f"cannot read: {storage.describe_error(exc)}"

    metas, images = [], []
    blank = np.zeros((config.size, config.size), np.uint8)
    with telemetry.timed("read"):  # closed on an exception too
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(rows)))) as pool:
            for row, data, read_error in pool.map(fetch, rows):
                if data is not None:
                    telemetry.count("read")
                    telemetry.count("bytes", len(data))
                produced = []
                try:
                    if read_error:
                        raise DecodeError(read_error)
                    for meta, image in frames_of(row, data, config, max_pixels, keep_header):
                        produced.append((meta, image))
                except DecodeError as exc:
                    produced.append((error_meta(row["key"], row["source_uri"], str(exc)), None))
                except Exception as exc:  # never lose a row to an unexpected file
                    produced.append((error_meta(row["key"], row["source_uri"],
                                                 storage.describe_error(exc)), None))
                for meta, image in produced:
                    if meta["status"] == "ok":
                        telemetry.count("prepared")
                    elif meta["status"] == "skipped":
                        telemetry.skipped(meta["error"])
                    else:
                        telemetry.failed("read" if meta["error"].startswith("cannot read")
                                         else "decode", meta["error"])
                    meta["label_uri"] = _label_for(row, meta["key"])
                    if dicomweb.is_dicomweb(meta["source_uri"]) and not meta.get("sop_uid"):
                        meta.update(dicomweb.uids_of(meta["source_uri"]))  # unreadable ones too
                    metas.append(meta)
                    images.append(blank if image is None else image)
                if len(metas) >= ROWS_PER_CHUNK:
                    yield chunk(metas, images)
                    metas, images = [], []
        if metas:
            yield chunk(metas, images)


def _label_for(row: dict, key: str) -> str | None:
    for label in row.get("labels") or ():
        if label["key"] == key:
            return label["uri"]
    return None


# per-frame metadata travels as columns from reading to writing: text as strings ("" for
# none: Ray Data turns a column of only None into NaN floats), geometry as 7 ints, spacing as
# 2 floats (NaN when uncalibrated), frame as an int (0 for none)
TEXT_COLUMNS = ("key", "source_uri", "status", "error", "label_uri", "study_uid", "series_uid",
                "sop_uid")


def chunk(metas: list[dict], images: list[np.ndarray]) -> dict:
    columns = {name: np.array([m.get(name) or "" for m in metas], dtype=object)
               for name in TEXT_COLUMNS}
    columns["dicom_header"] = np.array([m.get("dicom_header") or b"" for m in metas],
                                       dtype=object)
    columns["frame"] = np.array([m.get("frame") or 0 for m in metas], np.int32)
    columns["geometry"] = np.array([m["geometry"].to_row() if m.get("geometry") else (0,) * 7
                                    for m in metas], np.int32)
    columns["spacing"] = np.array([m.get("spacing") or (np.nan, np.nan) for m in metas],
                                  np.float64)
    columns["ok"] = columns["status"] == "ok"
    columns["image"] = np.stack(images)
    return columns
