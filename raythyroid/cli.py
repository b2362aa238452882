"""The `raythyroid` command. User mistakes end in one line and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import os
import sys

from . import stopping
from .errors import UserError

EXIT_USAGE = 2
EXIT_TEMPORARY_FAILURE = 75  # sysexits' EX_TEMPFAIL: try again later


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints the whole usage block; one line
        raise UserError(f"{message} (see '{self.prog} --help')")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text}")
    return value


def _decay(text: str) -> float:
    value = _fraction(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a decay below 1, got {text}")
    return value


def _image_size(text: str) -> int:
    value = _positive_int(text)
    if value < 32 or value % 16:
        raise argparse.ArgumentTypeError(f"size must be a multiple of 16 and at least 32 "
                                         f"(the U-Net halves it four times), got {value}")
    return value


def _add_cluster_flag(parser: argparse.ArgumentParser, metrics: bool = True) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own output and warnings (workers' lines included)")
    if metrics:
        default = os.environ.get("RAYTHYROID_METRICS_PORT")
        parser.add_argument("--metrics-port", type=_port, default=int(default) if default else None,
                            help="serve job progress for Prometheus on this port "
                                 "(default: RAYTHYROID_METRICS_PORT, else off)")


def _add_register_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--register", default=None, metavar="NAME",
                        help="a new version of this model in MLflow's registry once the run "
                             "ends (MLFLOW_TRACKING_URI, else MLflow's local store); with "
                             "MLFLOW_TRACKING_URI set every run is logged there")


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    from . import augment, losses, training
    from .training import TrainConfig

    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--epochs", type=_positive_int, default=None,
                        help=f"default {TrainConfig.epochs}; with --time-limit, as many as fit")
    parser.add_argument("--batch-size", type=_positive_int, default=TrainConfig.batch_size,
                        help="images per worker per step")
    parser.add_argument("--time-limit", type=_positive_float, default=None, metavar="MINUTES",
                        help="stop cleanly before this much wall time; the best model is kept")
    parser.add_argument("--loss", choices=losses.LOSSES, default=TrainConfig.loss)
    parser.add_argument("--optimizer", choices=training.OPTIMIZERS, default=TrainConfig.optimizer)
    parser.add_argument("--schedule", choices=training.SCHEDULES, default=TrainConfig.schedule)
    parser.add_argument("--lr", type=_positive_float, default=None,
                        help="peak learning rate (default 1e-3 AdamW, 1e-2 SGD)")
    parser.add_argument("--base", type=_positive_int, default=TrainConfig.base,
                        help="U-Net width: channels of the first level")
    parser.add_argument("--precision", choices=training.PRECISIONS, default=TrainConfig.precision,
                        help="auto: bf16 on GPUs and on CPUs with bf16 units, else fp32")
    parser.add_argument("--augment", choices=augment.PRESETS, default=TrainConfig.augment,
                        help="strong: affine, mirror, grid distortion, gamma, contrast, blur, "
                             "speckle; basic: without distortion and blur")
    parser.add_argument("--ema", type=_decay, default=TrainConfig.ema, metavar="DECAY",
                        help="validate and keep an exponential moving average of the weights "
                             f"with this decay per step; 0 keeps the trained weights "
                             f"(default {TrainConfig.ema})")
    parser.add_argument("--deep-supervision", type=int, choices=range(4),
                        default=TrainConfig.deep_supervision, metavar="LEVELS",
                        help="also supervise the decoder at 1/2, 1/4, ... resolution "
                             f"(default {TrainConfig.deep_supervision})")
    parser.add_argument("--init", metavar="MODEL", default=None,
                        help="start from this model's weights, not random ones: a model folder "
                             "(local or s3://) or a bundled model's name; an ensemble gives its "
                             "first member (pretraining, or fine-tuning on your own frames)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus-per-worker", type=_positive_float, default=None)


def _train_config(args: argparse.Namespace):
    from . import training
    from .training import TrainConfig

    return TrainConfig(
        epochs=args.epochs or (TrainConfig.epochs if args.time_limit is None
                               else training.TIME_LIMITED_EPOCHS),
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        schedule=args.schedule, loss=args.loss, base=args.base, augment=args.augment,
        precision=args.precision, seed=args.seed, time_limit_min=args.time_limit, ema=args.ema,
        deep_supervision=args.deep_supervision, init=args.init)


DATA_HELP = ("preprocess OUTPUT (local or s3://); several (public data and your own frames) "
             "train as one, each keeping its own split by case")


def build_parser() -> argparse.ArgumentParser:
    # the defaults a user sees are the ones the code runs with: named once, where they act
    from . import __version__, compare as compare_lib, imaging, layouts, report, training
    from .imaging import PrepConfig
    from .infer import InferOptions
    from .training import TrainConfig

    parser = _Parser(prog="raythyroid",
                     description="Thyroid nodule segmentation in ultrasound, as Ray jobs.")
    parser.add_argument("--version", action="version", version=f"raythyroid {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    pre = commands.add_parser("preprocess", help="image/mask sets -> Parquet shards by split")
    pre.add_argument("input", help="dataset root: local folder or s3://bucket/prefix; or a "
                                   "PACS's SEGs: dicomweb+http(s)://HOST:PORT/PREFIX?QIDO-filters")
    pre.add_argument("output", help="output folder or s3:// prefix")
    pre.add_argument("--layout", choices=layouts.LAYOUTS, default="auto")
    pre.add_argument("--size", type=_image_size, default=PrepConfig.size,
                     help="prepared image side (px)")
    pre.add_argument("--split", default="0.7,0.2,0.1", help="train,val,test fractions by case")
    pre.add_argument("--seed", type=int, default=0, help="split seed")
    pre.add_argument("--no-crop", action="store_true",
                     help="keep the whole frame (images without scanner borders or text)")
    pre.add_argument("--max-pixels", type=_positive_int, default=imaging.DEFAULT_MAX_PIXELS,
                     help="reject larger images (checked from the header before decoding)")
    pre.add_argument("--segs-from", choices=layouts.SEGS_FROM, default=layouts.DicomRules.segs_from,
                     help="dicom layout: which SEGs are masks: a person's (raythyroid's own, "
                          "never edited, left out) or any")
    pre.add_argument("--several-segs", choices=layouts.SEVERAL_SEGS,
                     default=layouts.DicomRules.several,
                     help="dicom layout: a frame several SEGs annotate takes the newest, or "
                          "each SEG after the first is an error row")
    _add_cluster_flag(pre)
    pre.set_defaults(handler=_preprocess)

    tr = commands.add_parser("train", help="DDP U-Net on Ray Train from preprocess shards")
    tr.add_argument("data", nargs="+", metavar="DATA", help=DATA_HELP)
    tr.add_argument("run", help="run folder for checkpoints, model/, metrics (local or s3://)")
    tr.add_argument("--workers", type=_positive_int, default=2)
    _add_register_flag(tr)
    _add_training_flags(tr)
    _add_cluster_flag(tr)
    tr.set_defaults(handler=_train)

    cv = commands.add_parser("cv", help="case-disjoint k-fold cross-validation (train + val)")
    cv.add_argument("data", nargs="+", metavar="DATA", help=DATA_HELP + "; each one's cases "
                    "are dealt into the folds among themselves")
    cv.add_argument("run", help="folder for the folds' runs and cv.json (local or s3://)")
    cv.add_argument("--folds", type=_positive_int, default=5)
    cv.add_argument("--workers", type=_positive_int, default=1, help="train workers per fold")
    _add_register_flag(cv)
    _add_training_flags(cv)
    _add_cluster_flag(cv)
    cv.set_defaults(handler=_cv)

    dis = commands.add_parser("distill", help="a one-pass student trained on a teacher's soft "
                                              "predictions over labelled and unlabelled frames")
    dis.add_argument("teacher", help="the model to distil: a model folder or a bundled name")
    dis.add_argument("data", help="preprocess OUTPUT: the labelled frames (prepared as the "
                                  "teacher's model.json prepares them)")
    dis.add_argument("run", help="run folder: the teacher's labels (taught/), checkpoints, "
                                 "model/, metrics (local or s3://); rerun to resume")
    dis.add_argument("--unlabelled", nargs="+", action="extend", default=[], metavar="INPUT",
                     help="frames without masks, any INPUT infer reads: folders, s3:// "
                          "prefixes, manifests, dicomweb+http(s):// queries")
    dis.add_argument("--min-confidence", type=_fraction, default=0.0,
                     help="leave out unlabelled frames the teacher is less confident of "
                          "(its soft IoU, as infer's confidence column; default 0: none)")
    dis.add_argument("--soft-weight", type=_fraction, default=TrainConfig.soft_weight,
                     help="the teacher's share of the loss; the rest is the labels' "
                          f"(default {TrainConfig.soft_weight})")
    dis.add_argument("--temperature", type=_positive_float, default=TrainConfig.temperature,
                     help=f"softens teacher and student alike (default {TrainConfig.temperature})")
    dis.add_argument("--allow-tta", action="store_true",
                     help="let validation choose test-time augmentation for the student "
                          "(default: one network pass a frame)")
    dis.add_argument("--folds", type=_non_negative_int, default=0,
                     help="cross-validate the recipe instead: fold k taught by member k of a "
                          "cv ensemble of this many folds (same --seed as its cv)")
    dis.add_argument("--from-teacher", action="store_true",
                     help="the student starts from the teacher's weights (member k in fold k; "
                          "an ensemble's first member otherwise), not from random ones or "
                          "--init; its --base must be the teacher's")
    dis.add_argument("--workers", type=_positive_int, default=1, help="the student's workers")
    dis.add_argument("--teachers", type=_positive_int, default=1,
                     help="teacher actors (each loads the whole teacher)")
    _add_training_flags(dis)
    _add_cluster_flag(dis)
    dis.set_defaults(handler=_distill)

    inf = commands.add_parser("infer", help="segment an archive: masks + results (+ metrics)")
    inf.add_argument("model", help="a model folder (a train or cv RUN's model/, local or "
                                   "s3://), or the name of a bundled model (`raythyroid models`)")
    inf.add_argument("input", help="folder or s3:// prefix (searched recursively), a .txt / "
                                   ".parquet manifest of URIs, or a PACS: "
                                   "dicomweb+http(s)://HOST:PORT/PREFIX?QIDO-filters")
    inf.add_argument("output", help="output folder or s3:// prefix; rerun to resume")
    inf.add_argument("--new-version", action="store_true",
                     help="MODEL is a new version of the model OUTPUT holds: go on with it, "
                          "each row naming its version (automatic for another version of the "
                          "same models:/NAME or bundled model)")
    inf.add_argument("--redo-older", action="store_true",
                     help="also redo, with MODEL, every source another model version "
                          "committed to OUTPUT (by default they are kept)")
    inf.add_argument("--labels", default=None, help="ground-truth masks with matching stems")
    inf.add_argument("--workers", type=_positive_int, default=1, help="Predictor actors")
    inf.add_argument("--gpu", action="store_true", help="one GPU per Predictor actor")
    inf.add_argument("--batch-size", type=_positive_int, default=InferOptions.batch_size)
    inf.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                     help="average with a mirrored prediction, and with a zoomed-out one "
                          "where model.json chose it (default: as chosen on validation when "
                          "the model was trained)")
    inf.add_argument("--fast", action="store_true",
                     help="one model pass per frame: the network distilled from the "
                          "ensemble where the model ships one (ddti does), else an "
                          "ensemble's first member; no TTA (images/s in bench/BENCHMARKS.md)")
    inf.add_argument("--compile", action="store_true",
                     help="torch.compile the model in each Predictor (pays off on GPUs)")
    inf.add_argument("--precision", choices=training.PRECISIONS + ("int8",),
                     default=InferOptions.precision,
                     help="int8: a one-network model's int8 weights (`raythyroid quantize`), "
                          "on CPUs")
    inf.add_argument("--dicom-seg", action="store_true",
                     help="also write a DICOM SEG per DICOM input under OUTPUT/dicom-seg/")
    inf.add_argument("--stow", nargs="?", const="", default=None, metavar="URL",
                     help="store every SEG with STOW-RS in this DICOMweb server (default: the "
                          "input's); implies --dicom-seg")
    inf.add_argument("--max-pixels", type=_positive_int, default=imaging.DEFAULT_MAX_PIXELS)
    inf.add_argument("--max-error-rate", type=_fraction, default=None,
                     help="exit with status 3 when more than this fraction of inputs fail "
                          "(skipped non-image DICOM objects count in neither part)")
    inf.add_argument("--cpus-per-worker", type=_positive_float, default=None)
    inf.add_argument("--block-size", type=_positive_int, default=InferOptions.block_size,
                     help="inputs per read task and per results file")
    inf.add_argument("--review", type=_non_negative_int, default=InferOptions.review,
                     metavar="N",
                     help="frames in the report's review queue, least confident first (0: "
                          "keep no overlays)")
    _add_cluster_flag(inf)
    inf.set_defaults(handler=_infer)

    rep = commands.add_parser("report", help="(re)write the HTML report of an infer OUTPUT or "
                                             "a train or cv RUN")
    rep.add_argument("folder", help="an infer OUTPUT, or a train or cv RUN (local or s3://)")
    rep.add_argument("--review", type=_positive_int, default=report.REVIEW_SIZE, metavar="N",
                     help="frames in an infer report's review queues")
    rep.set_defaults(handler=_report)

    mod = commands.add_parser("models", help="the models shipped inside the package")
    mod.set_defaults(handler=_models)

    reg = commands.add_parser("register", help="a model folder as a new version in MLflow's "
                                                "registry")
    reg.add_argument("model", metavar="MODEL", help="bundled name, folder or s3://")
    reg.add_argument("name", metavar="NAME", help="the registered model")
    reg.set_defaults(handler=_register)

    pro = commands.add_parser("promote", help="move NAME@champion to VERSION only when compare "
                                              "finds it better on LABELLED")
    pro.add_argument("name", metavar="NAME", help="the registered model")
    pro.add_argument("version", metavar="VERSION", help="the candidate version")
    pro.add_argument("labelled", metavar="LABELLED",
                     help="a preprocess OUTPUT whose frames neither version trained on")
    pro.add_argument("--split", choices=("train", "val", "test"), default="test")
    pro.add_argument("--alias", default="champion", help="the alias the nightly run follows")
    _add_cluster_flag(pro, metrics=False)
    pro.set_defaults(handler=_promote)

    cmp = commands.add_parser(
        "compare", help="two models on the same labelled frames: exit 0 only when B is better")
    cmp.add_argument("model_a", metavar="MODEL_A", help="the model in use (bundled name, folder "
                                                        "or s3://)")
    cmp.add_argument("model_b", metavar="MODEL_B", help="the candidate")
    cmp.add_argument("labelled", metavar="LABELLED",
                     help="a preprocess OUTPUT whose frames neither model trained on")
    cmp.add_argument("--split", choices=("train", "val", "test"), default="test")
    cmp.add_argument("--resamples", type=_positive_int, default=compare_lib.RESAMPLES,
                     help="bootstrap resamples of cases")
    cmp.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    cmp.add_argument("--json", default=None, metavar="FILE", help="write the comparison here")
    _add_cluster_flag(cmp, metrics=False)
    cmp.set_defaults(handler=_compare)

    qu = commands.add_parser("quantize", help="int8 weights for a one-network model, "
                             "calibrated on a prepared set's training frames (infer "
                             "--precision int8)")
    qu.add_argument("model", help="a model folder or bundled name (one network)")
    qu.add_argument("data", help="a preprocess OUTPUT prepared as the model prepares")
    qu.add_argument("output", help="the new model folder (the model's files and its int8 "
                    "weights)")
    qu.add_argument("--frames", type=_positive_int, default=None,
                    help="training frames that calibrate the activations' ranges (default 64)")
    qu.set_defaults(handler=_quantize)

    ev = commands.add_parser("evaluate", help="metrics of a mask folder against labels")
    ev.add_argument("pred", help="predicted masks (e.g. an infer OUTPUT/masks)")
    ev.add_argument("labels", help="ground-truth masks with matching stems")
    ev.add_argument("--out", default=None, help="write metrics.json here")
    ev.set_defaults(handler=_evaluate)

    gen = commands.add_parser("phantoms", help="write synthetic frames + masks (folders layout)")
    gen.add_argument("output", help="folder or s3:// prefix")
    gen.add_argument("--count", type=_positive_int, default=200)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=_positive_int, default=360)
    gen.add_argument("--width", type=_positive_int, default=560)
    gen.set_defaults(handler=_phantoms)

    demo = commands.add_parser("demo", help="the whole pipeline on phantoms, locally")
    demo.add_argument("workdir", nargs="?", default="demo-run")
    _add_cluster_flag(demo, metrics=False)
    demo.set_defaults(handler=_demo)
    return parser


def _preprocess(args: argparse.Namespace) -> int:
    from . import dicomweb, layouts, preprocess, runtime, split, storage
    from .imaging import PrepConfig

    fractions = split.parse_fractions(args.split)
    rules = layouts.DicomRules(segs_from=args.segs_from, several=args.several_segs)
    pacs = dicomweb.is_dicomweb(args.input)
    if pacs:
        layouts.pacs_layout(args.layout)
        dicomweb.check(dicomweb.parse(args.input))  # URL, credentials, a server that answers
    else:
        storage.check_readable_root(args.input)
    storage.check_writable_root(args.output)
    # a PACS's SEGs are read by Ray tasks, once Ray has started
    scanned = None if pacs else layouts.scan(storage.normalize(args.input), args.layout, rules)
    config = PrepConfig(size=args.size, desensitize=not args.no_crop)
    with runtime.session(args.address, args.verbose):
        preprocess.run(args.input, args.output, layout=args.layout, config=config,
                       fractions=fractions, seed=args.seed, max_pixels=args.max_pixels,
                       scanned=scanned, metrics_port=args.metrics_port, dicom_rules=rules)
    return 0


def _prepared_data(args: argparse.Namespace):
    """train's and cv's DATA...: read and checked before Ray starts. RUN comes last, so a
    forgotten RUN would make the last DATA the run folder: refused."""
    from . import shards, storage

    if storage.exists(storage.join(storage.normalize(args.run), shards.MANIFEST)):
        raise UserError(f"{args.run} is a preprocess output; the last argument is RUN, the "
                        f"run's own folder: {args.command} DATA [DATA ...] RUN")
    return shards.read_prepared(args.data)


def _train(args: argparse.Namespace) -> int:
    from . import runtime, storage, train

    storage.check_writable_root(args.run)
    data = args.data  # a finished RUN needs none
    if not storage.exists(storage.join(args.run, "metrics.json")):
        data = _prepared_data(args)  # a wrong DATA is reported before Ray starts
    with runtime.session(args.address, args.verbose):
        train.run(data, args.run, _train_config(args), workers=args.workers, gpu=args.gpu,
                  register=args.register,
                  cpus_per_worker=args.cpus_per_worker, metrics_port=args.metrics_port)
    return 0


def _cv(args: argparse.Namespace) -> int:
    from . import cv, runtime, storage

    storage.check_writable_root(args.run)
    data = _prepared_data(args)
    if args.folds < 2:
        raise UserError("--folds must be at least 2")
    with runtime.session(args.address, args.verbose):
        cv.run(data, args.run, _train_config(args), folds=args.folds,
               workers=args.workers, gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
               metrics_port=args.metrics_port, register=args.register)
    return 0


def _distill(args: argparse.Namespace) -> int:
    import dataclasses

    from . import dicomweb, distill, modelinfo, runtime, shards, storage

    storage.check_writable_root(args.run)
    shards.read_manifest(args.data)
    # a wrong TEACHER, before Ray starts
    modelinfo.read_info(modelinfo.resolve(args.teacher))
    if args.folds == 1:
        raise UserError("--folds must be at least 2 (or 0: train the student to ship)")
    for uri in args.unlabelled:  # URL, credentials and a server that answers, too
        if dicomweb.is_dicomweb(uri):
            dicomweb.check(dicomweb.parse(uri))
        else:
            storage.check_readable_root(uri)
    config = dataclasses.replace(_train_config(args), allow_tta=args.allow_tta,
                                 soft_weight=args.soft_weight, temperature=args.temperature)
    options = distill.DistillOptions(
        unlabelled=tuple(args.unlabelled), min_confidence=args.min_confidence,
        folds=args.folds, from_teacher=args.from_teacher, workers=args.workers, teachers=args.teachers, gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker, metrics_port=args.metrics_port)
    with runtime.session(args.address, args.verbose):
        distill.run(args.teacher, args.data, args.run, config, options)
    return 0


EXIT_TOO_MANY_ERRORS = 3


def _stow_target(args: argparse.Namespace, source) -> str | None:
    """--stow's server (a base URL), by default the input's; `source` is the input's parsed
    DICOMweb query, or None for files."""
    from . import dicomweb

    if args.stow is None:
        return None
    if args.stow:
        return dicomweb.parse(args.stow if dicomweb.is_dicomweb(args.stow)
                              else "dicomweb+" + args.stow).base
    if source is None:
        raise UserError("--stow needs a URL unless INPUT is a DICOMweb server")
    return source.base


def _infer(args: argparse.Namespace) -> int:
    from . import dicomweb, infer, modelinfo, runtime, storage

    source = dicomweb.parse(args.input) if dicomweb.is_dicomweb(args.input) else None
    stow = _stow_target(args, source)
    # URL, credentials and a server that answers, before Ray starts
    if source is not None:
        dicomweb.check(source)
    else:
        storage.check_readable_root(args.input)
    if stow and stow != (source and source.base):
        dicomweb.check(dicomweb.parse("dicomweb+" + stow))
    if args.labels:
        storage.check_readable_root(args.labels)
    storage.check_writable_root(args.output)
    if args.fast and args.tta:
        raise UserError("--fast runs one model without TTA: give one of --fast and --tta")
    # a wrong MODEL, or one without what the flags ask of it, is reported before Ray starts
    folder = modelinfo.resolve(args.model)
    info = modelinfo.read_info(folder)
    options = infer.InferOptions(
        batch_size=args.batch_size, workers=args.workers, gpu=args.gpu,
        tta=False if args.fast else args.tta, fast=args.fast,
        precision=args.precision, max_pixels=args.max_pixels, dicom_seg=args.dicom_seg,
        max_error_rate=args.max_error_rate, cpus_per_worker=args.cpus_per_worker,
        block_size=args.block_size, metrics_port=args.metrics_port, compile=args.compile,
        stow=stow, review=args.review, new_version=args.new_version,
        redo_older=args.redo_older)
    infer.check_precision(info, options, folder, args.model)
    with runtime.session(args.address, args.verbose):
        summary = infer.run(args.model, args.input, args.output, labels=args.labels,
                            options=options)
    print(f"infer: {summary.errors} error(s) and {summary.skipped} skipped (not images) "
          f"in {summary.rows} results")
    if summary.too_many_errors:
        print(f"raythyroid: error: error rate {summary.error_rate:.2%} is above "
              f"--max-error-rate {args.max_error_rate:.2%}", file=sys.stderr)
        return EXIT_TOO_MANY_ERRORS
    return 0


def _report(args: argparse.Namespace) -> int:
    from . import report, storage

    storage.check_readable_root(args.folder)
    storage.check_writable_root(args.folder)
    print(f"report: {report.write(args.folder, args.review)}")
    return 0


def _models(args: argparse.Namespace) -> int:
    import os

    from . import modelinfo

    shipped = modelinfo.bundled()
    if not shipped:
        print("no bundled models in this installation")
    for name, info in shipped.items():
        print(f"{name}: {info.card.get('headline', '')}")
        print(f"    {info.members} model(s); card: "
              f"{os.path.join(modelinfo.BUNDLED, name, modelinfo.CARD)}")
        if info.fast:
            print(f"    --fast: {(info.fast.get('card') or {}).get('headline', '')}")
    return 0


EXIT_NOT_BETTER = 4  # compare: B is not better beyond the interval (1 is a failure)


def _compare(args: argparse.Namespace) -> int:
    import json

    from . import compare, modelinfo, runtime, shards, storage

    for name in (args.model_a, args.model_b):  # a wrong MODEL or LABELLED, before Ray starts
        modelinfo.read_info(modelinfo.resolve(name))
    shards.read_manifest(storage.normalize(args.labelled))
    with runtime.session(args.address, args.verbose):
        result = compare.run(args.model_a, args.model_b, args.labelled, split=args.split,
                             resamples=args.resamples, seed=args.seed)
    if args.json:
        storage.write_text(storage.normalize(args.json), json.dumps(result.to_dict(), indent=2))
    return 0 if result.b_is_better else EXIT_NOT_BETTER


def _register(args: argparse.Namespace) -> int:
    from . import modelinfo, registry

    folder = modelinfo.resolve(args.model)
    # a folder that holds no model is refused before anything is logged
    modelinfo.read_info(folder)
    version = registry.register_folder(folder, args.name)
    print(f"register: {args.model} is {args.name} version {version} ({registry.PREFIX}"
          f"{args.name}/{version})")
    return 0


def _promote(args: argparse.Namespace) -> int:
    """The alias moves only when compare opens its gate; a registered model without the alias
    takes its first version as it is."""
    from . import compare, modelinfo, registry, runtime, shards, storage

    candidate = f"{registry.PREFIX}{args.name}/{args.version}"
    # a wrong NAME or VERSION, before Ray starts
    modelinfo.read_info(modelinfo.resolve(candidate))
    current = registry.champion(args.name, args.alias)
    if current == args.version:
        print(f"promote: {args.name} version {args.version} is already {args.alias}")
        return 0
    if current is None:
        registry.crown(args.name, args.version, args.alias)
        print(f"promote: {args.name} had no {args.alias}: version {args.version} is now")
        return 0
    shards.read_manifest(storage.normalize(args.labelled))
    with runtime.session(args.address, args.verbose):
        result = compare.run(f"{registry.PREFIX}{args.name}/{current}", candidate,
                             args.labelled, split=args.split)
    if not result.b_is_better:
        print(f"promote: {args.name} version {args.version} is not better than version "
              f"{current} beyond the interval; {args.alias} stays {current}", file=sys.stderr)
        return EXIT_NOT_BETTER
    registry.crown(args.name, args.version, args.alias)
    print(f"promote: {args.name}@{args.alias} is now version {args.version} (was {current})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from . import evaluate, metrics, storage

    storage.check_readable_root(args.pred)
    storage.check_readable_root(args.labels)
    result, _ = evaluate.evaluate_folders(args.pred, args.labels)
    print(metrics.table(result, f"{args.pred} against {args.labels}"))
    if args.out:
        storage.write_text(args.out, json.dumps(result, indent=2))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from . import int8, storage

    storage.check_readable_root(args.data)
    storage.check_writable_root(args.output)
    int8.write(args.model, args.data, args.output, args.frames or int8.CALIBRATION_FRAMES)
    return 0


def _phantoms(args: argparse.Namespace) -> int:
    from . import phantom, storage

    storage.check_writable_root(args.output)
    keys = phantom.write_folders(args.output, args.count, args.seed, args.height, args.width)
    print(f"phantoms: wrote {len(keys)} frames and masks to {args.output}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import demo, runtime, storage

    storage.check_writable_root(args.workdir)
    with runtime.session(args.address, args.verbose):
        demo.run(args.workdir)
    return 0


def _caused_by(exc: BaseException, kinds: tuple) -> BaseException | None:
    """`exc` or what it wraps (Ray re-raises a task's exception wrapped, with the original as
    its cause), if of one of `kinds`."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, kinds):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


EXIT_FAILURE = 1


def _report_failure(exc: BaseException, argv: list[str] | None) -> int:
    """An unexpected failure (a bug, a worker's exception): one line on the terminal, the
    whole traceback in the command's log file; --verbose shows the traceback itself."""
    import traceback

    if "--verbose" in (sys.argv[1:] if argv is None else argv):
        raise exc
    path = stopping.command_log()
    text = "".join(traceback.format_exception(exc))
    with open(path, "a") as log:
        log.write(text)
    summary = f"{type(exc).__name__}: {exc}".strip().splitlines()
    # a Ray task's error reads "...RayTaskError(X): ray::task() ..." then the worker's
    # traceback; its last line is the worker's own exception
    print(f"raythyroid: error: {summary[-1] if summary else type(exc).__name__} "
          f"(full traceback in {path})", file=sys.stderr, flush=True)
    if not sys.stderr.isatty():
        # a job's log (Ray job, Kubernetes, CI) outlives the node's temporary files
        print(text, file=sys.stderr, flush=True)
    return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    with stopping.handled():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except UserError as exc:
        print(f"raythyroid: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        from .dicomweb import Unreachable

        if stopping.state.signal is not None:
            # what a stopped run's Ray calls raise on the way out is not the news
            print(f"raythyroid: {stopping.message()}", file=sys.stderr, flush=True)
            return stopping.exit_code()
        cause = _caused_by(exc, (Unreachable, UserError))
        if cause is None:
            return _report_failure(exc, argv)
        # a server down (exit 75: a scheduler, a RayCronJob's retry, tries again later) or
        # credentials refused, met inside a Ray task rather than before the job started
        print(f"raythyroid: error: {str(cause).strip().splitlines()[-1]}", file=sys.stderr)
        return EXIT_TEMPORARY_FAILURE if isinstance(cause, Unreachable) else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"raythyroid: {stopping.message()}", file=sys.stderr, flush=True)
        return stopping.exit_code()


def console() -> None:
    """The `raythyroid` command (and `python -m raythyroid.cli`): main() in a process of its
    own, left without Python's finalization (stopping.leave)."""
    stopping.leave(main())


if __name__ == "__main__":
    console()
