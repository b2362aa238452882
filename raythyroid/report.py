"""The morning-after reports: one static HTML page per run, opened from its output folder.

`write_infer(OUTPUT)` reads the results table by columns, opens only the overlays it shows (the
review sidecars the blocks kept while they had the frames: never the archive or a PACS) and
writes OUTPUT/report/index.html with its pictures. Train and cv runs get theirs from their own
records. Pages are self-contained: relative links, inline CSS, no script, nothing fetched, so a
downloaded folder or a static bucket shows them as they are. Nothing a page shows comes from a
header or a burned-in text region: keys, numbers and overlays of the desensitized frame.
"""
from __future__ import annotations

import datetime as dt
import html
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import figures, metrics, results, storage

INDEX = "index.html"
REVIEW_SIZE = 24  # frames in a review queue
FAILURE_IOU = 0.5  # a labelled frame under this IoU is a failure the queue should catch
REASONS_SHOWN = 30

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1180px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 0.92em; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 164px; font-size: 0.78em; overflow-wrap: anywhere; }
figure img { width: 160px; height: 160px; border: 2px solid #ddd; display: block; }
.note { color: #555; font-size: 0.9em; }
.plot { max-width: 100%; }
"""


def write(folder: str, queue_size: int = REVIEW_SIZE) -> str:
    """The report of whatever run `folder` holds: an infer OUTPUT, a cv RUN or a train RUN."""
    from .errors import UserError

    folder = storage.normalize(folder)
    if storage.exists(storage.join(folder, results.JOB_FILE)):
        return write_infer(folder, queue_size)
    if storage.exists(storage.join(folder, "cv.json")):
        return write_cv(folder)
    if storage.exists(storage.join(folder, "model", "model.json")):
        return write_train(folder)
    raise UserError(f"{folder} holds no infer OUTPUT (no {results.JOB_FILE}), cv RUN (no "
                    f"cv.json) or finished train RUN (no model/model.json)")


def write_at_end(folder: str, queue_size: int = REVIEW_SIZE) -> str:
    """The report a job writes as it ends, or why it could not: the job's outputs are complete
    and committed by then, and `raythyroid report FOLDER` can write the page again."""
    try:
        return write(folder, queue_size)
    except Exception as exc:
        return (f"not written ({storage.describe_error(exc)}); `raythyroid report {folder}` "
                f"writes it")


def write_infer(output: str, queue_size: int = REVIEW_SIZE) -> str:
    """OUTPUT/report/index.html and its pictures; returns the page's URI."""
    output = storage.normalize(output)
    folder = storage.join(output, results.REPORT)
    _clear(folder)
    table = results.read_results(output, ["key", "status", "error", "n_components", "area_px",
                                          "area_mm2", "aspect_ratio", "confidence", "iou", "tp",
                                          "fp", "fn", "nodule", "model_version"])
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    labelled = ok.filter(pc.is_valid(ok.column("iou")))
    kept = results.read_review(output)
    parts = [_run_section(output, table), _versions_section(output, table)]
    if labelled.num_rows:
        parts.append(_metrics_section(output, ok, labelled, queue_size))
    parts.append(_queue_section(folder, "review queue: the least confident frames",
                                "review-queue", _least(ok, "confidence", queue_size), kept,
                                "queue"))
    if labelled.num_rows:
        parts.append(_queue_section(folder, "the worst frames by IoU", "worst-iou",
                                    _least(labelled, "iou", queue_size), kept, "worst"))
    parts.append(_distributions_section(folder, ok, labelled))
    parts.append(_problems_section(table))
    return _write_page(folder, "raythyroid infer report", parts)


# ---------------------------------------------------------------- infer sections

def _run_section(output: str, table: pa.Table) -> str:
    try:
        job = results.read_job(output) or {}
    except ValueError:  # a damaged record still leaves a report of the rows
        job = {}
    done = _read_json(storage.join(output, results.SUCCESS))
    status = table.column("status")
    counts = {name: int(pc.sum(pc.equal(status, name)).as_py() or 0)
              for name in ("ok", "error", "skipped")}
    rows = [("input", job.get("input")), ("labels", job.get("labels")),
            # a bundled model's name stays while a new version changes its weights
            ("model", f"{job['model']}, weights {job['weights']}" if job.get("weights")
             else job.get("model")),
            ("model version", job.get("version")),
            ("model's record", (done or {}).get("model_card"))]
    if job.get("fast"):
        rows.append(("inference", "--fast: one model, no TTA"))
    if done:
        seconds = done.get("seconds") or 0
        processed = done.get("processed")  # absent from the records of older versions
        rows += [("started", done.get("started")), ("duration", _duration(seconds)),
                 ("images/s", f"{processed / seconds:.2f} ({processed:,} inputs this run)"
                  if seconds and processed is not None else None)]
    else:
        rows.append(("state", "not finished (no _SUCCESS): the rows committed so far"))
    rows += [("frames", f"{table.num_rows:,}: {counts['ok']:,} ok, {counts['error']:,} "
                        f"error, {counts['skipped']:,} skipped (not images)")]
    return "<h2>the run</h2>" + _table([(name, value) for name, value in rows
                                        if value is not None])


def _versions_section(output: str, table: pa.Table) -> str:
    """Rows and scores by the model version that made them, once OUTPUT holds several (a
    nightly OUTPUT across promotions); each version's scores are metrics.json's."""
    try:
        job = results.read_job(output) or {}
    except ValueError:
        job = {}
    made_by = results.row_versions(job, table.column("model_version"))
    present = pc.unique(made_by).to_pylist()
    if len(present) < 2:
        return ""
    finished = storage.exists(storage.join(output, results.SUCCESS))
    scores = ((_read_json(storage.join(output, results.METRICS)) if finished else None)
              or {}).get("by_version") or {}
    weights = {v["version"]: v.get("weights") for v in job.get("versions") or []}
    order = [label for label in weights if label in present] + sorted(
        label for label in present if label not in weights)
    header = ["model version", "weights", "frames", "ok", "errors", "with a nodule"]
    header += [name for name, _ in metrics.TABLE_COLUMNS] if scores else []
    rows = []
    for label in order:
        mine = table.filter(pc.equal(made_by, label))
        status = mine.column("status")
        rows.append([label, weights.get(label) or "", f"{mine.num_rows:,}"]
                    + [f"{int(pc.sum(pc.equal(status, name)).as_py() or 0):,}"
                       for name in ("ok", "error")]
                    + [f"{int(pc.sum(mine.column('nodule')).as_py() or 0):,}"]
                    + ([_number((scores.get(label) or {}).get(key))
                        for _, key in metrics.TABLE_COLUMNS] if scores else []))
    return ("<h2>by model version</h2><p class=\"note\">each row of the results names the "
            "model version that made it; the latest run's version last</p>"
            "<div id=\"by-version\">" + _table(rows, header) + "</div>")


def _metrics_section(output: str, ok: pa.Table, labelled: pa.Table, queue_size: int) -> str:
    # metrics.json belongs to the last finished run: a run under way has not written its own
    finished = storage.exists(storage.join(output, results.SUCCESS))
    scores = (_read_json(storage.join(output, results.METRICS)) if finished else None) or {}
    header = [name for name, _ in metrics.TABLE_COLUMNS]
    values = [_number(scores.get(key)) for _, key in metrics.TABLE_COLUMNS]
    caught = review_catch(labelled, queue_size)
    lines = [f"<h2>against the labels ({labelled.num_rows:,} frames)</h2>",
             _table([values], header, numeric=True) if scores else
             "<p class=\"note\">the pooled table comes when the run finishes</p>",
             f"<p id=\"queue-catch\">The least confident quarter ({caught['quarter']:,} frames) "
             f"holds {caught['in_quarter']:,} of the {caught['failures']:,} failures "
             f"(IoU &lt; {FAILURE_IOU}); the queue's first {caught['shown']} frames hold "
             f"{caught['in_queue']:,}.</p>"]
    if caught["by_kind"]:
        lines += ["<p>The failures by how the mask sits against the label (nearly all: "
                  f"{metrics.NEARLY_ALL:.0%}):</p>",
                  "<div id=\"failure-kinds\">" + _table(
                      [(kind, f"{total:,}", f"{held:,}") for kind, total, held in
                       caught["by_kind"]],
                      ["failure", "frames", "in the least confident quarter"]) + "</div>"]
    if ok.num_rows > labelled.num_rows:
        lines.append(f"<p class=\"note\">{ok.num_rows - labelled.num_rows:,} frames had no "
                     f"label and are not scored: the quarter above is of the labelled frames."
                     f"</p>")
    return "\n".join(lines)


def review_catch(labelled: pa.Table, queue_size: int = REVIEW_SIZE) -> dict:
    """How many failures (IoU < FAILURE_IOU) the least confident quarter and the queue hold;
    by_kind: (kind, failures of that kind, how many of them the quarter holds), the kinds of
    metrics.FAILURE_KINDS that occur."""
    order = pc.sort_indices(labelled, sort_keys=[("confidence", "ascending"),
                                                 ("key", "ascending")]).to_numpy()
    failed = pc.less(labelled.column("iou"), FAILURE_IOU).to_numpy(zero_copy_only=False)
    quarter = max(1, int(round(len(failed) / 4))) if len(failed) else 0
    shown = min(queue_size, len(failed))
    in_quarter = np.zeros(len(failed), bool)
    in_quarter[order[:quarter]] = True
    by_kind = metrics.failures_by_kind(*(labelled.column(c).to_numpy(zero_copy_only=False)
                                         for c in ("tp", "fp", "fn")), failed, in_quarter)
    return {"failures": int(failed.sum()), "quarter": quarter,
            "in_quarter": int((failed & in_quarter).sum()), "shown": shown,
            "in_queue": int(failed[order[:shown]].sum()), "by_kind": by_kind}


def _least(table: pa.Table, column: str, count: int) -> pa.Table:
    """The `count` rows lowest in `column`, ties by key: the order the queue is shown in."""
    order = pc.sort_indices(table, sort_keys=[(column, "ascending"), ("key", "ascending")])
    return table.take(order[:count])


def _queue_section(folder: str, title: str, anchor: str, chosen: pa.Table, kept: pa.Table,
                   images: str) -> str:
    """The chosen frames in order, each with its overlay where a block kept one."""
    by_key = {}
    if kept.num_rows:
        wanted = kept.filter(pc.is_in(kept.column("key"), value_set=chosen.column("key")))
        by_key = {row["key"]: row["thumbnail"] for row in wanted.to_pylist()}
    cells = []
    for rank, row in enumerate(chosen.to_pylist(), 1):
        picture = "<div class=\"note\">no overlay kept</div>"
        if row["key"] in by_key:
            name = f"{images}/{rank:03d}.jpg"
            _put(folder, name, by_key[row["key"]])
            picture = f"<img src=\"{name}\" alt=\"overlay of {html.escape(row['key'])}\">"
        facts = [f"confidence {row['confidence']:.3f}"]
        if row.get("iou") is not None:
            facts.append(f"IoU {row['iou']:.3f}")
        facts.append(_area(row))
        cells.append(f"<figure data-key=\"{html.escape(row['key'])}\" data-rank=\"{rank}\">"
                     f"{picture}<figcaption><b>{html.escape(row['key'])}</b><br>"
                     f"{' · '.join(facts)}</figcaption></figure>")
    legend = ("red: the model's outline; green: the label's" if anchor == "worst-iou"
              else "red: the model's outline, on the frame the model saw (desensitized, "
                   "cropped, equalised)")
    body = "\n".join(cells) or "<p>no frame</p>"
    return (f"<h2 id=\"{anchor}-title\">{title}</h2><p class=\"note\">{legend}</p>"
            f"<div class=\"grid\" id=\"{anchor}\">\n{body}\n</div>")


def _distributions_section(folder: str, ok: pa.Table, labelled: pa.Table) -> str:
    def values(column: str) -> np.ndarray:
        return ok.column(column).to_numpy(zero_copy_only=False).astype(np.float64)

    area_mm2, area_px = values("area_mm2"), values("area_px")
    with_nodule = area_px > 0
    calibrated = np.isfinite(area_mm2) & with_nodule
    # one unit per picture: mm² when every frame with a nodule is calibrated
    if with_nodule.any() and calibrated.sum() == with_nodule.sum():
        area, unit = area_mm2[calibrated], "mm²"
    else:
        area, unit = area_px[with_nodule], "px (frames without a pixel spacing)"
    _put(folder, "distributions.png", figures.distributions(
        area, unit, values("aspect_ratio"), values("confidence"), values("n_components")))
    parts = ["<h2>what the run found</h2>",
             "<img class=\"plot\" src=\"distributions.png\" alt=\"distributions of nodule area, "
             "aspect ratio, confidence and components per frame\">"]
    if labelled.num_rows:
        iou = labelled.column("iou").to_numpy(zero_copy_only=False).astype(np.float64)
        _put(folder, "iou.png", figures.iou_histogram(iou, FAILURE_IOU))
        parts.append("<img class=\"plot\" src=\"iou.png\" alt=\"histogram of IoU per frame\">")
    return "\n".join(parts)


def _problems_section(table: pa.Table) -> str:
    """Errors and skips by reason, most frequent first, one example key each."""
    problems = table.filter(pc.not_equal(table.column("status"), "ok"))
    if not problems.num_rows:
        return "<h2>errors and skips</h2><p>none</p>"
    grouped = problems.group_by(["status", "error"]).aggregate([("key", "count"),
                                                               ("key", "min")])
    grouped = grouped.take(pc.sort_indices(grouped, sort_keys=[("key_count", "descending"),
                                                               ("error", "ascending")]))
    rows = [(r["status"], r["error"] or "", f"{r['key_count']:,}", r["key_min"])
            for r in grouped.slice(0, REASONS_SHOWN).to_pylist()]
    more = grouped.num_rows - len(rows)
    note = (f"<p class=\"note\">{more:,} other reasons, "
            f"{int(pc.sum(grouped.column('key_count').slice(len(rows))).as_py()):,} frames: "
            f"the results table has every one</p>" if more > 0 else "")
    return ("<h2>errors and skips</h2>" + _table(rows, ["status", "reason", "frames",
                                                         "example key"]) + note)


# ---------------------------------------------------------------- train and cv

WORST_VALIDATION = 12


def write_train(run_uri: str) -> str:
    """RUN/report/index.html: curves, validation and test tables, the chosen inference and
    every variant's validation score, and the worst validation frames."""
    run_uri = storage.normalize(run_uri)
    folder = storage.join(run_uri, results.REPORT)
    _clear(folder)
    from . import model

    info = model.ModelInfo.from_json(json.loads(storage.read_text(
        storage.join(run_uri, "model", model.MODEL_JSON))))
    training = info.training
    history = _read_lines(storage.join(run_uri, "history.jsonl"))
    _put(folder, "curves.png", figures.curves(history, training.get("best_epoch")))
    test = _read_json(storage.join(run_uri, "metrics.json")) or {}
    facts = [("data", " + ".join(info.data_uris) or None),
             ("epochs", f"{training.get('epochs_run')} run, best {training.get('best_epoch')}"),
             ("workers", training.get("workers")),
             ("recipe", ", ".join(f"{k}={v}" for k, v in (training.get("config") or {}).items()
                                  if v is not None))]
    sections = ["<h2>the run</h2>" + _table([f for f in facts if f[1] is not None]),
                "<h2>learning curves</h2><img class=\"plot\" src=\"curves.png\" "
                "alt=\"training loss and validation IoU by epoch\">",
                _scores_section([("validation, best epoch", training.get("best_val") or {}),
                                 ("test split", test)]),
                _variants_section(info),
                _worst_validation_section(run_uri, info, folder)]
    return _write_page(folder, "raythyroid train report", sections)


def write_cv(run_uri: str) -> str:
    """RUN/report/index.html of a cross-validation: the per-fold table, mean and spread, each
    fold's validation curve, and the ensemble's chosen inference."""
    run_uri = storage.normalize(run_uri)
    folder = storage.join(run_uri, results.REPORT)
    _clear(folder)
    summary = json.loads(storage.read_text(storage.join(run_uri, "cv.json")))
    rows = []
    for fold in summary["folds"]:
        rows.append([fold["fold"], fold.get("val_images"), fold.get("epochs"),
                     fold.get("best_epoch")] + [_number(fold[when].get(key))
                                                for when in ("last", "best")
                                                for key in ("n_iou", "n_iou_per_image", "dice")])
    for name, pick in (("mean", "mean"), ("spread (sd)", "std")):
        rows.append([name, "", "", ""] + [_number(summary.get(f"{when}_{key}_{pick}"))
                                          for when in ("last", "best")
                                          for key in ("n_iou", "n_iou_per_image", "dice")])
    if summary.get("last_pooled"):  # cv.json from before the folds kept their totals has none
        rows.append(["pooled", sum(f.get("val_images") or 0 for f in summary["folds"]), "", ""]
                    + [_number((summary.get(f"{when}_pooled") or {}).get(key))
                       for when in ("last", "best")
                       for key in ("n_iou", "n_iou_per_image", "dice")])
    header = ["fold", "val frames", "epochs", "best epoch", "last n_IoU", "last n_IoU/img",
              "last Dice", "best n_IoU", "best n_IoU/img", "best Dice"]
    histories = {f"fold {fold['fold']}": _read_lines(storage.join(
        run_uri, f"fold-{fold['fold']}", "history.jsonl")) for fold in summary["folds"]}
    _put(folder, "folds.png", figures.fold_curves(histories))
    sections = [f"<h2>{html.escape(str(summary['k']))}-fold cross-validation</h2>"
                f"<p class=\"note\">data: {html.escape(str(summary.get('data')))}; each fold "
                f"validates on cases no other fold has; last: the fold's final epoch (no "
                f"selection on the fold itself), best: its best epoch; pooled: every fold's "
                f"frames scored as one set (each frame weighs by its pixels)</p>"
                + _table(rows, header),
                "<img class=\"plot\" src=\"folds.png\" alt=\"validation n_IoU by epoch, one "
                "line per fold\">"]
    from . import model

    model_json = storage.join(run_uri, "model", model.MODEL_JSON)
    if storage.exists(model_json):
        sections.append(_variants_section(
            model.ModelInfo.from_json(json.loads(storage.read_text(model_json)))))
    return _write_page(folder, "raythyroid cv report", sections)


def _scores_section(named: list[tuple[str, dict]]) -> str:
    header = ["split"] + [name for name, _ in metrics.TABLE_COLUMNS] + ["frames"]
    rows = [[name] + [_number(scores.get(key)) for _, key in metrics.TABLE_COLUMNS]
            + [scores.get("images", "")] for name, scores in named if scores]
    return "<h2>scores</h2>" + _table(rows, header)


def _tta(variant: dict) -> str:
    from . import model

    return model.describe_tta(bool(variant.get("tta")), variant.get("tta_zoom", 0.0))


def _variants_section(info) -> str:
    """The inference the model ships with and why: every variant's validation score."""
    variants = info.inference_variants
    chosen = {"tta": info.inference.tta, "tta_zoom": info.inference.tta_zoom,
              "threshold": info.inference.post.threshold,
              "keep_largest": info.inference.post.keep_largest}
    said = html.escape(f"TTA {_tta(chosen)}, threshold {chosen['threshold']}, components "
                       f"kept {chosen['keep_largest'] or 'all'}")
    lines = [f"<h2>inference</h2><p>chosen on validation: {said}</p>"]
    if variants:
        rows = [["chosen" if all(v.get(k, 0.0) == chosen[k] for k in chosen) else "", _tta(v),
                 v.get("threshold"), v.get("keep_largest") or "all",
                 _number(v.get("val_n_iou")), _number(v.get("val_n_iou_per_image"))]
                for v in sorted(variants, key=lambda v: -(v.get("val_n_iou") or 0))]
        lines.append(_table(rows, ["", "TTA", "threshold", "components kept",
                                   "val n_IoU", "val n_IoU/img"]))
    return "\n".join(lines)


def _worst_validation_section(run_uri: str, info, folder: str) -> str:
    """The validation frames the shipped model does worst on, redrawn from the prepared data
    with the chosen inference (label green, prediction red)."""
    try:
        worst = _validation_scores(run_uri, info)
    except Exception as exc:  # the data moved or is unreadable: the rest of the page stands
        return (f"<h2>the worst validation frames</h2><p class=\"note\">not drawn: "
                f"{html.escape(storage.describe_error(exc))}</p>")
    cells = []
    for rank, (iou, key, picture) in enumerate(worst, 1):
        name = f"worst/{rank:03d}.jpg"
        _put(folder, name, picture)
        cells.append(f"<figure data-key=\"{html.escape(key)}\"><img src=\"{name}\" "
                     f"alt=\"overlay of {html.escape(key)}\"><figcaption><b>"
                     f"{html.escape(key)}</b><br>IoU {iou:.3f}</figcaption></figure>")
    return ("<h2>the worst validation frames</h2><p class=\"note\">red: the model's outline; "
            "green: the label's</p><div class=\"grid\" id=\"worst-validation\">"
            + "\n".join(cells) + "</div>")


def _set_labels(uris: list[str]) -> dict[str, str]:
    """What goes before a frame's key: nothing for one set; for several (whose keys may
    coincide) the set's folder name, or its whole URI where two share a name."""
    if len(uris) < 2:
        return {uri: "" for uri in uris}
    names = [storage.basename(uri) for uri in uris]
    return {uri: (name if names.count(name) == 1 else uri) + "/"
            for uri, name in zip(uris, names)}


def _validation_scores(run_uri: str, info) -> list[tuple[float, str, bytes]]:
    """(IoU in original geometry, key, overlay) of the worst validation frames, worst first."""
    import torch

    from . import imaging, model, postprocess, shards

    rows = []
    for data, label in _set_labels(info.data_uris).items():
        rows += [dict(row, key=label + row["key"])
                 for row in shards.read_rows(data, shards.read_manifest(data), "val",
                                             ["key", "image", "geometry", "full_mask"])]
    net, _ = model.load(storage.join(run_uri, "model"))
    post = info.inference.post
    scored = []
    for start in range(0, len(rows), 16):
        part = rows[start:start + 16]
        images = np.stack([imaging.decode_png(r["image"]) for r in part])
        with torch.no_grad():
            prob = model.nodule_probability(net, torch.from_numpy(images), torch.device("cpu"),
                                            flip_tta=info.inference.tta,
                                            zoom=info.inference.tta_zoom).numpy()
        for row, image, p in zip(part, images, prob):
            geometry = imaging.Geometry.from_dict(row["geometry"])
            mask = postprocess.clean_mask(geometry.restore_as_infer_keeps(p), post)
            label = imaging.decode_png(row["full_mask"]) > 0
            counts = metrics.counts(label, mask)
            iou = metrics.image_iou(counts["tp"], counts["fp"], counts["fn"])
            # kept small: the prepared square and both masks mapped into it
            scored.append((iou, row["key"], image, geometry.to_model(mask),
                           geometry.to_model(label)))
    worst = sorted(scored, key=lambda s: (s[0], s[1]))[:WORST_VALIDATION]
    return [(iou, key, figures.thumbnail(image, mask, label))
            for iou, key, image, mask, label in worst]


# ---------------------------------------------------------------- page helpers

def _write_page(folder: str, title: str, sections: list[str]) -> str:
    made = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1><p class=\"note\">written {made}</p>\n"
            + "\n".join(sections) + "\n</body></html>\n")
    uri = storage.join(folder, INDEX)
    storage.write_bytes(uri, page.encode("utf-8"), "text/html; charset=utf-8")
    return uri


def _put(folder: str, name: str, data: bytes) -> None:
    """A picture of the page, typed for a browser served from a bucket."""
    kind = "image/png" if name.endswith(".png") else "image/jpeg"
    storage.write_bytes(storage.join(folder, name), data, kind)


def _table(rows, header: list[str] | None = None, numeric: bool = False) -> str:
    head = ("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
            if header else "")
    cell = "<td class=\"n\">{}</td>" if numeric else "<td>{}</td>"
    body = "".join("<tr>" + "".join(cell.format(html.escape(str(v))) for v in row) + "</tr>"
                   for row in rows)
    return f"<table>{head}{body}</table>"


def _clear(folder: str) -> None:
    """A rebuilt report holds only what this build wrote (a smaller queue leaves no strays)."""
    for uri in storage.list_files(folder):
        storage.delete(uri)


def _read_lines(uri: str) -> list[dict]:
    # exists first: a missing S3 object raises the SDK's own error, not FileNotFoundError
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line]


def _read_json(uri: str) -> dict | None:
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_text(uri))
    except ValueError:
        return None


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _area(row: dict) -> str:
    if row.get("area_mm2") is not None:
        return f"{row['area_mm2']:.1f} mm²"
    return f"{row['area_px']:,} px" if row.get("area_px") else "no nodule"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {rest:02d} s"
