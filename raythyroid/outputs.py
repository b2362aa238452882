"""What infer writes for one block of frames, in the order that makes a retry safe: masks,
DICOM SEG (stored over DICOMweb when asked), review overlays, and last the results file, the
block's commit record, written only while the run holds OUTPUT's lease (claim.current_run)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import dicomweb, evaluate, figures, imaging, postprocess, results, storage, telemetry
from .dicom import seg_write
from .imaging import DecodeError, Geometry
from .claim import current_run


def finish_block(batch: dict, output: str, post: dict, max_pixels: int, run_id: str,
                 seg: dict | None = None, review: dict | None = None,
                 model_version: str | None = None, redoing: bool = False) -> dict:
    """Post-process, write masks (and with `seg`, each DICOM source's SEG, stored over
    DICOMweb when seg["stow"] names a server), the overlays of the frames worth reviewing
    (`review`), then this block's results file: the commit record, written last, so a block
    retried or redone leaves one copy of everything. Every row names `model_version`. In a run
    `redoing` committed sources, the block first notes its sources (results.REDOING), and
    settles the note once committed: cut off between, the next run redoes them."""
    config = postprocess.PostConfig(**post)
    columns = {name: [None] * len(batch["key"]) for name in results.RESULT_SCHEMA.names}
    frames = batch["frame"]
    columns.update(key=_text(batch["key"]), source_uri=_text(batch["source_uri"]),
                   frame=[int(f) if f else None for f in frames], status=_text(batch["status"]),
                   error=_text(batch["error"]), node_id=_text(batch["node_id"]),
                   model_version=[model_version] * len(batch["key"]),
                   **{name: _text(batch[name]) for name in ("study_uid", "series_uid",
                                                            "sop_uid")})
    note = None
    if redoing:
        if current_run(output) != run_id:  # a newer run owns OUTPUT: rewrite no mask of it
            return _progress(columns, frames)
        note = results.write_redoing(output, columns["key"], _sources(columns), model_version)
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
            segmentations(batch, columns, masks, output, seg)
        kept = review_rows(batch, columns, masks, label_masks, review) if review else None
        # the lease is checked after the wait on the review bar, right before the commit
        if current_run(output) == run_id:
            if kept is not None:
                results.write_review(output, columns["key"], kept, model_version)
            results.write_results(output, pa.Table.from_pydict(
                columns, schema=results.RESULT_SCHEMA))
            if note:
                storage.delete(note)
    # else a newer run owns OUTPUT (this task outlived its driver): it redoes these sources,
    # and committing them here too would count them twice
    return _progress(columns, frames)


def _progress(columns: dict, frames) -> dict:
    # progress counts sources: a multi-frame DICOM is one input however many frames it has
    return {"status": np.array(columns["status"], dtype=object),
            "first_frame": frames <= 1}


def _sources(columns: dict) -> pa.Table:
    """The block's inputs (key, source_uri): a frame's key is its source's KEY#N."""
    by_source = {source: key if frame is None else key.rsplit("#", 1)[0] for key, source, frame
                 in zip(columns["key"], columns["source_uri"], columns["frame"])}
    return pa.table({"key": pa.array(list(by_source.values()), pa.string()),
                     "source_uri": pa.array(list(by_source), pa.string())})


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


def review_rows(batch: dict, columns: dict, masks: dict, label_masks: dict, review: dict
                ) -> pa.Table | None:
    """The block's frames under the run's bars, each with an overlay on the frame the model saw
    (desensitized and cropped: no burned-in text, no header value): its review sidecar.
    review["bar"] is the run's review_bar.ReviewBar as the block reaches it: its offer()
    returns None when the bar is lost."""
    size = review["size"]
    scored = {name: sorted((columns[name][i], columns["key"][i], i) for i in frames)
              for name, frames in (("confidence", masks), ("iou", label_masks))}
    bars = review["bar"].offer(
        {name: [(v, key) for v, key, _ in ranked[:size]] for name, ranked in scored.items()})
    if bars is None:
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


def segmentations(batch: dict, columns: dict, masks: dict[int, np.ndarray], output: str,
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
            data = seg_write.write_segmentation(batch["dicom_header"][rows[0]], frame_masks,
                                                seg["model_id"], seg.get("model_version", ""))
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
        uid = seg_write.segmentation_uid(columns["sop_uid"][rows[0]] or "", seg["model_id"])
        for i in rows:
            columns["seg_uid"][i] = uid
