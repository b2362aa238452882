"""The last step of release/ship_ddti.sh: the cv ensemble's weights into the package, with the
figures the earlier steps measured (card-figures.json, the record) and the two files rendered
from that record alone: model.json (cv's, with the card's headline and figures, for `raythyroid
models` and release/cv_compare.py) and the model card, CARD.md.

    python release/ship_card.py WORKDIR DEST   # collect WORKDIR's figures, ship them into DEST
    python release/ship_card.py --render DEST  # CARD.md and model.json again from DEST's record

release/ship_student.sh's steps (the one-pass network `--fast` runs, distilled from the ensemble):

    python release/ship_card.py --teacher DEST OUT      # DEST's ensemble alone, the teacher
    python release/ship_card.py --one-pass MODEL OUT    # what `infer MODEL --fast` runs
    python release/ship_card.py --half MODEL OUT        # a one-network MODEL in fp16
    python release/ship_card.py --test-frames WORKDIR   # WORKDIR/test-frames.txt
    python release/ship_card.py --student WORKDIR DEST  # the student into DEST's record

Two steps: `collect` reads a WORKDIR into the record; `render` turns a record into the card and
model.json and reads nothing else, so a shipped card is reproduced from its record
(tests/test_bundled_model.py renders the bundled model's and compares). A figure measured after
the build goes into the record (its `after_build` part) and the card is rendered again: never
an edit of CARD.md or model.json by hand.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import sys

FIGURES = "card-figures.json"  # the record, beside the model it describes
FORMAT = "raythyroid-card-figures/1"
SCRIPT = "release/ship_ddti.sh"
DATA = "DDTI (../shared/data/ddti: 300 frames of 248 patients, 297 after removing duplicates)"
PRETRAIN_DATA = "TG3K (../shared/data/tg3k: 3,585 thyroid-gland frames)"
ABOUT = ("The figures CARD.md and model.json are rendered from (release/ship_card.py: "
         "render); edit this, never them, then python release/ship_card.py --render DEST.")
METRICS = ("n_iou", "n_iou_per_image", "dice")
FAST = "fast"  # model.json's entry for the one-pass network `infer --fast` runs (modelinfo)
FAST_WEIGHTS = "fast.pt"
PAIRED = ("frames", "cases", "difference", "interval", "resamples")  # raythyroid compare's

# What a record holds (written by `collect`; `render` reads nothing else):
#   model         model.json as cv wrote it, less any card, no path of the building machine
#   counts        the frames of each split (prepared/manifest.json)
#   cv            cv.json's means and spreads over folds, and its pooled figures where it has them
#   folds         each fold's frames, epochs, last and best epoch's figures (fold_figures)
#   test, test_fast, test_members: the test split's figures (ensemble, --fast, each member)
#   member_bytes  the members' weights, in bytes
#   machine       the machine that built it, as bench/common.py describes it
#   throughput    ensemble_bench's frames and images/s of the ensemble and of --fast
#   pretrain      the TG3K pretraining's epochs, frames and seconds (None without one)
#   cv_flags      ship_ddti.sh's CV_FLAGS as given
#   timings       preprocess_seconds (None: frames prepared before) and fold_seconds (each fold's
#                 own clock); or, for a build recorded before those, wall_minutes (cv,
#                 pretrain, preprocess) of timings.txt's wall clock (the bundled ddti's: as
#                 its card gave them, rounded)
#   student       (optional; release/ship_student.sh) the one-pass network `--fast` runs: its
#                 model.json entry (model), its test-split figures, the unlabelled frames it
#                 saw and kept, its weights' bytes, its training's seconds, throughput
#                 (ensemble_bench: the ensemble, its first member and the student) and machine
#   after_build   (optional) the zoomed-out view added to TTA after the build: the keys it added
#                 to model.json (model; the inference variants it scored replaced the build's
#                 in model.training), the inference the build had chosen (built_inference), the
#                 ensemble's test figures with the view and where they were measured, the
#                 build's ensemble in that precision, the view's throughput


def training_seconds(run: str) -> float:
    """A training run's time across every stop and resume: its last epoch's elapsed_seconds."""
    with open(os.path.join(run, "history.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[-1]["elapsed_seconds"] if rows else 0.0


def fold_figures(fold: dict) -> dict:
    """What cv_compare pairs of a fold: its frames, epochs, last and best epoch's figures."""
    return {"fold": fold["fold"], "val_images": fold["val_images"], "epochs": fold["epochs"],
            "best_epoch": fold["best_epoch"],
            "last": {k: fold["last"][k] for k in METRICS},
            "best": {k: fold["best"][k] for k in METRICS}}


def machine() -> str:
    """The machine as bench/BENCHMARKS.md's lines name it (bench/common.py, the benches' one
    shared module)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    from common import machine as describe

    return describe()


def collect(work: str) -> dict:
    """The record of a release/ship_ddti.sh WORKDIR: every figure the card and model.json are
    rendered from."""
    def read(path: str) -> dict:
        with open(os.path.join(work, path)) as f:
            return json.load(f)

    cv, meta, manifest = read("cv/cv.json"), read("cv/model/model.json"), read(
        "prepared/manifest.json")
    test, fast, speed = (read("test-ensemble/metrics.json"), read("test-fast/metrics.json"),
                         read("throughput.json"))
    members = [read(f"test-member-{r['fold']}/metrics.json") for r in cv["folds"]]
    seconds, timings = {}, os.path.join(work, "timings.txt")
    # preprocessing: steps that completed (none in a WORKDIR whose frames were prepared before)
    with open(timings) if os.path.exists(timings) else contextlib.nullcontext([]) as f:
        for line in f:
            step, value = line.split()
            seconds[step] = seconds.get(step, 0) + int(value)
    # training time from training's own clock, which a stop and resume carries on
    # (timings.txt loses a stopped run's time and counts a rerun that had nothing left to do)
    fold_seconds = [training_seconds(os.path.join(work, "cv", f"fold-{r['fold']}"))
                    for r in cv["folds"]]
    cv_flags, flags_file = "", os.path.join(work, "cv-flags")  # ship_ddti.sh's CV_FLAGS
    if os.path.exists(flags_file):
        with open(flags_file) as f:
            cv_flags = f.read().strip()
    # no path of the machine that built it travels with the model
    meta.pop("card", None)
    meta["data"]["uri"] = meta["training"]["cross_validation"]["data"] = DATA
    pretrain = None
    if meta["training"]["config"].get("init"):
        gland = read("pretrain/model/model.json")
        pre_counts = read("tg3k-prepared/manifest.json")["counts"]
        epochs = gland["training"]["epochs_run"]
        meta["training"]["config"]["init"] = (
            f"a U-Net trained {epochs} epochs on the gland masks of {PRETRAIN_DATA} "
            f"({SCRIPT} PRETRAIN_EPOCHS)")
        pretrain = {"epochs": epochs, "train": pre_counts.get("train"),
                    "val": pre_counts.get("val"),
                    "seconds": training_seconds(os.path.join(work, "pretrain"))}
    prepared_in = seconds.get("preprocess", 0) + seconds.get("preprocess-tg3k", 0)
    return {
        "about": ABOUT, "format": FORMAT, "model": meta, "counts": manifest["counts"],
        "cv": {k: v for k, v in cv.items()
               if k.endswith(("_mean", "_std")) or k in ("last_pooled", "inference_pooled")},
        "folds": [fold_figures(r) for r in cv["folds"]],
        "test": {k: test[k] for k in METRICS + ("precision", "recall", "images")},
        "test_fast": {k: fast[k] for k in METRICS},
        "test_members": [{k: m[k] for k in METRICS} for m in members],
        "member_bytes": sum(os.path.getsize(os.path.join(work, "cv", "model", name))
                            for name in meta["members"]),
        "machine": machine(),
        "throughput": {k: speed[k] for k in ("frames", "ensemble_images_per_s",
                                             "fast_images_per_s")},
        "pretrain": pretrain, "cv_flags": cv_flags,
        "timings": {"preprocess_seconds": prepared_in if seconds else None,
                    "fold_seconds": fold_seconds}}


def collect_student(work: str) -> dict:
    """The record's `student` part from a release/ship_student.sh WORKDIR."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def read(path: str) -> dict:
        with open(os.path.join(work, path)) as f:
            return json.load(f)

    meta, test, speed = (read("student-fp16/model.json"), read("test-student/metrics.json"),
                         read("student-throughput.json"))
    config, taught = meta["training"]["config"], meta["distillation"]
    rows = pq.read_table(os.path.join(work, "student", "taught"),
                         columns=["labelled", "status", "confidence"])
    ok = rows.filter(pc.equal(rows.column("status"), "ok"))
    unlabelled = ok.filter(pc.invert(ok.column("labelled")))
    kept = unlabelled.filter(pc.greater_equal(unlabelled.column("confidence"),
                                              taught["min_confidence"]))
    weights = os.path.join(work, "student-fp16", meta["weights"])
    paired, paired_first = read("student-vs-ensemble.json"), read("student-vs-first.json")
    return {
        # no path of the machine that built it travels with the model
        "model": {"weights": FAST_WEIGHTS, "architecture": meta["architecture"],
                  "threshold": meta["threshold"], "postprocess": meta["postprocess"],
                  "created": meta["created"],
                  "distillation": {"teacher": "this model's ensemble (its members, its TTA)",
                                   "unlabelled": f"every 9th frame of {PRETRAIN_DATA}",
                                   **{k: taught[k] for k in ("min_confidence", "soft_weight",
                                                              "temperature")}},
                  "training": {"config": {k: config[k] for k in (
                      "epochs", "batch_size", "lr", "optimizer", "schedule", "loss", "base",
                      "augment", "precision")},
                      "epochs_run": meta["training"]["epochs_run"],
                      "best_epoch": meta["training"]["best_epoch"]}},
        "test": {k: test[k] for k in METRICS + ("precision", "recall", "images")},
        # the frames it trained on: the labelled ones (the train split's) and the unlabelled
        # ones over the confidence bar
        "labelled": ok.num_rows - unlabelled.num_rows,
        "unlabelled": unlabelled.num_rows, "unlabelled_kept": kept.num_rows,
        "bytes": os.path.getsize(weights),
        # the test split frame by frame, the ensemble (A) against the student (B)
        "paired": {k: paired[k] for k in PAIRED},
        # and against the first member alone, no TTA (what --fast ran before)
        "paired_first": {k: paired_first[k] for k in PAIRED},
        "training_seconds": training_seconds(os.path.join(work, "student")),
        "machine": machine(),
        "throughput": {k: speed[k] for k in ("frames", "ensemble_images_per_s",
                                             "fast_images_per_s", "student_images_per_s")}}


def tta(meta: dict) -> str:
    if not meta["tta"]:
        return "off"
    zoom = meta.get("tta_zoom") or 0
    return ("the frame and its mirror image" + (f",\n  each also shrunk to {zoom:g} of its side "
                                                "in a blank frame (a zoomed-out view)"
                                                if zoom else ""))


def model_passes(inference: dict) -> int:
    """Forward passes per member and frame: the mirror image doubles them, the zoomed-out view
    (with its own mirror image) doubles them again."""
    return (2 if inference["tta"] else 1) * (2 if inference.get("tta_zoom") else 1)


def variant(meta: dict, inference: dict) -> dict:
    """The inference variant cv scored (model.json's inference_variants) that `inference`
    (tta, tta_zoom, threshold, keep_largest) names."""
    wanted = {k: inference.get(k) or 0 for k in ("tta", "tta_zoom", "threshold", "keep_largest")}
    for scored in meta["training"]["cross_validation"]["inference_variants"]:
        if {k: scored.get(k) or 0 for k in wanted} == wanted:
            return scored
    raise ValueError(f"no inference variant {wanted} in the record")


def pooled_sentence(cv: dict, frames: int) -> str:
    """The out-of-fold frames scored as one set (from a cv that kept the folds' confusion
    totals): what to hold against a pooled score on new frames."""
    last, chosen = cv.get("last_pooled"), cv.get("inference_pooled")
    if not (last and chosen):
        return ""
    return f"""

Pooled over all {frames} out-of-fold frames as one set (each frame weighs by its pixels, as in a
pooled score on new frames): n_IoU {last['n_iou']:.4f} at the last epochs; {chosen['n_iou']:.4f}
for the members as shipped with the ensemble's inference (a little high: their epochs and that
inference were chosen on these same frames)."""


def rebuilding(record: dict, rebuilt_with: str) -> str:
    """The card's last paragraph: how to rebuild, and what it took."""
    timings, pretrain = record["timings"], record["pretrain"]
    if "wall_minutes" in timings:  # a build timed by timings.txt's wall clock alone
        minutes = timings["wall_minutes"]
        pretrain_time = (f" after {minutes.get('pretrain', 0):.0f} minutes of TG3K pretraining "
                         f"(two workers)" if pretrain else "")
        return f"""\
`{SCRIPT}` ({rebuilt_with}) from `../shared/data`; on that machine its
completed runs took {minutes.get('cv', 0):.0f} minutes of cross-validation (folds two at a time
on two cores){pretrain_time} and {minutes.get('preprocess', 0):.1f} minutes of preprocessing.
"""
    fold_seconds = timings["fold_seconds"]
    prepared_in = timings["preprocess_seconds"]
    preprocessing = (f"preprocessing took {prepared_in / 60:.1f} minutes"
                     if prepared_in is not None
                     else "preprocessing's time was not recorded (frames prepared before)")
    pretrain_time = (f" TG3K pretraining took {pretrain['seconds'] / 60:.0f} minutes (two "
                     "workers), then" if pretrain else "")
    fold_hours, longest_hours = sum(fold_seconds) / 3600, max(fold_seconds) / 3600
    return f"""\
`{SCRIPT}` ({rebuilt_with}) from `../shared/data`. On that machine
{preprocessing},{pretrain_time}
the {len(fold_seconds)} folds trained {fold_hours:.1f} hours in all
(each fold's own clock, stopped and resumed runs included; the longest {longest_hours:.1f} h;
two folds at a time on two cores, so about half that in wall time).
"""


def after_build_notes(record: dict, meta: dict) -> tuple[str, str, str]:
    """(the inference item that says the zoomed-out view came after the build, the test table's
    note, the throughput's note): empty without such a change on record."""
    later = record.get("after_build")
    if not later:
        return "", "", ""
    built = later["built_inference"]
    now = {"tta": meta["tta"], "tta_zoom": meta.get("tta_zoom"),
           "threshold": meta["threshold"], "keep_largest": meta["postprocess"]["keep_largest"]}
    chosen, before = variant(meta, now), variant(meta, built)
    frames = sum(r["val_images"] for r in record["folds"])
    rechosen = f"""\
- The zoomed-out view was added after the build: `python bench/rechoose_inference.py ddti
  WORKDIR/prepared --write` (a one-off script, retired since: git history keeps it) chose the
  inference again among the variants training now tries, from the same members on the same
  held-out folds (mean validation n_IoU {chosen['mean_val_n_iou']:.4f} against \
{before['mean_val_n_iou']:.4f} with the mirror alone; pooled
  over the {frames} frames {chosen['pooled_val_n_iou']:.4f} against \
{before['pooled_val_n_iou']:.4f}). A rebuild chooses the same way, inside
  `raythyroid cv`.
"""
    test, again = record["test"], later["build_test_rescored"]
    built_in, measured_in, where = (later["build_precision"], later["test_precision"],
                                    later["test_machine"])
    test_note = f"""; the ensemble's row
with the zoomed-out view, measured after it was added, in {measured_in} on {where}; the
other rows in {built_in}. With the mirror alone the ensemble read {test['n_iou']:.4f}, \
{test['n_iou_per_image']:.4f}, {test['dice']:.4f} in {built_in} and
{again['n_iou']:.4f} pooled in {measured_in}"""
    speed = later["throughput"]
    speed_note = f""", with the mirror alone as TTA. The zoomed-out view makes {model_passes(now)} \
model passes per member and frame
of {model_passes(built)}; with it, on {speed['machine']} ({speed['precision']}, so both slower), \
ensemble {speed['ensemble_images_per_s']:.2g},
{first_member_name(record)} {speed['fast_images_per_s']:.2g} \
(`bench/ensemble_bench.py`); there, side by side on \
the same {speed['frames']} frames, the ensemble
took {speed['job_seconds'] / speed['built_job_seconds']:.2f}x the wall time with the view as \
with the mirror alone"""
    return rechosen, test_note, speed_note


def first_member_name(record: dict) -> str:
    """What the build's `--fast` figures measured: the first member, until a distilled network
    took `--fast` over."""
    return "the first member alone" if record.get("student") else "`--fast`"


def student_headline(record: dict) -> str:
    student = record["student"]
    return (f"one network distilled from the {len(record['model']['members'])}-member ensemble, "
            f"one pass a frame: test split n_IoU {student['test']['n_iou']:.3f} "
            f"({student['test']['images']} frames); research use only")


def student_section(record: dict, ensemble_test: dict) -> str:
    """The card's section on the network `--fast` runs (empty without one on record)."""
    student = record.get("student")
    if not student:
        return ""
    entry, test, speed = student["model"], student["test"], student["throughput"]
    config, taught = entry["training"]["config"], entry["distillation"]
    gap, over_first = (test["n_iou"] - ensemble_test["n_iou"],
                       test["n_iou"] - record["test_fast"]["n_iou"])
    beyond = student["paired"]["interval"][1] < 0
    verdict = (f"The ensemble stays the default: it scores higher on the test split"
               f"{', beyond the paired interval' if beyond else ''}." if gap < 0 else
               "It scores at least the ensemble on the test split; whether it becomes the "
               "default is decided on cross-validation first.")
    paired, first = student["paired"], student["paired_first"]
    low, high = paired["interval"]
    return f"""
## `--fast`: one network distilled from the ensemble

- A U-Net of a member's size (base width {entry['architecture']['base']}, \
{student['bytes'] / 1e6:.1f} MB of fp16 weights), started from
  member 0 and trained {entry['training']['epochs_run']} epochs (lr {config['lr']:g}, \
{config['schedule']}, `{config['augment']}` augmentation) on the ensemble's
  soft nodule probabilities (its whole inference, TTA included): over the {student['labelled']} \
frames of the train
  split, whose masks weigh {1 - taught['soft_weight']:g} of the loss, and over \
{student['unlabelled_kept']} of {student['unlabelled']} unlabelled frames,
  {taught['unlabelled']},
  that the ensemble was at least {taught['min_confidence']:g} confident of. The weights of \
epoch {entry['training']['best_epoch']}, threshold {entry['threshold']},
  keep the {entry['postprocess']['keep_largest'] or 'all'} largest component(s), chosen on the \
validation split ({record['counts'].get('val')} frames,
  which the ensemble's members trained on: a little optimistic). Its training took \
{student['training_seconds'] / 60:.0f} minutes.
- Test split ({test['images']} frames, as above): n_IoU {test['n_iou']:.4f}, n_IoU/img \
{test['n_iou_per_image']:.4f}, Dice {test['dice']:.4f}: {gap:+.4f} n_IoU
  against the ensemble, {over_first:+.4f} against the first member alone without TTA. Paired \
frame by
  frame (`raythyroid compare`, {paired['frames']} frames of {paired['cases']} cases): IoU \
{paired['difference']:+.4f} against the ensemble, 95% interval
  {low:+.4f} .. {high:+.4f} ({paired['resamples']} bootstrap resamples of cases); against \
the first member
  alone, {first['difference']:+.4f} ({first['interval'][0]:+.4f} .. \
{first['interval'][1]:+.4f}).
- Images per second, the infer job end to end on {speed['frames']} DDTI frames side by side, \
on
  {student['machine']}: ensemble {speed['ensemble_images_per_s']:.2f}, first member alone
  {speed['fast_images_per_s']:.2f}, the distilled network {speed['student_images_per_s']:.2f} \
({speed['student_images_per_s'] / speed['ensemble_images_per_s']:.1f}x the ensemble).
- {verdict}
- The recipe's own cross-validation (each fold's student taught by the member that never saw
  that fold) is in `bench/BENCHMARKS.md`, "distillation, the second recipe".
  `release/ship_student.sh` builds it (`{SCRIPT}` ends with it).
"""


def render(record: dict) -> tuple[str, str]:
    """(CARD.md, model.json) of a record, from nothing else."""
    if record.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} record")
    meta = copy.deepcopy(record["model"])
    later = record.get("after_build") or {}
    test = later.get("test", record["test"])  # the ensemble as it ships
    cv, folds, members, fast = (record["cv"], record["folds"], record["test_members"],
                                record["test_fast"])
    headline = (f"{len(folds)}-fold ensemble on DDTI: CV n_IoU {cv['last_n_iou_mean']:.3f} "
                f"± {cv['last_n_iou_std']:.3f}, test split n_IoU {test['n_iou']:.3f} "
                f"({test['images']} frames); research use only")
    meta["card"] = {"headline": headline,
                    "cv": {k: v for k, v in cv.items() if k.endswith(("_mean", "_std"))},
                    "test": {k: test[k] for k in METRICS + ("precision", "recall", "images")},
                    "test_fast": {k: fast[k] for k in METRICS},
                    "test_members": [{k: m[k] for k in METRICS} for m in members],
                    # each fold's own figures: a later build is compared with this one
                    # (release/cv_compare.py) without this build's workdir
                    "folds": folds}
    meta.update(later.get("model", {}))  # what a change after the build added, after the card
    if record.get("student"):
        meta[FAST] = dict(record["student"]["model"], card={"headline": student_headline(record)})
    model_json = json.dumps(meta, indent=2)
    size_mb = record["member_bytes"] / 1e6

    def row(name: str, m: dict) -> str:
        return (f"| {name} | {m['n_iou']:.4f} | {m['n_iou_per_image'] or 0:.4f} | "
                f"{m['dice']:.4f} |")

    fold_rows = [f"| {r['fold']} | {r['val_images']} | {r['epochs']} | {r['last']['n_iou']:.4f} | "
                 f"{r['last']['n_iou_per_image'] or 0:.4f} | {r['last']['dice']:.4f} | "
                 f"{r['best']['n_iou']:.4f} (epoch {r['best_epoch']}) |" for r in folds]
    config, counts, pretrain = meta["training"]["config"], record["counts"], record["pretrain"]
    epochs = max(r["epochs"] for r in folds)  # what the folds ran, whatever EPOCHS says now
    clip, tile, side = (meta["prep"].get("clahe_clip"), meta["prep"].get("clahe_tile"),
                        meta["prep"]["size"])
    pretraining = "" if not pretrain else f"""\
- Pretraining: every fold started from one U-Net first trained to segment the thyroid
  **gland** (not nodules) on {PRETRAIN_DATA}: {pretrain['train']} frames trained,
  {pretrain['val']} watched the gland loss (a random split: its frames are near-duplicates
  from a few videos, so it measures nothing here), {pretrain['epochs']} epochs, the
  same preparation. TG3K is from Gong H. et al., "Multi-Task Learning for Thyroid Nodule
  Segmentation with Thyroid Region Prior", IEEE ISBI 2021, released for research use without an
  explicit licence; cite it. No TG3K frame is in the package either.
"""
    gland_too = ("; its starting point learned the gland on TG3K's frames (another public set)"
                 if pretrain else "")
    rebuilt_with = f"EPOCHS={epochs}" + (
        f" PRETRAIN_EPOCHS={pretrain['epochs']}" if pretrain else "") + (
        f" SIZE={meta['prep']['size']}" if meta["prep"]["size"] != 256 else "") + (
        f' CV_FLAGS="{record["cv_flags"]}"' if record["cv_flags"] else "")
    lr = config['lr'] or ('1e-3' if config['optimizer'] == 'adamw' else '1e-2')
    frames = sum(r["val_images"] for r in folds)
    rechosen, test_note, speed_note = after_build_notes(record, meta)
    speed = record["throughput"]
    members_mean = {key: sum(m[key] or 0 for m in members) / len(members) for key in METRICS}
    student = record.get("student")
    fast_is = ("one network distilled from the ensemble, one model pass a frame (below)"
               if student else "its first member alone without TTA")
    first_alone = "first member alone, no TTA" if student else "`--fast` (first member, no TTA)"
    student_row = ("\n" + row("`--fast`: the distilled network, one pass", student["test"])
                   if student else "")
    card = f"""# raythyroid model `ddti`: thyroid nodule segmentation in ultrasound frames

{headline}.

`raythyroid infer ddti INPUT OUTPUT` uses it; `raythyroid infer ddti INPUT OUTPUT --fast` uses
{fast_is}. Built {meta['created']} by `{SCRIPT}`.

## Intended use and limits

- **Research use only. Not a medical device**; not validated for diagnosis, screening or any
  clinical decision. A person reviews every mask.
- Trained on one small public dataset: frames of one country's scanners (Colombia, DDTI), 8-bit
  B-mode frames as the scanners exported them{gland_too}. Other scanners, presets, Doppler
  overlays, children, other organs: unknown behaviour.
- One nodule class. A frame without a nodule is not in the training data: the model tends to
  find one anyway.
- Data terms: DDTI was published for research and education, without an explicit licence.
  Cite Pedraza L, Vargas C, Narvaez F, Duran O, Munoz E, Romero E. "An open access thyroid
  ultrasound image database." Proc. SPIE 9287, 92870W (2015), doi:10.1117/12.2073532. The
  weights are raythyroid's (Apache-2.0); no frame of the dataset is in the package.

## Data

- {DATA}.
- Split by case (patient), never by frame, seed 0: train {counts.get('train')}, validation
  {counts.get('val')}, test {counts.get('test')} frames. The test split trained nothing and chose
  nothing; it is scored once, at the end.
- Cross-validation pools train + validation ({frames} frames) into
  {len(folds)} case-disjoint folds; each fold model trains on four folds and validates on the
  fifth.
- Preparation (the same function in training and inference): desensitize (everything outside
  the scan region blanked, burned-in text with it; cropped to that region), CLAHE (clip {clip},
  tile {tile}), resize to {side} px.
{pretraining}
## Model and inference

- {len(meta['members'])} U-Nets (base width {meta['architecture']['base']}, depth
  {meta['architecture']['depth']}, {size_mb:.1f} MB of fp16 weights in all), one per fold: the
  weights of each fold's best validation epoch.
- Training recipe: `{config['loss']}` loss, {config['optimizer']} (lr
  {lr}, {config['schedule']}
  schedule), batch size {config['batch_size']}, `{config['augment']}` augmentation,
  {epochs} epochs per fold, precision {config['precision']}.
- Inference: the members' nodule probabilities are averaged; TTA: {tta(meta)}; threshold \
{meta['threshold']}; keep
  the {meta['postprocess']['keep_largest'] or 'all'} largest component(s). These were chosen \
as the variant with the best mean validation
  n_IoU over the folds, each fold scored by its own model.
{rechosen}
## Figures

Cross-validation (each fold model on its held-out fold, at its last epoch: no selection on the
fold itself):

| fold | frames | epochs | n_IoU | n_IoU/img | Dice | best epoch's n_IoU |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(fold_rows)}

Mean ± spread (population standard deviation) over folds: n_IoU {cv['last_n_iou_mean']:.4f} ±
{cv['last_n_iou_std']:.4f}, n_IoU/img {cv['last_n_iou_per_image_mean']:.4f} ±
{cv['last_n_iou_per_image_std']:.4f}. The members are each fold's best-epoch weights, chosen on
that fold's own validation cases, so their figure ({cv['best_n_iou_mean']:.4f} ±
{cv['best_n_iou_std']:.4f}) is a little optimistic; the last-epoch one is not.\
{pooled_sentence(cv, frames)}

The ensemble cannot be scored on the folds that trained it; the test split scores it
({test['images']} frames, original geometry, against the original masks, pooled over \
pixels{test_note}):

| inference | n_IoU | n_IoU/img | Dice |
| --- | ---: | ---: | ---: |
{row(f"ensemble of {len(meta['members'])}", test)}
{row(first_alone, fast)}{student_row}
{chr(10).join(row(f"member {k} alone, its fold's chosen inference", m)
              for k, m in enumerate(members))}
{row("mean of the members alone", members_mean)}

Images per second on the machine that built it ({record['machine']}), the infer job end to end \
on
{speed['frames']} frames: ensemble {speed['ensemble_images_per_s']:.1f}, {first_member_name(record)}
{speed['fast_images_per_s']:.1f}{speed_note}.
{student_section(record, test)}
## Rebuilding

{rebuilding(record, rebuilt_with)}"""
    return card, model_json


def write_rendered(dest: str, record: dict) -> str:
    """DEST's CARD.md and model.json rendered from `record`; returns the card's headline."""
    card, model_json = render(record)
    with open(os.path.join(dest, "model.json"), "w") as f:
        f.write(model_json)
    with open(os.path.join(dest, "CARD.md"), "w") as f:
        f.write(card)
    return json.loads(model_json)["card"]["headline"]


def write_test_frames(work: str) -> None:
    """WORKDIR/test-frames.txt: the source of every frame of the prepared test split."""
    from raythyroid import shards

    prepared = os.path.join(work, "prepared")
    rows = shards.read_rows(prepared, shards.read_manifest(prepared), "test", ["source_uri"])
    with open(os.path.join(work, "test-frames.txt"), "w") as f:
        f.write("".join(r["source_uri"] + "\n" for r in rows))


def copy_teacher(dest: str, out: str) -> None:
    """OUT: DEST's ensemble alone (its members and model.json, without the one-pass network
    an earlier release/ship_student.sh added), the teacher of the next student. An OUT made
    before must still be that ensemble (members and model.json), or the student of another
    would ship beside it: exit 2."""
    def ensemble(folder: str) -> tuple[dict, list[bytes]]:
        with open(os.path.join(folder, "model.json")) as f:
            meta = json.load(f)
        meta.pop(FAST, None)
        blobs = []
        for name in meta["members"]:
            with open(os.path.join(folder, name), "rb") as f:
                blobs.append(f.read())
        return meta, blobs

    meta, blobs = ensemble(dest)
    if os.path.exists(os.path.join(out, "model.json")):
        if ensemble(out) != (meta, blobs):
            print(f"ship_card: {out} holds another ensemble than {dest}: use a new WORKDIR",
                  file=sys.stderr)
            sys.exit(2)
        return
    os.makedirs(out, exist_ok=True)
    for name, blob in zip(meta["members"], blobs):
        with open(os.path.join(out, name), "wb") as f:
            f.write(blob)
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)


def copy_one_pass(model: str, out: str) -> None:
    """OUT: the network `infer MODEL --fast` runs, as a model folder of its own (the first
    member of the teacher, which has no distilled network: what --fast ran before one)."""
    from raythyroid import modelinfo

    with open(os.path.join(model, modelinfo.MODEL_JSON)) as f:
        meta = modelinfo.one_pass(json.load(f))
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(model, meta["weights"]), os.path.join(out, meta["weights"]))
    with open(os.path.join(out, modelinfo.MODEL_JSON), "w") as f:
        json.dump(meta, f, indent=2)


def write_half(model: str, out: str) -> None:
    """OUT: a one-network model folder with its weights in fp16, as the package keeps them
    (half the bytes; the student is scored and timed in this form)."""
    import torch

    from raythyroid import modelinfo

    weights = torch.load(os.path.join(model, modelinfo.WEIGHTS), map_location="cpu",
                         weights_only=True)
    os.makedirs(out, exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
               os.path.join(out, modelinfo.WEIGHTS))
    shutil.copy(os.path.join(model, modelinfo.MODEL_JSON), os.path.join(out, modelinfo.MODEL_JSON))


def ship_student(work: str, dest: str) -> None:
    """The student release/ship_student.sh built in WORKDIR into DEST, beside the ensemble:
    its fp16 weights, its figures in DEST's record, the card and model.json rendered again."""
    from raythyroid import modelinfo

    with open(os.path.join(dest, FIGURES)) as f:
        record = json.load(f)
    record["student"] = collect_student(work)
    shutil.copy(os.path.join(work, "student-fp16", modelinfo.WEIGHTS),
                os.path.join(dest, FAST_WEIGHTS))
    with open(os.path.join(dest, FIGURES), "w") as f:
        f.write(json.dumps(record, indent=2) + "\n")
    write_rendered(dest, record)
    print(f"{dest}: {FAST_WEIGHTS} ({record['student']['bytes'] / 1e6:.1f} MB), "
          f"{student_headline(record)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", nargs="?", help="a release/ship_ddti.sh WORKDIR")
    parser.add_argument("dest", nargs="?", help="the model folder to ship into")
    parser.add_argument("--render", metavar="DEST",
                        help=f"render DEST's CARD.md and model.json from DEST/{FIGURES} alone")
    parser.add_argument("--student", action="store_true",
                        help="ship release/ship_student.sh's student from WORKDIR into DEST")
    parser.add_argument("--teacher", nargs=2, metavar=("DEST", "OUT"),
                        help="copy DEST's ensemble alone into OUT")
    parser.add_argument("--one-pass", nargs=2, metavar=("MODEL", "OUT"),
                        help="copy the network `infer MODEL --fast` runs into OUT")
    parser.add_argument("--half", nargs=2, metavar=("MODEL", "OUT"),
                        help="copy a one-network MODEL into OUT with fp16 weights")
    parser.add_argument("--test-frames", metavar="WORKDIR",
                        help="write WORKDIR/test-frames.txt from WORKDIR/prepared's test split")
    args = parser.parse_args()
    if args.test_frames:
        return write_test_frames(args.test_frames)
    if args.teacher:
        return copy_teacher(*args.teacher)
    if args.one_pass:
        return copy_one_pass(*args.one_pass)
    if args.half:
        return write_half(*args.half)
    if args.render:
        if args.workdir:
            parser.error("--render DEST takes no WORKDIR")
        with open(os.path.join(args.render, FIGURES)) as f:
            record = json.load(f)
        write_rendered(args.render, record)
        print(f"{args.render}: CARD.md and model.json rendered from {FIGURES}")
        return
    if not args.dest:
        parser.error("WORKDIR and DEST, or --render DEST")
    if args.student:
        return ship_student(args.workdir, args.dest)
    record = collect(args.workdir)
    os.makedirs(args.dest, exist_ok=True)
    for name in os.listdir(args.dest):  # a new version replaces the old files
        os.remove(os.path.join(args.dest, name))
    for name in record["model"]["members"]:
        shutil.copy(os.path.join(args.workdir, "cv", "model", name),
                    os.path.join(args.dest, name))
    with open(os.path.join(args.dest, FIGURES), "w") as f:
        f.write(json.dumps(record, indent=2) + "\n")
    print(write_rendered(args.dest, record))
    print(f"{args.dest}: {len(record['model']['members'])} members, "
          f"{record['member_bytes'] / 1e6:.1f} MB, {FIGURES}, model.json, CARD.md")


if __name__ == "__main__":
    main()
