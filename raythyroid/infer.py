"""The infer job: segment a whole archive, exactly once, resumable; metrics from the union of rows.

    URIs (paginated listing or a manifest) in blocks
      -> read + decode + imaging.prepare          CPU tasks, threads overlap the reads
      -> Predictor                                actor pool, model loaded once, batched
      -> post-process + masks + results/*.parquet CPU tasks, one results file per block

A results file is written atomically under a name derived from the keys it holds, after that
block's masks, so it is the commit record: a rerun with the same OUTPUT skips every source already
in a results file and processes the rest, and metrics are computed from all results files
together, so an interrupted-then-resumed run ends with exactly the metrics of a clean run.
A new version of the model goes on in the same OUTPUT (claim.claim_output): every row names the
version that made it, and what other versions committed is kept unless redone on request.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from . import (claim, dicomweb, evaluate, imaging, metrics, modelinfo, outputs, postprocess,
               registry, report, results, review_bar, runtime, sources, storage, telemetry)
from .errors import UserError


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
    fast: bool = False  # the model's one-pass network alone (modelinfo.one_pass)
    # STOW-RS every SEG to this DICOMweb server (http(s)://host:port/prefix); implies dicom_seg
    stow: str | None = None
    review: int = report.REVIEW_SIZE  # frames in the report's review queues (0: no overlays)
    # MODEL is a new version of the model OUTPUT holds (automatic for another version of the
    # same registered or bundled model): OUTPUT goes on with it, each row naming its version
    new_version: bool = False
    redo_older: bool = False  # also redo what other model versions committed to OUTPUT


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
        if precision == "int8":  # the driver checked: a CPU, a model with int8 weights
            from . import int8

            self.net, info = int8.load(model_lib.resolve(model_uri))
        else:
            self.net, info = model_lib.load(model_lib.resolve(model_uri), self.device,
                                            fast=fast)
        if compile_model:  # one fixed batch shape (see __call__), so one compilation
            self.net = torch.compile(self.net)
        self.bf16 = precision != "int8" and model_lib.resolve_bf16(precision, self.device)
        self.tta = tta
        self.zoom = info.inference.tta_zoom if tta else 0.0  # TTA as the model chose it
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


@dataclass(frozen=True)
class SharedReviewBar:
    """The run's one ReviewBar, an actor on the driver's node (it shares the driver's fate,
    not a worker node's), as every block's finish task offers its frames to it."""

    actor: object

    @classmethod
    def start(cls, size: int) -> "SharedReviewBar":
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        return cls(ray.remote(num_cpus=0, scheduling_strategy=here)(review_bar.ReviewBar
                                                                    ).remote(size))

    def offer(self, values: dict) -> dict | None:
        """ReviewBar.offer, or None when the bar is lost (its node died)."""
        import ray

        try:
            return ray.get(self.actor.offer.remote(values), timeout=60)
        except (ray.exceptions.RayError, TimeoutError):
            return None


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


def check_precision(info: modelinfo.ModelInfo, options: InferOptions, folder: str,
                    name: str | None = None) -> None:
    """int8 needs a one-network model's int8 weights (`raythyroid quantize`), on a CPU; `name`
    is MODEL as the user gave it (a bundled model's folder is an installation path)."""
    if options.precision != "int8":
        return
    if options.fast:
        raise UserError("--fast runs a model's one-pass network and --precision int8 a "
                        "one-network model's int8 weights: give one of them")
    if not (info.int8 or {}).get("weights") or not info.int8.get("sha256"):
        raise UserError(f"--precision int8: {name or folder} has no int8 weights (`raythyroid "
                        f"quantize` writes them for a one-network model)")
    if not storage.exists(storage.join(folder, info.int8["weights"])):
        raise UserError(f"--precision int8: {name or folder} names int8 weights "
                        f"{info.int8['weights']} that are not there: run `raythyroid quantize` "
                        f"again")
    if options.gpu or options.compile:
        raise UserError("--precision int8 runs uncompiled on CPUs: drop --gpu and --compile")


def weights_id(info: modelinfo.ModelInfo, options: InferOptions) -> str:
    """The hash of the weights that make the masks: the int8 ones with --precision int8."""
    return info.int8["sha256"] if options.precision == "int8" else info.weights_sha256


def run(model_uri: str, input_uri: str, output: str, labels: str | None = None,
        options: InferOptions = InferOptions(), log=print) -> claim.InferSummary:
    """Segment INPUT into OUTPUT; returns its summary (with metrics, given labels)."""
    started = time.time()
    if registry.is_registry_uri(model_uri):
        model_uri = registry.pin(model_uri)  # every node loads the version the alias names now
    # a bundled or registry model travels by name: each node resolves it where it runs
    resolved = modelinfo.resolve(model_uri)
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
    info = modelinfo.read_info(model_uri, fast=options.fast)
    check_precision(info, options, model_uri)
    prep, post = info.prep, info.inference.post
    if options.fast:
        options = dataclasses.replace(options, tta=False)
    elif options.tta is None:
        options = dataclasses.replace(options, tta=info.inference.tta)
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
           "weights": weights_id(info, options)[:16], "tta": options.tta,
           "tta_zoom": info.inference.tta_zoom if options.tta else 0.0,
           "postprocess": post.to_dict()}
    if options.fast:
        job["fast"] = True
    if options.precision == "int8":  # as --fast: other weights under the same MODEL
        job["int8"] = True
    versions = claim.claim_output(output, job,
                                  new_version=options.new_version)
    storage.delete(storage.join(output, results.SUCCESS))
    run_id = claim.take_lease(output)
    claim.begin(output, versions)
    work = claim.plan_work(output, versions.current, options.redo_older)
    pending, problems = _pending(table, problems, work)
    log(f"infer: {table.num_rows + len(problems)} inputs, {len(work.done)} already done, "
        f"{pending.num_rows + len(problems)} to process with model version {versions.current}"
        + (f" ({work.redo.num_rows} done before and redone)" if work.redoing else ""))
    record = {"started": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(
                  timespec="seconds"),
              "processed": pending.num_rows + len(problems),
              "model_card": info.headline}
    with telemetry.tracked("infer", run_id, options.metrics_port,
                           pending.num_rows + len(problems)) as progress:
        plan = Plan(model_ref=model_ref, output=output, options=options, prep=prep, post=post,
                    seg=_seg_settings(info, options, versions.current), run_id=run_id,
                    labels=label_index, version=versions.current, redoing=work.redoing)
        _process(plan, pending, problems, progress, log)
        summary = _finish(output, table, problems, labels, options, started, record, log)
        claim.settle(work)
        return summary


def _pending(table: pa.Table, problems: list[dict], work: claim.Work
             ) -> tuple[pa.Table, list[dict]]:
    """What INPUT lists that is not done, and the committed sources to redo that it does not
    list (earlier nights' instances of a PACS query, say): read from where their rows say."""
    import pyarrow.compute as pc

    listed = table.column("source_uri").combine_chunks().cast(pa.string())
    pending = table.filter(pc.invert(pc.is_in(listed, value_set=pa.array(sorted(work.done),
                                                                        pa.string()))))
    problems = [p for p in problems if p["source_uri"] not in work.done]
    elsewhere = pa.concat_arrays([listed, pa.array([p["source_uri"] for p in problems],
                                                   pa.string())])
    more = work.redo.filter(pc.invert(pc.is_in(work.redo.column("source_uri"),
                                               value_set=elsewhere)))
    if more.num_rows:
        pending = pa.concat_tables([pending.select(["key", "source_uri"]).cast(
            results.SOURCES_SCHEMA), more.cast(results.SOURCES_SCHEMA)])
    return pending, problems


def _seg_settings(info, options: InferOptions, version: str) -> dict | None:
    if not (options.dicom_seg or options.stow):
        return None
    # the weights' identity enters every SEG UID: another model's SEG is another object
    return {"stow": options.stow, "model_id": weights_id(info, options)[:32],
            "model_version": version}


@dataclass(frozen=True)
class Plan:
    """What this run does to every pending input, settled by the driver before the first read."""

    model_ref: str  # a bundled model's name (each node resolves it), else its URI
    output: str
    options: InferOptions
    prep: imaging.PrepConfig
    post: postprocess.PostConfig
    seg: dict | None  # _seg_settings: SEG (and STOW) or none
    run_id: str  # the lease every commit checks
    labels: dict | None  # label files by input key (--labels), else None
    version: str  # the model version every row names (results.version_label)
    redoing: bool  # some pending sources are committed already: their blocks note them


def _process(plan: Plan, pending: pa.Table, problems: list[dict], progress, log) -> None:
    import ray

    output, options, seg = plan.output, plan.options, plan.seg

    if problems:
        empty = {name: None for name in results.RESULT_SCHEMA.names}
        results.write_results(output, pa.Table.from_pylist(
            [dict(empty, status="error", model_version=plan.version, **p) for p in problems],
            schema=results.RESULT_SCHEMA))
        progress.advance(len(problems), len(problems))

    if pending.num_rows:
        pending = _attach_labels(pending, plan.labels)
        blocks = [pending.slice(i, options.block_size)
                  for i in range(0, pending.num_rows, options.block_size)]
        cpus, threads = runtime.plan_workers(options.workers, options.gpu,
                                             options.cpus_per_worker)
        review = {"size": options.review, "bar": SharedReviewBar.start(options.review)} \
            if options.review > 0 else None
        ds = (ray.data.from_arrow(blocks)
              .map_batches(sources.read_and_prepare, fn_kwargs={"prep": plan.prep.to_dict(),
                                                        "max_pixels": options.max_pixels,
                                                        "keep_header": seg is not None},
                           batch_size=None, batch_format="pyarrow",
                           # a memory reservation for decoding large frames; as it differs
                           # from the Predictor's resources, Ray Data also keeps this step in
                           # its own tasks instead of fusing it into the actors, so decoding
                           # runs beside the model, not in front of it
                           memory=sources.READ_TASK_MEMORY)
              .map_batches(Predictor,
                           fn_constructor_kwargs={"model_uri": plan.model_ref, "gpu": options.gpu,
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
              .map_batches(outputs.finish_block,
                           fn_kwargs={"output": output, "post": plan.post.to_dict(),
                                      "max_pixels": options.max_pixels, "run_id": plan.run_id,
                                      "seg": seg, "review": review,
                                      "model_version": plan.version,
                                      "redoing": plan.redoing},
                           batch_size=None, batch_format="numpy"))
        printer = telemetry.ProgressPrinter(progress, log)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            progress.advance(int(np.sum(batch["first_frame"])),
                             int(np.sum(batch["status"] == "error")),
                             int(np.sum(batch["status"] == "skipped")))
            printer.update()


def _finish(output, table, problems, labels, options, started, record, log
            ) -> claim.InferSummary:
    summary = claim.summarize(output, table, problems, labels is not None)
    storage.write_text(storage.join(output, results.SUCCESS), json.dumps(
        {"images": summary.rows, "errors": summary.errors, "skipped": summary.skipped,
         "seconds": round(time.time() - started, 1), **record}))
    summary = dataclasses.replace(
        summary, report=report.write_at_end(output, options.review or report.REVIEW_SIZE),
        max_error_rate=options.max_error_rate)
    log(f"infer: {summary.rows} results, {summary.errors} errors, "
        f"{summary.skipped} skipped (not images), {summary.nodules} with a nodule; "
        f"masks in {storage.join(output, results.MASKS)}; report: {summary.report}")
    if summary.versions and len(summary.versions) > 1:
        log("infer: rows by model version: " + ", ".join(
            f"{label} {count}" for label, count in summary.versions.items()))
    if summary.metrics:
        log(metrics.table(summary.metrics, "infer, pooled over all labelled images"))
        if len(summary.metrics["by_version"]) > 1:
            for label, scores in summary.metrics["by_version"].items():
                log(f"infer: model version {label}: n_IoU {_shown(scores.get('n_iou'))} over "
                    f"{scores['images']} labelled images")
    return summary


def _shown(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"
