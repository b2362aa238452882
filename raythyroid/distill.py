"""`raythyroid distill TEACHER DATA RUN --unlabelled INPUT...`: one fast student from a teacher.

Two Ray stages, each resumable:

    teach    Ray Data: DATA's labelled frames (prepared already) and every unlabelled INPUT
             (listed and prepared exactly as infer reads an archive: sources.py)
               -> TeacherPredictor actors: the teacher's own inference (ensemble, TTA)
               -> soft nodule probabilities, one Parquet part per block under taught/
             A part is the commit record: a rerun teaches only the sources no part holds.
    student  Ray Train (train's loop): the hard label where a frame has one and the teacher's
             soft target everywhere (losses.distilled), validated and tested on DATA's
             labelled splits like any train run; the inference chosen without TTA unless
             --allow-tta, so the student costs one network pass a frame.

With --folds K the run measures the recipe instead (cross-validation in which no frame that
scores a student taught it): fold k's teacher is member k of a cv ensemble (the model cv
trained without fold k's cases, folds dealt as cv deals them with the same --seed), it labels
the other folds' frames and the unlabelled ones, and the fold's student validates on fold k.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import (dicomweb, imaging, metrics, postprocess, results, runtime, shards, sources,
               storage, telemetry)
from . import training
from .errors import UserError

TAUGHT = "taught"
TAUGHT_SCHEMA = pa.schema([
    # a labelled frame's source is "data:KEY"; an unlabelled one's its URI (a cine's frames
    # share it, and a part never splits a source)
    ("source", pa.string()), ("key", pa.string()), ("case_id", pa.string()),
    ("labelled", pa.bool_()), ("status", pa.string()), ("error", pa.string()),
    ("image", pa.binary()), ("mask", pa.binary()), ("soft", pa.binary()),
    ("confidence", pa.float32())])
LABELLED_SOURCE = "data:"


@dataclasses.dataclass(frozen=True)
class DistillOptions:
    unlabelled: tuple[str, ...] = ()
    # unlabelled frames whose teacher confidence (postprocess.confidence) is lower are left out
    min_confidence: float = 0.0
    folds: int = 0  # >= 2: cross-validate the recipe instead of training the student to ship
    # the student starts from the teacher's weights: member k in fold k (the one that never saw
    # the fold), an ensemble's first member otherwise
    from_teacher: bool = False
    workers: int = 1  # Ray Train workers of the student
    teachers: int = 1  # TeacherPredictor actors
    gpu: bool = False
    cpus_per_worker: float | None = None
    batch_size: int = 16  # the teacher's
    block_size: int = sources.URIS_PER_BLOCK
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS
    metrics_port: int | None = None


# ---------------------------------------------------------------- stage 1: the teacher

def _frame_columns(metas: list[dict], images: list, masks: list) -> dict:
    return {"source": np.array([m["source"] for m in metas], dtype=object),
            "key": np.array([m["key"] for m in metas], dtype=object),
            "case_id": np.array([m["case_id"] for m in metas], dtype=object),
            "labelled": np.array([m["labelled"] for m in metas], bool),
            "status": np.array([m["status"] for m in metas], dtype=object),
            "error": np.array([m["error"] or "" for m in metas], dtype=object),
            "ok": np.array([m["status"] == "ok" for m in metas], bool),
            "image": np.stack(images), "mask": np.stack(masks)}


def read_block(batch: pa.Table, prep: dict, max_pixels: int):
    """A block of sources -> chunks of prepared frames. Labelled rows carry their prepared
    image and mask (PNG) from DATA; unlabelled rows are read and prepared as infer reads them
    (bad inputs become error or skipped rows there, with their reason)."""
    size = prep["size"]
    blank = np.zeros((size, size), np.uint8)
    given = batch.filter(pc.is_valid(batch.column("image")))
    if given.num_rows:
        metas = [{"source": r["source"], "key": r["key"], "case_id": r["case_id"],
                  "labelled": True, "status": "ok", "error": None} for r in given.to_pylist()]
        yield _frame_columns(metas, [imaging.decode_png(b) for b in given.column("image")
                                     .to_pylist()],
                             [imaging.decode_png(b) for b in given.column("mask").to_pylist()])
    archive = batch.filter(pc.is_null(batch.column("image")))
    if not archive.num_rows:
        return
    for chunk in sources.read_and_prepare(archive.select(["key", "source_uri"]), prep,
                                          max_pixels):
        metas = [{"source": uri, "key": key, "case_id": "", "labelled": False,
                  "status": status, "error": error}
                 for uri, key, status, error in zip(chunk["source_uri"], chunk["key"],
                                                    chunk["status"], chunk["error"])]
        yield _frame_columns(metas, list(chunk["image"]), [blank] * len(metas))


class TeacherPredictor:
    """The teacher loaded once per actor (one member of an ensemble where asked); the nodule
    probability of every ok frame with the teacher's own TTA, and its confidence."""

    def __init__(self, model_uri: str, member: int | None, threads: int, precision: str,
                 batch_size: int, gpu: bool = False):
        import torch

        from . import model as model_lib

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if gpu else "cpu")
        self.net, info = model_lib.load(model_lib.resolve(model_uri), self.device,
                                        member=member)
        self.bf16 = model_lib.resolve_bf16(precision, self.device)
        self.tta, self.zoom = info.inference.tta, info.inference.tta_zoom
        self.post = info.inference.post
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        import torch

        from . import model as model_lib

        ok = batch["ok"]
        soft = np.zeros(batch["image"].shape, np.uint8)
        confidence = np.zeros(len(ok), np.float32)
        todo = np.flatnonzero(ok)
        for start in range(0, len(todo), self.batch_size):
            rows = todo[start:start + self.batch_size]
            # one batch shape for every pass (as infer's Predictor): a retried block gets the
            # same probabilities bit for bit
            padded = np.zeros((self.batch_size,) + batch["image"].shape[1:], np.uint8)
            padded[:len(rows)] = batch["image"][rows]
            with telemetry.timed("predict", pipeline="distill"):
                prob = model_lib.nodule_probability(self.net, torch.from_numpy(padded),
                                                    self.device, self.bf16, self.tta,
                                                    self.zoom)[:len(rows)].cpu().numpy()
            for row, p in zip(rows, prob):
                soft[row] = np.clip(np.rint(p * 255), 0, 255).astype(np.uint8)
                confidence[row] = postprocess.confidence(
                    postprocess.clean_mask(p, self.post), p, self.post.threshold)
        return dict(batch, soft=soft, confidence=confidence)


def commit_block(batch: dict, taught_uri: str) -> dict:
    """Write one chunk's frames as a part named by its sources: the commit record."""
    ok = batch["ok"]
    table = pa.table({
        "source": pa.array(list(batch["source"]), pa.string()),
        "key": pa.array(list(batch["key"]), pa.string()),
        "case_id": pa.array(list(batch["case_id"]), pa.string()),
        "labelled": pa.array(batch["labelled"], pa.bool_()),
        "status": pa.array(list(batch["status"]), pa.string()),
        "error": pa.array([e or None for e in batch["error"]], pa.string()),
        "image": pa.array([imaging.encode_png(i) if o else None
                           for i, o in zip(batch["image"], ok)], pa.binary()),
        "mask": pa.array([imaging.encode_png(m) if o else None
                          for m, o in zip(batch["mask"], ok)], pa.binary()),
        "soft": pa.array([imaging.encode_png(s) if o else None
                          for s, o in zip(batch["soft"], ok)], pa.binary()),
        "confidence": pa.array(np.where(ok, batch["confidence"], np.nan), pa.float32()),
    }, schema=TAUGHT_SCHEMA)
    # named by its frames' keys, as infer's results files: two chunks never share a name
    storage.write_parquet(storage.join(taught_uri, results.block_name(batch["key"])), table)
    return {"sources": np.array([len(set(batch["source"]))]),
            "errors": np.array([int(np.sum(batch["status"] == "error"))]),
            "skipped": np.array([int(np.sum(batch["status"] == "skipped"))])}


def read_taught(taught_uri: str, columns: list[str]) -> pa.Table:
    return results.read_parts(taught_uri, TAUGHT_SCHEMA, columns)


def _labelled_rows(data: str, manifest: dict, splits) -> pa.Table:
    rows = shards.read_rows(data, manifest, splits, ["key", "case_id", "image", "mask"])
    return pa.table({"source": [LABELLED_SOURCE + r["key"] for r in rows],
                     "key": [r["key"] for r in rows], "source_uri": [""] * len(rows),
                     "case_id": [r["case_id"] for r in rows],
                     "image": pa.array([r["image"] for r in rows], pa.binary()),
                     "mask": pa.array([r["mask"] for r in rows], pa.binary())})


def list_unlabelled(inputs: tuple[str, ...], labelled_sources: set[str], log
                    ) -> tuple[pa.Table, list[dict]]:
    """Every unlabelled INPUT listed as infer lists it; keys prefixed by the input's place
    (u0/, u1/...) so two archives' names never meet, nor DATA's. A source listed twice is
    taught once, and DATA's own frames (an archive DATA was prepared from) are left out: a
    validation or test frame must never reach the student through its teacher."""
    tables, problems, seen = [], [], set(labelled_sources)
    for i, uri in enumerate(inputs):
        if not dicomweb.is_dicomweb(uri):
            uri = storage.normalize(uri)
        table, clashes = sources.list_inputs(uri, lambda line: log(f"distill: {line}"))
        if table.num_rows == 0 and not clashes:
            raise UserError(f"no images found under {uri}")
        fresh = [uri not in seen for uri in table.column("source_uri").to_pylist()]
        left_out = len(fresh) - sum(fresh)
        if left_out:
            log(f"distill: {left_out} source(s) of {uri} are DATA's frames or listed before: "
                f"left out")
        table = table.filter(pa.array(fresh, pa.bool_()))
        seen.update(table.column("source_uri").to_pylist())
        keys = [f"u{i}/{k}" for k in table.column("key").to_pylist()]
        uris = table.column("source_uri").to_pylist()
        tables.append(pa.table({"source": uris, "key": keys, "source_uri": uris,
                                "case_id": [""] * len(keys),
                                "image": pa.nulls(len(keys), pa.binary()),
                                "mask": pa.nulls(len(keys), pa.binary())}))
        problems += [dict(p, key=f"u{i}/{p['key']}") for p in clashes]
    return (pa.concat_tables(tables) if tables else _source_rows_schema().empty_table(),
            problems)


def _source_rows_schema() -> pa.Schema:
    return pa.schema([("source", pa.string()), ("key", pa.string()),
                      ("source_uri", pa.string()), ("case_id", pa.string()),
                      ("image", pa.binary()), ("mask", pa.binary())])


def teach(teacher: str, member: int | None, todo: pa.Table, problems: list[dict],
          taught_uri: str, prep: dict, options: DistillOptions, log) -> None:
    """The teacher's soft labels for every source in `todo` that no part under taught_uri
    holds yet (exactly once: a rerun after any stop labels only the rest)."""
    import ray

    done = set(read_taught(taught_uri, ["source"]).column("source").to_pylist())
    pending = todo.filter(pa.array([s not in done for s in todo.column("source").to_pylist()],
                                   pa.bool_()))
    problems = [p for p in problems if p["source_uri"] not in done]
    who = f"member {member} of {teacher}" if member is not None else teacher
    log(f"distill: teacher {who}: {todo.num_rows + len(problems)} sources, {len(done)} "
        f"already labelled, {pending.num_rows + len(problems)} to label")
    if problems:
        commit_block(_problem_columns(problems, prep["size"]), taught_uri)
    with telemetry.tracked("distill", storage.basename(taught_uri), options.metrics_port,
                           pending.num_rows, unit="sources") as progress:
        if not pending.num_rows:
            return
        cpus, threads = runtime.plan_workers(options.teachers, options.gpu,
                                             options.cpus_per_worker)
        blocks = [pending.slice(i, options.block_size)
                  for i in range(0, pending.num_rows, options.block_size)]
        ds = (ray.data.from_arrow(blocks)
              .map_batches(read_block, fn_kwargs={"prep": prep, "max_pixels": options.max_pixels},
                           batch_size=None, batch_format="pyarrow",
                           memory=sources.READ_TASK_MEMORY)
              .map_batches(TeacherPredictor,
                           fn_constructor_kwargs={"model_uri": teacher, "member": member,
                                                  "threads": threads, "precision": "auto",
                                                  "batch_size": options.batch_size,
                                                  "gpu": options.gpu},
                           compute=ray.data.ActorPoolStrategy(size=options.teachers),
                           batch_size=None, batch_format="numpy",
                           num_cpus=cpus, num_gpus=1 if options.gpu else 0)
              .map_batches(commit_block, fn_kwargs={"taught_uri": taught_uri},
                           batch_size=None, batch_format="numpy"))
        printer = telemetry.ProgressPrinter(progress, log)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            progress.advance(int(batch["sources"].sum()), int(batch["errors"].sum()),
                             int(batch["skipped"].sum()))
            printer.update()


def _problem_columns(problems: list[dict], size: int) -> dict:
    """Listing problems (name clashes) as error rows of their own part."""
    blank = np.zeros((size, size), np.uint8)
    metas = [{"source": p["source_uri"], "key": p["key"], "case_id": "", "labelled": False,
              "status": "error", "error": p["error"]} for p in problems]
    columns = _frame_columns(metas, [blank] * len(metas), [blank] * len(metas))
    return dict(columns, soft=columns["mask"], confidence=np.zeros(len(metas), np.float32))


# ---------------------------------------------------------------- stage 2: the student

def decode_taught(rows: pa.Table, with_weights: bool, size: int, min_confidence: float,
                  held_out: frozenset = frozenset()) -> dict:
    """Taught rows -> the columns a student's training step reads: train's (image, mask,
    part, weight) plus the teacher's soft target and whether the mask is a label. Left out:
    error rows, unlabelled frames under the confidence bar, and labelled frames of the fold
    held out (cross-validation)."""
    labelled = rows.column("labelled")
    keep = pc.and_(pc.equal(rows.column("status"), "ok"), pc.or_(
        pc.and_(labelled, pc.invert(pc.is_in(rows.column("key"),
                                             value_set=pa.array(sorted(held_out), pa.string())))),
        pc.and_(pc.invert(labelled),
                pc.greater_equal(rows.column("confidence"), min_confidence))))
    rows = rows.filter(keep)
    if not rows.num_rows:
        empty = {"image": np.zeros((0, size, size), np.uint8),
                 "mask": np.zeros((0, size, size), np.uint8),
                 "soft": np.zeros((0, size, size), np.uint8),
                 "labelled": np.zeros(0, np.uint8), "part": np.zeros(0, np.int64)}
        if with_weights:
            empty["weight"] = np.zeros((0, size, size), np.float16)
        return empty
    out = training.decode_block(rows, with_weights)
    out["soft"] = np.stack([imaging.decode_png(b) for b in rows.column("soft").to_pylist()])
    out["labelled"] = np.array(rows.column("labelled").to_pylist(), np.uint8)
    return out


def _student_set(taught_uri: str, config: training.TrainConfig, size: int,
                 options: DistillOptions, held_out: frozenset = frozenset()):
    uris = storage.list_files(taught_uri, (".parquet",))
    return training.read_shards(uris, ["key", "labelled", "status", "confidence", "image", "mask",
                                    "soft"], decode_taught,
                             with_weights=config.loss == "weighted-ce", size=size,
                             min_confidence=options.min_confidence,
                             held_out=held_out).materialize()


def _check_teacher(teacher: str, manifest: dict, folds: int, seed: int):
    """The teacher's ModelInfo, once it is known to fit DATA and --folds."""
    from . import model as model_lib

    info = model_lib.read_info(model_lib.resolve(teacher))
    info.check_prepared(f"the teacher {teacher}", "DATA", manifest)
    members = info.members if info.ensemble else 0
    if folds and members != folds:
        raise UserError(f"--folds {folds} needs a teacher that cv built with {folds} folds "
                        f"(its member k trained without fold k); {teacher} has "
                        f"{members or 'no'} members")
    if folds and info.cv_seed is not None and info.cv_seed != seed:
        raise UserError(f"{teacher}'s cv dealt its folds with --seed {info.cv_seed}: give the "
                        f"same --seed, or fold k's teacher would have trained on fold k's "
                        f"frames")
    return info


def run(teacher: str, data: str, run_uri: str, config: training.TrainConfig,
        options: DistillOptions = DistillOptions(), log=print) -> dict:
    """Teach, then train the student (or, with folds, cross-validate the recipe)."""
    from . import model as model_lib

    prepared, run_uri = shards.read_prepared(data), storage.normalize(run_uri)
    data, manifest = prepared.uris[0], prepared.sets[0].manifest
    finished = storage.join(run_uri, "cv.json" if options.folds else "metrics.json")
    if storage.exists(finished):
        log(f"distill: {run_uri} is already finished; nothing to do")
        return json.loads(storage.read_text(finished))
    info = _check_teacher(teacher, manifest, options.folds, config.seed)
    if not manifest["counts"].get("val") and not options.folds:
        raise UserError(f"{data} has no validation rows; preprocess with a val fraction > 0")
    if options.from_teacher and config.init:
        raise UserError("give one of --from-teacher and --init")
    data_sources = {r["source_uri"] for r in shards.read_rows(
        data, manifest, ["train", "val", "test"], ["source_uri"])}
    unlabelled, problems = list_unlabelled(options.unlabelled, data_sources, log)
    teacher_ref = teacher if model_lib.resolve(teacher) != teacher else storage.normalize(teacher)
    provenance = {"teacher": teacher_ref, "teacher_weights": info.weights_sha256[:16],
                  # a PACS query as written: its credentials come from the environment
                  "unlabelled": [u if dicomweb.is_dicomweb(u) else storage.normalize(u)
                                 for u in options.unlabelled],
                  "min_confidence": options.min_confidence,
                  "soft_weight": config.soft_weight, "temperature": config.temperature}
    if options.folds:
        return _cross_validate(teacher, prepared, run_uri, config, options, unlabelled,
                               problems, provenance, log)
    if options.from_teacher:
        config = dataclasses.replace(config, init=_member_folder(
            teacher, 0, storage.join(run_uri, "init")))
    labelled = _labelled_rows(data, manifest, "train")
    taught = storage.join(run_uri, TAUGHT)
    teach(teacher, None, pa.concat_tables([labelled, unlabelled]), problems, taught,
          manifest["prep"], options, log)
    return _train_student(taught, prepared, run_uri, config, options, provenance,
                          log).test or {}


def _train_student(taught, prepared, run_uri, config, options, provenance, log,
                   val=None, held_out=frozenset(), with_test=True) -> training.TrainState:
    training.check_resume(run_uri, config)
    size = prepared.prep["size"]

    def datasets() -> dict:
        log(f"distill: training the student on {taught}")
        found = {"train": _student_set(taught, config, size, options, held_out),
                 "val": val if val is not None else training.load_split(prepared, "val",
                                                                        full=True)}
        test = training.load_split(prepared, "test", full=True) if with_test else None
        if test is not None:
            found["test"] = test
        return found

    with telemetry.tracked("distill", storage.basename(run_uri), options.metrics_port, 0,
                           unit="steps") as progress:
        return training.train_and_save(run_uri, config, datasets, prepared, options.workers,
                                    options.gpu, options.cpus_per_worker, log, progress,
                                    job="distill", extra={"distillation": provenance},
                                    write_metrics=with_test)


def _cross_validate(teacher, prepared, run_uri, config, options, unlabelled, problems,
                    provenance, log) -> dict:
    """Fold k: member k of the teacher labels the other folds' frames and the unlabelled
    ones; a student trains on them and validates on fold k, which neither saw."""
    from ray.data.expressions import col

    # the folds cv dealt the teacher's members with (the same --seed; _check_teacher)
    dealt = training.deal_folds(prepared, options.folds, config.seed)
    key_fold = dealt.by_set[0]
    pooled = training.load_split(prepared, ["train", "val"], folds=dealt, full=True)
    data, manifest = prepared.uris[0], prepared.sets[0].manifest
    labelled = _labelled_rows(data, manifest, ["train", "val"])
    results = []
    for k in range(options.folds):
        fold_uri = storage.join(run_uri, f"fold-{k}")
        done = storage.join(fold_uri, "fold.json")
        if not storage.exists(done):
            held_out = frozenset(key for key, fold in key_fold.items() if fold == k)
            teachable = labelled.filter(pc.invert(pc.is_in(
                labelled.column("key"), value_set=pa.array(sorted(held_out), pa.string()))))
            taught = storage.join(fold_uri, TAUGHT)
            teach(teacher, k, pa.concat_tables([teachable, unlabelled]), problems, taught,
                  manifest["prep"], options, log)
            fold_config = dataclasses.replace(config, seed=config.seed + k)
            if options.from_teacher:
                fold_config = dataclasses.replace(
                    fold_config, init=_member_folder(teacher, k, storage.join(fold_uri, "init")))
            val = pooled.filter(expr=col("fold") == k).materialize()
            state = _train_student(taught, prepared, fold_uri, fold_config, options,
                                   dict(provenance, teacher_member=k), log, val=val,
                                   held_out=held_out, with_test=False)
            last = state.history[-1]
            storage.write_text(done, json.dumps({
                "fold": k, "epochs": state.epoch, "best_epoch": state.best["epoch"],
                "val_images": last.get("val_images"),
                "last": {m: last.get(f"val_{m}") for m in ("n_iou", "n_iou_per_image", "dice")},
                "last_totals": last.get("val_totals"),
                "inference_totals": _chosen_totals(state.inference)}, indent=2))
        results.append(json.loads(storage.read_text(done)))
        log(f"distill: fold {k}: val n_IoU {results[-1]['last']['n_iou']:.4f} (last epoch)")
    summary = {"k": options.folds, "data": data, "config": config.to_dict(),
               "distillation": provenance, "folds": results}
    for which in ("last_totals", "inference_totals"):
        summed = sum((metrics.Totals.read(r[which]) for r in results), metrics.Totals())
        summary[which.replace("totals", "pooled")] = summed.metrics()
    storage.write_text(storage.join(run_uri, "cv.json"), json.dumps(summary, indent=2))
    log(f"distill: cv pooled n_IoU {summary['last_pooled']['n_iou']:.4f} at the last epoch, "
        f"{summary['inference_pooled']['n_iou']:.4f} with each fold's chosen inference "
        f"(over {sum(r['last']['n_iou'] is not None for r in results)} folds)")
    return summary


def _member_folder(teacher: str, member: int, folder: str) -> str:
    """One member of the teacher as a model folder of its own (what --init reads); a single
    model is its own member 0."""
    from . import model as model_lib

    if not storage.exists(storage.join(folder, model_lib.MODEL_JSON)):
        net, info = model_lib.load(model_lib.resolve(teacher), member=member)
        model_lib.save(net, folder, {"prep": info.prep.to_dict(),
                                     "classes": model_lib.CLASS_NAMES,
                                     **info.inference.to_json(), "member_of": teacher,
                                     "member": member})
    return folder


def _chosen_totals(inference: dict) -> dict:
    """The totals of the variant a fold's student chose on its validation frames."""
    post = inference["postprocess"]
    return next(v["val_totals"] for v in inference["val_variants"]
                if v["tta"] == inference["tta"] and v["tta_zoom"] == inference["tta_zoom"]
                and v["threshold"] == post["threshold"]
                and v["keep_largest"] == post["keep_largest"])

