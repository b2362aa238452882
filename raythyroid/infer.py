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
import datetime as dt
import json
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from . import (dicom, dicomweb, evaluate, figures, imaging, metrics, postprocess, report,
               results, runtime, sources, storage, telemetry)
from .errors import UserError
from .imaging import DecodeError, Geometry, PrepConfig

RUN_LEASE = "_RUN"  # id of the run that owns OUTPUT; only its tasks may commit results


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
    block_size: int = sources.URIS_PER_BLOCK  # inputs per read task and, at most, per results file
    compile: bool = False  # torch.compile the model in each Predictor (worth it on GPUs)
    fast: bool = False  # an ensemble's first member alone
    # STOW-RS every SEG to this DICOMweb server (http(s)://host:port/prefix); implies dicom_seg
    stow: str | None = None
    review: int = report.REVIEW_SIZE  # frames in the report's review queues (0: no overlays)


def done_sources(output: str) -> set[str]:
    """Sources already committed by a results file; what a rerun skips."""
    return set(results.read_results(output, ["source_uri"]).column("source_uri").to_pylist())


# ---------------------------------------------------------------- stage 2: the model

class Predictor:
    """Loads the model once per actor; predicts nodule probabilities for the ok rows."""

    def __init__(self, model_uri: str, gpu: bool, tta: bool, threads: int, precision: str,
                 batch_size: int, compile_model: bool = False, fast: bool = False,
                 keep_images: bool = False):
        import ray
        import torch

        from . import model as model_lib

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if gpu else "cpu")
        self.net, meta = model_lib.load(model_lib.resolve(model_uri), self.device,
                                        first_member_only=fast)
        if compile_model:  # one fixed batch shape (see __call__), so one compilation
            self.net = torch.compile(self.net)
        self.bf16 = model_lib.resolve_bf16(precision, self.device)
        self.tta = tta
        self.zoom = model_lib.tta_zoom(meta) if tta else 0.0  # TTA as the model chose it
        self.batch_size = batch_size
        self.keep_images = keep_images  # for the review overlays finish_block draws
        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        import torch

        from . import model as model_lib

        images = batch["image"]
        ok = batch["ok"].astype(bool)
        prob = np.zeros(images.shape, np.float16)
        if ok.any():
            todo = images[ok]
            predicted = []
            for start in range(0, len(todo), self.batch_size):
                part = todo[start:start + self.batch_size]
                # Every forward pass gets the same batch shape (short batches are padded), so
                # the kernels chosen, and hence every pixel, do not depend on which images a
                # retried or re-chunked block shares a batch with: reruns give identical masks.
                padded = np.zeros((self.batch_size,) + todo.shape[1:], todo.dtype)
                padded[:len(part)] = part
                with telemetry.timed("predict"):
                    out = model_lib.nodule_probability(self.net, torch.from_numpy(padded),
                                                       self.device, self.bf16, self.tta,
                                                       self.zoom)
                predicted.append(out[:len(part)].cpu().numpy().astype(np.float16))
            prob[ok] = np.concatenate(predicted)
            telemetry.count("predicted", int(ok.sum()))
        out = {name: column for name, column in batch.items()
               if name != "image" or self.keep_images}
        out["prob"] = prob
        out["node_id"] = np.array([self.node_id] * len(ok), dtype=object)
        return out


# ---------------------------------------------------------------- stage 3: finish + write

def finish_block(batch: dict, output: str, post: dict, max_pixels: int, run_id: str,
                 seg: dict | None = None, review: dict | None = None) -> dict:
    """Post-process, write masks (and with `seg`, each DICOM source's SEG, stored over
    DICOMweb when seg["stow"] names a server), the overlays of the frames worth reviewing
    (`review`), then this block's results file: the commit record, written last, so a block
    retried or redone leaves one copy of everything."""
    config = postprocess.PostConfig(**post)
    columns = {name: [None] * len(batch["key"]) for name in results.RESULT_SCHEMA.names}
    frames = batch["frame"]
    columns.update(key=_text(batch["key"]), source_uri=_text(batch["source_uri"]),
                   frame=[int(f) if f else None for f in frames], status=_text(batch["status"]),
                   error=_text(batch["error"]), node_id=_text(batch["node_id"]),
                   **{name: _text(batch[name]) for name in ("study_uid", "series_uid",
                                                            "sop_uid")})
    labels = _text(batch["label_uri"])
    masks: dict[int, np.ndarray] = {}
    label_masks: dict[int, np.ndarray] = {}
    with telemetry.timed("postprocess"):  # closed on an exception too
        for i in np.flatnonzero(batch["ok"]):
            try:
                described, masks[i], label = _finish_frame(batch, i, labels[i], output, config,
                                                           max_pixels)
            except Exception as exc:
                reason = str(exc) if isinstance(exc, DecodeError) else storage.describe_error(exc)
                columns["status"][i], columns["error"][i] = "error", reason
                telemetry.failed("postprocess", reason)
                continue
            if label is not None:
                label_masks[i] = label
            for name, value in described.items():
                columns[name][i] = value
        if seg is not None:
            _segmentations(batch, columns, masks, output, seg)
        kept = _review_rows(batch, columns, masks, label_masks, review) if review else None
        # the lease is checked after the wait on the review bar, right before the commit
        if _current_run(output) == run_id:
            if kept is not None:
                results.write_review(output, columns["key"], kept)
            results.write_results(output, pa.Table.from_pydict(
                columns, schema=results.RESULT_SCHEMA))
    # else a newer run owns OUTPUT (this task outlived its driver): it redoes these sources,
    # and committing them here too would count them twice
    # progress counts sources: a multi-frame DICOM is one input however many frames it has
    return {"status": np.array(columns["status"], dtype=object),
            "first_frame": frames <= 1}


def _text(column) -> list[str | None]:
    """A text column of the chunk back to results values: "" is none (see sources.chunk)."""
    return [str(v) or None for v in column]


def _finish_frame(batch: dict, i: int, label_uri: str | None, output: str, config,
                  max_pixels: int) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """One frame's probabilities -> its mask (written), its results columns and its label."""
    geometry = Geometry.from_row(batch["geometry"][i])
    full = geometry.restore(batch["prob"][i].astype(np.float32))
    mask = postprocess.clean_mask(full, config)
    spacing = batch["spacing"][i]
    described = dict(postprocess.describe(mask, full, None if np.isnan(spacing[0])
                                          else (float(spacing[0]), float(spacing[1])),
                                          config.threshold),
                     height=geometry.height, width=geometry.width)
    label = None
    if label_uri:
        label = evaluate.read_label(label_uri, mask.shape, max_pixels)
        described.update(evaluate.label_counts(label, mask))
    storage.write_bytes(storage.join(output, results.MASKS, f"{batch['key'][i]}.png"),
                        imaging.encode_png(mask.astype(np.uint8) * 255))
    return described, mask, label


class ReviewBar:
    """The lowest confidences (and IoUs) this run has met so far, `size` of each, as
    (value, key) pairs: a retried block offers the same frames again and they count once, and
    ties are broken by key as the report's queue breaks them.

    A block keeps an overlay only for a frame at or under the bar: every frame of the final
    queue is kept (no frame below the run's `size`-th lowest can be above the bar of a subset),
    yet an archive of N frames keeps about size x ln(N / size) overlays, not a share of N.
    """

    def __init__(self, size: int):
        self.size = size
        self.lowest: dict[str, dict[str, float]] = {"confidence": {}, "iou": {}}

    def offer(self, values: dict[str, list[tuple[float, str]]]) -> dict[str, tuple | None]:
        """Merge a block's (value, key) pairs; return each bar, None until `size` are known."""
        bars = {}
        for name, found in values.items():
            merged = dict(self.lowest[name], **{key: value for value, key in found})
            kept = sorted((value, key) for key, value in merged.items())[:self.size]
            self.lowest[name] = {key: value for value, key in kept}
            bars[name] = tuple(kept[-1]) if len(kept) >= self.size else None
        return bars


def _review_bar(size: int):
    """The run's ReviewBar, on the driver's node (it shares the driver's fate, not a worker
    node's)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(ReviewBar).remote(size)


def _review_rows(batch: dict, columns: dict, masks: dict, label_masks: dict, review: dict
                 ) -> pa.Table | None:
    """The block's frames under the run's bars, each with an overlay on the frame the model saw
    (desensitized and cropped: no burned-in text, no header value): its review sidecar."""
    import ray

    size = review["size"]
    scored = {name: sorted((columns[name][i], columns["key"][i], i) for i in frames)
              for name, frames in (("confidence", masks), ("iou", label_masks))}
    try:
        bars = ray.get(review["bar"].offer.remote(
            {name: [(v, key) for v, key, _ in ranked[:size]] for name, ranked in scored.items()}),
            timeout=60)
    except (ray.exceptions.RayError, TimeoutError):
        # the bar is lost (its node died): keeping the block's lowest is still correct, only
        # more than needed; the overlays must never cost a block its commit
        bars = {name: None for name in scored}
    chosen: set[int] = set()
    for name, ranked in scored.items():
        bar = bars[name]
        chosen.update(i for v, key, i in ranked[:size] if bar is None or (v, key) <= tuple(bar))
    if not chosen:
        return None
    rows = []
    for i in sorted(chosen):
        geometry = Geometry.from_row(batch["geometry"][i])
        label = label_masks.get(i)
        rows.append({"key": columns["key"][i], "confidence": columns["confidence"][i],
                     "iou": columns["iou"][i], "area_px": columns["area_px"][i],
                     "area_mm2": columns["area_mm2"][i],
                     "thumbnail": figures.thumbnail(
                         batch["image"][i], geometry.to_model(masks[i]),
                         None if label is None else geometry.to_model(label))})
    return pa.Table.from_pylist(rows, schema=results.REVIEW_SCHEMA)


def _segmentations(batch: dict, columns: dict, masks: dict[int, np.ndarray], output: str,
                   seg: dict) -> None:
    """One SEG per DICOM source in this chunk (a chunk holds all of a source's frames), written
    under OUTPUT/dicom-seg/ and, with seg["stow"], stored in that DICOMweb server. Its UIDs
    derive from the source instance and the model, so a retry or rerun stores the same object
    again (one copy), never a second one. A store that fails (after the HTTP retries) fails
    the block before its results file is written, and so the job: its sources stay uncommitted
    and the next run (a scheduler's retry, the next night) does them again."""
    by_source: dict[str, list[int]] = {}
    for i in masks:
        if len(batch["dicom_header"][i]):
            by_source.setdefault(columns["source_uri"][i], []).append(int(i))
    built = []
    for rows in by_source.values():
        frame_masks = {(columns["frame"][i] or 1) - 1: masks[i] > 0 for i in rows}
        base = columns["key"][rows[0]].split("#")[0]
        try:
            data = dicom.write_segmentation(batch["dicom_header"][rows[0]], frame_masks,
                                            seg["model_id"])
        except Exception as exc:
            telemetry.failed("segmentation", storage.describe_error(exc))
            for i in rows:
                columns["error"][i] = f"no DICOM SEG: {storage.describe_error(exc)}"[:300]
            continue
        storage.write_bytes(storage.join(output, results.DICOM_SEG, f"{base}.seg.dcm"), data)
        built.append((rows, data))
    if seg.get("stow") and built:
        dicomweb.store(seg["stow"], [data for _, data in built])
    for rows, _ in built:
        uid = dicom.segmentation_uid(columns["sop_uid"][rows[0]] or "", seg["model_id"])
        for i in rows:
            columns["seg_uid"][i] = uid


def _current_run(output: str) -> str | None:
    try:
        return storage.read_text(storage.join(output, RUN_LEASE)).strip()
    except (FileNotFoundError, OSError):
        return None


# ---------------------------------------------------------------- driver

# a source's label files, one per frame key (a cine has several)
LABELS_TYPE = pa.list_(pa.struct([("key", pa.string()), ("uri", pa.string())]))


def _labels_by_source(table: pa.Table, labels_uri: str | None, log) -> dict | None:
    """Label files by input key (a cine's frames under one key); a --labels that matches no
    input is a mistake worth stopping for, one that matches some is worth a warning."""
    if not labels_uri:
        return None
    by_base: dict[str, dict[str, str]] = {}
    for key, uri in evaluate.index_labels(labels_uri).items():
        by_base.setdefault(key.split("#")[0], {})[key] = uri
    keys = table.column("key").to_pylist()
    matched = sum(key in by_base for key in keys)
    if keys and not matched:
        example_label = next(iter(by_base), None)
        raise UserError(
            f"--labels matches no input: inputs are keyed like {keys[0]!r}, labels like "
            + (f"{example_label!r}" if example_label else "(no label image found)")
            + f" under {labels_uri}; labels need the same relative path without extension")
    if matched < len(keys):
        log(f"infer: warning: --labels matches {matched} of {len(keys)} inputs; the others "
            f"are segmented but not scored")
    return by_base


def _attach_labels(table: pa.Table, by_base: dict | None) -> pa.Table:
    if by_base is None:
        return table.append_column("labels", pa.nulls(table.num_rows, LABELS_TYPE))
    labels = [[{"key": k, "uri": u} for k, u in by_base[key].items()] if key in by_base else None
              for key in table.column("key").to_pylist()]
    return table.append_column("labels", pa.array(labels, LABELS_TYPE))


def run(model_uri: str, input_uri: str, output: str, labels: str | None = None,
        options: InferOptions = InferOptions(), log=print) -> dict:
    """Segment INPUT into OUTPUT; returns a summary (and metrics with labels)."""
    from . import model as model_lib

    started = time.time()
    # a bundled model travels by name: each node resolves it inside its own installation
    resolved = model_lib.resolve(model_uri)
    bundled = resolved != model_uri
    model_ref = model_uri if bundled else storage.normalize(model_uri)
    model_uri, output = storage.normalize(resolved), storage.normalize(output)
    if dicomweb.is_dicomweb(input_uri):
        # the server and the filters as written (a relative date window moves night to night
        # within one job), patient filters only as hashes
        identity = dicomweb.parse(input_uri).identity
    else:
        input_uri = identity = storage.normalize(input_uri)
    # fail fast, before listing millions of files
    meta = model_lib.read_metadata(model_uri, first_member_only=options.fast)
    prep = PrepConfig.from_dict(meta["prep"])
    post = postprocess.PostConfig.from_model(meta)
    if options.fast:
        options = dataclasses.replace(options, tta=False)
    elif options.tta is None:
        options = dataclasses.replace(options, tta=bool(meta.get("tta", False)))
    table, problems = sources.list_inputs(input_uri, lambda line: log(f"infer: {line}"))
    if table.num_rows == 0 and not problems and not dicomweb.is_dicomweb(input_uri):
        raise UserError(f"no images found under {input_uri}")  # a PACS may have a quiet night
    label_index = _labels_by_source(table, labels, log)  # a mistake here claims no OUTPUT
    # a bundled model's path moves with the installation and its weights with a new version:
    # its identity is its name and its weights; --fast runs other weights than the whole
    # model, and a rerun must not mix the two
    job = {"input": identity, "labels": storage.normalize(labels) if labels else None,
           "model": model_ref if bundled else model_uri,
           # the inference applied: a model retrained in place, a model.json chosen again or
           # another TTA flag would give other masks for the same keys
           "weights": meta["weights_sha256"][:16], "tta": options.tta,
           "tta_zoom": model_lib.tta_zoom(meta) if options.tta else 0.0,
           "postprocess": post.to_dict()}
    _claim_output(output, dict(job, fast=True) if options.fast else job)
    storage.delete(storage.join(output, results.SUCCESS))
    run_id = uuid.uuid4().hex
    storage.write_text(storage.join(output, RUN_LEASE), run_id)  # before reading what is done
    done = done_sources(output)
    pending = table.filter(pa.array([s not in done for s in table.column("source_uri").to_pylist()],
                                    pa.bool_())) if done else table
    problems = [p for p in problems if p["source_uri"] not in done]
    log(f"infer: {table.num_rows + len(problems)} inputs, {len(done)} already done, "
        f"{pending.num_rows + len(problems)} to process")
    record = {"started": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(
                  timespec="seconds"),
              "processed": pending.num_rows + len(problems),
              "model_card": model_lib.headline(meta)}
    with telemetry.tracked("infer", run_id, options.metrics_port,
                           pending.num_rows + len(problems)) as progress:
        _process(model_ref, output, label_index, options, pending, problems, prep, post,
                 _seg_settings(meta, options), run_id, progress, log)
        return _finish(output, table, problems, labels, options, started, record, log)


# _JOB.json of an OUTPUT begun by an older version. Versions with the zoomed-out view wrote
# tta_zoom whenever it applied, all but the first; missing reads as none (an OUTPUT of that
# first one is refused: it cannot be told from one begun before the view). They wrote none of
# JOB_KEYS_OLDER_VERSIONS_LACK: those are unknown there and not checked.
JOB_KEYS_OLDER_VERSIONS_IMPLIED = {"tta_zoom": 0.0}
JOB_KEYS_OLDER_VERSIONS_LACK = ("weights", "tta", "postprocess")
JOB_KEYS_OF_THE_MODEL = ("weights", "tta_zoom", "postprocess")  # no flag of this run sets them


def _claim_output(output: str, job: dict) -> None:
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


def _seg_settings(meta: dict, options: InferOptions) -> dict | None:
    if not (options.dicom_seg or options.stow):
        return None
    # the weights' identity enters every SEG UID: another model's SEG is another object
    return {"stow": options.stow, "model_id": meta["weights_sha256"][:32]}


def _process(model_uri, output, label_index, options, pending, problems, prep, post, seg, run_id,
             progress, log) -> None:
    import ray

    if problems:
        results.write_results(output, pa.Table.from_pylist(
            [dict({n: None for n in results.RESULT_SCHEMA.names}, status="error", **p) for p in problems],
            schema=results.RESULT_SCHEMA))
        progress.advance(len(problems), len(problems))

    if pending.num_rows:
        pending = _attach_labels(pending, label_index)
        blocks = [pending.slice(i, options.block_size)
                  for i in range(0, pending.num_rows, options.block_size)]
        cpus, threads = runtime.plan_workers(options.workers, options.gpu,
                                             options.cpus_per_worker)
        review = {"size": options.review, "bar": _review_bar(options.review)} \
            if options.review > 0 else None
        ds = (ray.data.from_arrow(blocks)
              .map_batches(sources.read_and_prepare, fn_kwargs={"prep": prep.to_dict(),
                                                        "max_pixels": options.max_pixels,
                                                        "keep_header": seg is not None},
                           batch_size=None, batch_format="pyarrow",
                           # a memory reservation for decoding large frames; as it differs
                           # from the Predictor's resources, Ray Data also keeps this step in
                           # its own tasks instead of fusing it into the actors, so decoding
                           # runs beside the model, not in front of it
                           memory=sources.READ_TASK_MEMORY)
              .map_batches(Predictor,
                           fn_constructor_kwargs={"model_uri": model_uri, "gpu": options.gpu,
                                                  "tta": options.tta, "threads": threads,
                                                  "precision": options.precision,
                                                  "batch_size": options.batch_size,
                                                  "compile_model": options.compile,
                                                  "fast": options.fast,
                                                  "keep_images": review is not None},
                           compute=ray.data.ActorPoolStrategy(size=options.workers),
                           # whole read chunks (the actor batches them itself), so the chunk
                           # reaches finish_block with every frame of its sources together
                           batch_size=None, batch_format="numpy",
                           num_cpus=cpus, num_gpus=1 if options.gpu else 0)
              .map_batches(finish_block, fn_kwargs={"output": output, "post": post.to_dict(),
                                                    "max_pixels": options.max_pixels,
                                                    "run_id": run_id, "seg": seg,
                                                    "review": review},
                           batch_size=None, batch_format="numpy"))
        printer = telemetry.ProgressPrinter(progress, log)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            progress.advance(int(np.sum(batch["first_frame"])),
                             int(np.sum(batch["status"] == "error")),
                             int(np.sum(batch["status"] == "skipped")))
            printer.update()


def _finish(output, table, problems, labels, options, started, record, log) -> dict:
    summary = summarize(output, table, problems, labels is not None)
    storage.write_text(storage.join(output, results.SUCCESS), json.dumps(
        {"images": summary["rows"], "errors": summary["errors"], "skipped": summary["skipped"],
         "seconds": round(time.time() - started, 1), **record}))
    summary["report"] = report.write_at_end(output, options.review or report.REVIEW_SIZE)
    log(f"infer: {summary['rows']} results, {summary['errors']} errors, "
        f"{summary['skipped']} skipped (not images), {summary['nodules']} with a nodule; "
        f"masks in {storage.join(output, results.MASKS)}; report: {summary['report']}")
    if summary.get("metrics"):
        log(metrics.table(summary["metrics"], "infer, pooled over all labelled images"))
    # skipped rows (reports, plans, waveforms) are neither failures nor inputs to segment
    rate = summary["errors"] / max(summary["rows"] - summary["skipped"], 1)
    summary["error_rate"] = rate
    if options.max_error_rate is not None and rate > options.max_error_rate:
        summary["too_many_errors"] = True
    return summary


def summarize(output: str, table: pa.Table, problems: list[dict], labelled: bool) -> dict:
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
    summary = {"rows": rows.num_rows, "errors": errors.num_rows,
               "skipped": skipped.num_rows,
               "nodules": int(pc.sum(rows.column("nodule")).as_py() or 0),
               "error_reasons": _reason_classes(_count_reasons(errors)),
               "skip_reasons": _count_reasons(skipped),
               "dicom_seg": pc.count_distinct(rows.column("seg_uid")).as_py()}
    if labelled:
        ok = pc.equal(status, "ok")
        scored = rows.filter(pc.and_(ok, pc.is_valid(rows.column("tp"))))
        result = metrics.summarize(*(scored.column(c).to_numpy() for c in ("tp", "fp", "fn",
                                                                              "tn")),
                                   errors=errors.num_rows, skipped=skipped.num_rows)
        storage.write_text(storage.join(output, results.METRICS), json.dumps(result, indent=2))
        summary["metrics"] = result
        summary["unlabelled"] = int(pc.sum(ok).as_py() or 0) - scored.num_rows
    return summary


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
