"""The infer job: segment a whole archive, exactly once, resumable; metrics from the union of rows.

    URIs (paginated listing or a manifest) in blocks
      -> read + decode + imaging.prepare          CPU tasks, threads overlap the reads
      -> Predictor                                actor pool, model loaded once, batched
      -> post-process + masks + results/*.parquet CPU tasks, one results file per block

A results file is written atomically under a name derived from the keys it holds, after that
block's masks, so it is the commit record: a rerun with the same OUTPUT skips every source already
in a results file and processes the rest, and metrics are computed from all results files
together, so an interrupted-then-resumed run ends with exactly the metrics of a clean run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import posixpath
import re
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import imaging, metrics, postprocess, storage, telemetry
from .errors import UserError
from .imaging import DecodeError, Geometry, PrepConfig, SkipInput

RESULTS = "results"
MASKS = "masks"
DICOM_SEG = "dicom-seg"
SUCCESS = "_SUCCESS"
METRICS = "metrics.json"
RUN_LEASE = "_RUN"  # id of the run that owns OUTPUT; only its tasks may commit results
JOB_FILE = "_JOB.json"  # the INPUT, MODEL and LABELS whose results OUTPUT holds
INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", "")
LABEL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
URIS_PER_BLOCK = 64
ROWS_PER_CHUNK = 32  # rows a read task yields at a time, so a long cine loop streams
READ_THREADS = 8
READ_TASK_MEMORY = 256 * 1024 * 1024
MAX_KEY_LENGTH = 180

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
])


@dataclass(frozen=True)
class InferOptions:
    batch_size: int = 16
    workers: int = 1
    gpu: bool = False
    tta: bool | None = None  # None: what model.json says (chosen on validation by train)
    precision: str = "auto"
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS
    dicom_seg: bool = False
    max_error_rate: float | None = None
    cpus_per_worker: float | None = None
    metrics_port: int | None = None  # serve job progress for Prometheus on this port
    block_size: int = URIS_PER_BLOCK  # inputs per read task and, at most, per results file
    compile: bool = False  # torch.compile the model in each Predictor (worth it on GPUs)


# ---------------------------------------------------------------- keys

_UNSAFE = re.compile(r"[^A-Za-z0-9._#+=@-]")


def safe_key(relative: str) -> str:
    """A relative input path (without extension) -> a key that is also a safe output path.

    Each '/'-separated part keeps letters, digits and `._#+=@-`; anything else becomes '_';
    empty, '.' and '..' parts are dropped, so no key can climb out of OUTPUT or be absolute.
    Keys longer than MAX_KEY_LENGTH are cut and suffixed with a hash of the full name.
    """
    parts = []
    for part in relative.replace("\\", "/").split("/"):
        part = _UNSAFE.sub("_", part.replace("\x00", "")).lstrip(".")
        if part:
            parts.append(part)
    key = "/".join(parts) or "_"
    if len(key) > MAX_KEY_LENGTH or any(len(p) > 100 for p in parts):
        digest = hashlib.sha256(relative.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        key = "/".join(p[:100] for p in parts)[:MAX_KEY_LENGTH - 13].rstrip("/") + "-" + digest
    return key


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


def list_inputs(input_uri: str) -> tuple[pa.Table, list[dict]]:
    """INPUT -> table (key, source_uri) of unique keys, plus problem rows for name clashes."""
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
            key = safe_key(_strip_suffix(storage.relative(uri, root)))
            if key in seen:
                clash = safe_key(storage.relative(uri, root))
                problems.append({"key": clash, "source_uri": uri,
                                 "error": f"duplicate key: same name as "
                                          f"{storage.basename(seen[key])}"})
                continue
            seen[key] = uri
            keys.append(key)
            sources.append(uri)
    return pa.table({"key": pa.array(keys, pa.string()),
                     "source_uri": pa.array(sources, pa.string())}), problems


def index_labels(labels_uri: str) -> dict[str, str]:
    root = storage.normalize(labels_uri)
    return {safe_key(posixpath.splitext(storage.relative(u, root))[0]): u
            for page in storage.list_pages(root, LABEL_SUFFIXES) for u in page}


def done_sources(output: str) -> set[str]:
    """Sources already committed by a results file; what a rerun skips."""
    done: set[str] = set()
    for uri in storage.list_files(storage.join(output, RESULTS), (".parquet",)):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["source_uri"])
        done.update(table.column("source_uri").to_pylist())
    return done


def read_results(output: str, columns: list[str] | None = None) -> pa.Table:
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)
              for uri in storage.list_files(storage.join(output, RESULTS), (".parquet",))]
    if not tables:
        schema = RESULT_SCHEMA if columns is None else pa.schema(
            [RESULT_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables)


# ---------------------------------------------------------------- stage 1: read + prepare

def _error_meta(key: str, source: str, reason: str, frame: int | None = None) -> dict:
    return {"key": key, "source_uri": source, "frame": frame, "status": "error", "error": reason}


def _skipped_meta(key: str, source: str, reason: str) -> dict:
    return {"key": key, "source_uri": source, "frame": None, "status": "skipped",
            "error": reason}


def _frames_of(row: dict, data: bytes, prep: PrepConfig, max_pixels: int):
    """Yield (meta, prepared image or None) for every frame of one source, whatever its format
    (imaging.open_frames recognises DICOM by content)."""
    key, source = row["key"], row["source_uri"]
    try:
        frames = imaging.open_frames(data, max_pixels)
    except SkipInput as exc:
        yield _skipped_meta(key, source, str(exc)), None
        return
    for index in range(frames.count):
        frame_key = f"{key}#{index + 1}" if frames.count > 1 else key
        frame_no = index + 1 if frames.count > 1 else None
        try:
            image, geometry = imaging.prepare(frames.frame(index), prep)
        except DecodeError as exc:
            if frames.count == 1:
                raise
            yield _error_meta(frame_key, source, str(exc), frame_no), None
            continue
        yield {"key": frame_key, "source_uri": source, "frame": frame_no, "status": "ok",
               "error": None, "geometry": geometry.to_dict(),
               "spacing": frames.spacing_mm}, image


def read_and_prepare(batch: pa.Table, prep: dict, max_pixels: int):
    """Block of (key, source_uri, labels) -> chunks of {meta, ok, image} rows, frame by frame."""
    config = PrepConfig.from_dict(prep)
    rows = batch.to_pylist()

    def fetch(row):
        try:
            return row, storage.read_bytes(row["source_uri"]), None
        except Exception as exc:
            return row, None, f"cannot read: {storage.describe_error(exc)}"

    metas, images = [], []
    blank = np.zeros((config.size, config.size), np.uint8)
    timer = telemetry.timed("read").__enter__()
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(rows)))) as pool:
        for row, data, read_error in pool.map(fetch, rows):
            if data is not None:
                telemetry.count("read")
                telemetry.count("bytes", len(data))
            produced = []
            try:
                if read_error:
                    raise DecodeError(read_error)
                for meta, image in _frames_of(row, data, config, max_pixels):
                    produced.append((meta, image))
            except DecodeError as exc:
                produced.append((_error_meta(row["key"], row["source_uri"], str(exc)), None))
            except Exception as exc:  # never lose a row to an unexpected file
                produced.append((_error_meta(row["key"], row["source_uri"],
                                             storage.describe_error(exc)), None))
            for meta, image in produced:
                if meta["status"] == "ok":
                    telemetry.count("prepared")
                elif meta["status"] == "skipped":
                    telemetry.skipped(meta["error"])
                else:
                    telemetry.failed("read" if meta["error"].startswith("cannot read")
                                     else "decode", meta["error"])
                meta["label_uri"] = _label_for(row, meta)
                metas.append(json.dumps(meta))
                images.append(blank if image is None else image)
                if len(metas) >= ROWS_PER_CHUNK:
                    yield _chunk(metas, images)
                    metas, images = [], []
    if metas:
        yield _chunk(metas, images)
    timer.__exit__(None, None, None)


def _label_for(row: dict, meta: dict) -> str | None:
    labels = row.get("labels")
    if not labels:
        return None
    return json.loads(labels).get(meta["key"])


def _chunk(metas: list[str], images: list[np.ndarray]) -> dict:
    ok = np.array([json.loads(m)["status"] == "ok" for m in metas])
    return {"meta": np.array(metas, dtype=object), "ok": ok, "image": np.stack(images)}


# ---------------------------------------------------------------- stage 2: the model

class Predictor:
    """Loads the model once per actor; predicts nodule probabilities for the ok rows."""

    def __init__(self, model_uri: str, gpu: bool, tta: bool, threads: int, precision: str,
                 batch_size: int, compile_model: bool = False):
        import ray
        import torch

        from . import model as model_lib
        from .train import _resolve_bf16

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if gpu else "cpu")
        self.net, _ = model_lib.load(model_uri, self.device)
        if compile_model:  # one fixed batch shape (see __call__), so one compilation
            self.net = torch.compile(self.net)
        self.bf16 = _resolve_bf16(precision, self.device)
        self.tta = tta
        self.batch_size = batch_size
        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        import torch

        from . import model as model_lib

        images = batch["image"]
        ok = batch["ok"].astype(bool)
        prob = np.zeros(images.shape, np.float16)
        if ok.any():
            todo = images[ok]
            # Every forward pass gets the same batch shape (short batches are padded), so the
            # kernels chosen, and hence every pixel, do not depend on which images a retried or
            # re-batched block happens to share a batch with: reruns give identical masks.
            padded = np.zeros((max(self.batch_size, len(todo)),) + todo.shape[1:], todo.dtype)
            padded[:len(todo)] = todo
            with telemetry.timed("predict"):
                out = model_lib.nodule_probability(self.net, torch.from_numpy(padded),
                                                   self.device, self.bf16, self.tta)
                prob[ok] = out[:len(todo)].cpu().numpy().astype(np.float16)
            telemetry.count("predicted", int(ok.sum()))
        return {"meta": batch["meta"], "prob": prob,
                "node_id": np.array([self.node_id] * len(ok), dtype=object)}


# ---------------------------------------------------------------- stage 3: finish + write

def _evaluate_label(label_uri: str, mask: np.ndarray, max_pixels: int) -> dict:
    label = imaging.decode_mask(storage.read_bytes(label_uri), max_pixels)
    if label.shape != mask.shape:
        raise DecodeError(f"label is {label.shape[1]}x{label.shape[0]}, "
                          f"image is {mask.shape[1]}x{mask.shape[0]}")
    counts = metrics.counts(label, mask)
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    counts["iou"] = metrics.image_iou(tp, fp, fn)
    counts["dice"] = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    return counts


def finish_block(batch: dict, output: str, post: dict, max_pixels: int, run_id: str) -> dict:
    """Post-process, write masks, then this block's results file (the commit record)."""
    config = postprocess.PostConfig(**post)
    rows = []
    timer = telemetry.timed("postprocess").__enter__()
    for meta_json, prob, node_id in zip(batch["meta"], batch["prob"], batch["node_id"]):
        meta = json.loads(meta_json)
        row = {name: None for name in RESULT_SCHEMA.names}
        row.update(key=meta["key"], source_uri=meta["source_uri"], frame=meta.get("frame"),
                   status=meta["status"], error=meta.get("error"), node_id=node_id)
        if meta["status"] == "ok":
            try:
                geometry = Geometry.from_dict(meta["geometry"])
                full = geometry.restore(prob.astype(np.float32))
                mask = postprocess.clean_mask(full, config)
                spacing = tuple(meta["spacing"]) if meta.get("spacing") else None
                row.update(postprocess.describe(mask, full, spacing),
                           height=geometry.height, width=geometry.width)
                if meta.get("label_uri"):
                    row.update(_evaluate_label(meta["label_uri"], mask, max_pixels))
                storage.write_bytes(storage.join(output, MASKS, f"{meta['key']}.png"),
                                    imaging.encode_png(mask.astype(np.uint8) * 255))
            except Exception as exc:
                reason = str(exc) if isinstance(exc, DecodeError) else \
                    storage.describe_error(exc)
                row = {name: None for name in RESULT_SCHEMA.names}
                row.update(key=meta["key"], source_uri=meta["source_uri"],
                           frame=meta.get("frame"), status="error", error=reason,
                           node_id=node_id)
                telemetry.failed("postprocess", reason)
        rows.append(row)
    if _current_run(output) == run_id:
        write_results(output, rows)
    timer.__exit__(None, None, None)
    # else a newer run owns OUTPUT (this task outlived its driver): it redoes these sources,
    # and committing them here too would count them twice
    # progress counts sources: a multi-frame DICOM is one input however many frames it has
    return {"status": np.array([r["status"] for r in rows], dtype=object),
            "first_frame": np.array([r["frame"] in (None, 1) for r in rows])}


def _current_run(output: str) -> str | None:
    try:
        return storage.read_text(storage.join(output, RUN_LEASE)).strip()
    except (FileNotFoundError, OSError):
        return None


def write_results(output: str, rows: list[dict]) -> None:
    if not rows:
        return
    digest = hashlib.sha256("\n".join(sorted(r["key"] for r in rows)).encode()).hexdigest()
    table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(storage.join(output, RESULTS, f"part-{digest[:24]}.parquet"),
                        buffer.getvalue())


# ---------------------------------------------------------------- DICOM SEG

def write_dicom_segmentations(output: str, log=print) -> int:
    """One DICOM SEG per DICOM source with ok frames, under OUTPUT/dicom-seg/ (opt-in)."""
    table = read_results(output, ["key", "source_uri", "frame", "status"]).to_pylist()
    by_source: dict[str, list[dict]] = {}
    for row in table:
        if row["status"] == "ok":
            by_source.setdefault(row["source_uri"], []).append(row)
    written = 0
    from . import dicom

    for source, rows in sorted(by_source.items()):
        data = storage.read_bytes(source)
        if imaging.sniff_format(data) != "dicom":
            continue
        masks = {}
        for row in rows:
            png = imaging.decode_png(storage.read_bytes(
                storage.join(output, MASKS, f"{row['key']}.png")))
            masks[(row["frame"] or 1) - 1] = png > 0
        base = rows[0]["key"].split("#")[0]
        try:
            seg = dicom.write_segmentation(data, masks)
        except Exception as exc:
            log(f"infer: no DICOM SEG for {base}: {storage.describe_error(exc)}")
            continue
        storage.write_bytes(storage.join(output, DICOM_SEG, f"{base}.seg.dcm"), seg)
        written += 1
    return written


# ---------------------------------------------------------------- driver

def _attach_labels(table: pa.Table, labels_uri: str | None) -> pa.Table:
    if not labels_uri:
        return table.append_column("labels", pa.nulls(table.num_rows, pa.string()))
    index = index_labels(labels_uri)
    by_base: dict[str, dict[str, str]] = {}
    for key, uri in index.items():
        by_base.setdefault(key.split("#")[0], {})[key] = uri
    labels = [json.dumps(by_base[k]) if k in by_base else None
              for k in table.column("key").to_pylist()]
    return table.append_column("labels", pa.array(labels, pa.string()))


def run(model_uri: str, input_uri: str, output: str, labels: str | None = None,
        options: InferOptions = InferOptions(), log=print) -> dict:
    """Segment INPUT into OUTPUT; returns a summary (and metrics with labels)."""
    from . import model as model_lib

    started = time.time()
    model_uri, input_uri, output = (storage.normalize(u) for u in (model_uri, input_uri, output))
    _, meta = model_lib.load(model_uri)  # fail fast, before listing millions of files
    prep = PrepConfig.from_dict(meta["prep"])
    post = postprocess.PostConfig.from_model(meta)
    if options.tta is None:
        options = dataclasses.replace(options, tta=bool(meta.get("tta", False)))
    _claim_output(output, {"input": input_uri, "model": model_uri,
                           "labels": storage.normalize(labels) if labels else None})
    storage.delete(storage.join(output, SUCCESS))
    run_id = uuid.uuid4().hex
    storage.write_text(storage.join(output, RUN_LEASE), run_id)  # before reading what is done

    table, problems = list_inputs(input_uri)
    if table.num_rows == 0 and not problems:
        raise UserError(f"no images found under {input_uri}")
    done = done_sources(output)
    pending = table.filter(pa.array([s not in done for s in table.column("source_uri").to_pylist()],
                                    pa.bool_())) if done else table
    problems = [p for p in problems if p["source_uri"] not in done]
    log(f"infer: {table.num_rows + len(problems)} inputs, {len(done)} already done, "
        f"{pending.num_rows + len(problems)} to process")
    progress = telemetry.JobProgress("infer", run_id, options.metrics_port)
    progress.set_total(pending.num_rows + len(problems))
    try:
        _process(model_uri, output, labels, options, pending, problems, prep, post, run_id,
                 progress, log)
        summary = _finish(output, table, problems, labels, options, started, log)
        progress.set_state("succeeded")
        return summary
    except BaseException:
        progress.set_state("failed")
        raise
    finally:
        progress.close()


def _claim_output(output: str, job: dict) -> None:
    """A rerun resumes only the job that OUTPUT holds: keys of another input could collide
    with committed ones and mix two archives in one results table."""
    uri = storage.join(output, JOB_FILE)
    if storage.exists(uri):
        held = json.loads(storage.read_text(uri))
        changed = [name for name in job if held.get(name) != job[name]]
        if changed:
            raise UserError(f"{output} holds the results of another job ({changed[0]} "
                            f"{held.get(changed[0])}); to resume, give the same INPUT, MODEL "
                            f"and --labels, else use a new OUTPUT")
    else:
        storage.write_text(uri, json.dumps(job, indent=2))


def _process(model_uri, output, labels, options, pending, problems, prep, post, run_id,
             progress, log) -> None:
    import ray

    from .train import _cluster_cpus

    if problems:
        write_results(output, [dict({n: None for n in RESULT_SCHEMA.names}, status="error",
                                    **p) for p in problems])
        progress.advance(len(problems), len(problems))

    if pending.num_rows:
        pending = _attach_labels(pending, labels)
        blocks = [pending.slice(i, options.block_size)
                  for i in range(0, pending.num_rows, options.block_size)]
        total_cpus = _cluster_cpus()
        cpus = options.cpus_per_worker or (1.0 if options.gpu else
                                           max(0.5, (total_cpus - 1) / options.workers))
        threads = max(1, int(round(min(cpus + 0.5, total_cpus / options.workers))))
        ds = (ray.data.from_arrow(blocks)
              .map_batches(read_and_prepare, fn_kwargs={"prep": prep.to_dict(),
                                                        "max_pixels": options.max_pixels},
                           batch_size=None, batch_format="pyarrow",
                           # a memory reservation for decoding large frames; as it differs
                           # from the Predictor's resources, Ray Data also keeps this step in
                           # its own tasks instead of fusing it into the actors, so decoding
                           # runs beside the model, not in front of it
                           memory=READ_TASK_MEMORY)
              .map_batches(Predictor,
                           fn_constructor_kwargs={"model_uri": model_uri, "gpu": options.gpu,
                                                  "tta": options.tta, "threads": threads,
                                                  "precision": options.precision,
                                                  "batch_size": options.batch_size,
                                                  "compile_model": options.compile},
                           compute=ray.data.ActorPoolStrategy(size=options.workers),
                           batch_size=options.batch_size, batch_format="numpy",
                           num_cpus=cpus, num_gpus=1 if options.gpu else 0)
              .map_batches(finish_block, fn_kwargs={"output": output, "post": post.to_dict(),
                                                    "max_pixels": options.max_pixels,
                                                    "run_id": run_id},
                           batch_size=None, batch_format="numpy"))
        printer = telemetry.ProgressPrinter(progress, log)
        # Fault injection for the resume tests: the driver dies, without any cleanup, once
        # this many blocks are committed.
        crash_after = int(os.environ.get("RAYTHYROID_FAULT_STOP_AFTER_BLOCKS", "0"))
        blocks_done = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            progress.advance(int(np.sum(batch["first_frame"])),
                             int(np.sum(batch["status"] == "error")),
                             int(np.sum(batch["status"] == "skipped")))
            printer.update()
            blocks_done += 1
            if crash_after and blocks_done >= crash_after:
                log(f"infer: stopping after {blocks_done} block(s) (fault injection)")
                sys.stdout.flush()
                os._exit(75)


def _finish(output, table, problems, labels, options, started, log) -> dict:
    summary = summarize(output, table, problems, labels is not None)
    if options.dicom_seg:
        summary["dicom_seg"] = write_dicom_segmentations(output, log)
    storage.write_text(storage.join(output, SUCCESS), json.dumps(
        {"images": summary["rows"], "errors": summary["errors"], "skipped": summary["skipped"],
         "seconds": round(time.time() - started, 1)}))
    log(f"infer: {summary['rows']} results, {summary['errors']} errors, "
        f"{summary['skipped']} skipped (not images), {summary['nodules']} with a nodule; "
        f"masks in {storage.join(output, MASKS)}")
    if summary.get("metrics"):
        log(metrics.table(summary["metrics"], "infer, pooled over all labelled images"))
    # skipped rows (reports, plans, waveforms) are neither failures nor inputs to segment
    rate = summary["errors"] / max(summary["rows"] - summary["skipped"], 1)
    summary["error_rate"] = rate
    if options.max_error_rate is not None and rate > options.max_error_rate:
        summary["too_many_errors"] = True
    return summary


def summarize(output: str, table: pa.Table, problems: list[dict], labelled: bool) -> dict:
    """Counts and (with labels) metrics from every results file: the union, never a cache."""
    compact_results(output)
    results = read_results(output, ["key", "source_uri", "status", "error", "nodule",
                                    "tp", "fp", "fn", "tn"])
    sources = set(results.column("source_uri").to_pylist())
    expected = set(table.column("source_uri").to_pylist()) | {p["source_uri"] for p in problems}
    missing = expected - sources
    if missing:
        raise RuntimeError(f"{len(missing)} inputs have no results row, e.g. {sorted(missing)[0]}")
    rows = results.to_pylist()
    errors = [r for r in rows if r["status"] == "error"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    summary = {"rows": len(rows), "errors": len(errors), "skipped": len(skipped),
               "nodules": sum(1 for r in rows if r["nodule"]),
               "error_reasons": _reason_classes(errors),
               "skip_reasons": _count_reasons(skipped)}
    if labelled:
        scored = [r for r in rows if r["status"] == "ok" and r["tp"] is not None]
        result = metrics.summarize([r["tp"] for r in scored], [r["fp"] for r in scored],
                                   [r["fn"] for r in scored], [r["tn"] for r in scored],
                                   errors=len(errors), skipped=len(skipped))
        storage.write_text(storage.join(output, METRICS), json.dumps(result, indent=2))
        summary["metrics"] = result
        summary["unlabelled"] = sum(1 for r in rows if r["status"] == "ok" and r["tp"] is None)
    return summary


def compact_results(output: str) -> int:
    """Make every key appear in one results file only; returns the rows removed.

    A task that outlived a killed driver can commit a block moments after a rerun read what was
    done, and the rerun then commits the same sources again. Both rows are identical (the same
    input, model and code), so the later copy is dropped, atomically, file by file.
    """
    seen: set[str] = set()
    removed = 0
    for uri in sorted(storage.list_files(storage.join(output, RESULTS), (".parquet",))):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        keys = table.column("key").to_pylist()
        fresh = [k not in seen for k in keys]
        seen.update(keys)
        if all(fresh):
            continue
        removed += len(keys) - sum(fresh)
        kept = table.filter(pa.array(fresh, pa.bool_()))
        if kept.num_rows:
            buffer = io.BytesIO()
            pq.write_table(kept, buffer)
            storage.write_bytes(uri, buffer.getvalue())
        else:
            storage.delete(uri)
    return removed


def _count_reasons(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["error"]] = counts.get(row["error"], 0) + 1
    return counts


def _reason_classes(errors: list[dict]) -> dict[str, int]:
    classes: dict[str, int] = {}
    for row in errors:
        name = telemetry.reason_class(row["error"])
        classes[name] = classes.get(name, 0) + 1
    return classes

def evaluate_folders(pred_uri: str, labels_uri: str, max_pixels: int = imaging.DEFAULT_MAX_PIXELS
                     ) -> tuple[dict, list[dict]]:
    """Two mask folders matched by key -> (metrics, per-image rows). Predictions without a
    label, labels without a prediction and size mismatches are counted as errors."""
    preds = index_labels(pred_uri)
    labels = index_labels(labels_uri)
    if not preds:
        raise UserError(f"no mask images under {pred_uri}")

    def score(key):
        try:
            if key not in labels:
                raise DecodeError("no label for this prediction")
            pred = imaging.decode_mask(storage.read_bytes(preds[key]), max_pixels)
            counts = _evaluate_label(labels[key], pred, max_pixels)
            return dict(counts, key=key, status="ok", error=None)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, DecodeError) else storage.describe_error(exc)
            return {"key": key, "status": "error", "error": reason}

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        rows = list(pool.map(score, sorted(preds)))
    rows += [{"key": k, "status": "error", "error": "no prediction for this label"}
             for k in sorted(set(labels) - set(preds))]
    ok = [r for r in rows if r["status"] == "ok"]
    result = metrics.summarize([r["tp"] for r in ok], [r["fp"] for r in ok],
                               [r["fn"] for r in ok], [r["tn"] for r in ok],
                               errors=len(rows) - len(ok))
    return result, rows
