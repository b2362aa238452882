"""The last step of bench/ship_ddti.sh: the cv ensemble's weights and model.json into the
package, with a model card (CARD.md, and its headline inside model.json for `raythyroid models`)
written from the figures the earlier steps measured.

    python bench/ship_card.py WORKDIR DEST
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import machine  # noqa: E402

DATA = "DDTI (../shared/data/ddti: 300 frames of 248 patients, 297 after removing duplicates)"
PRETRAIN_DATA = "TG3K (../shared/data/tg3k: 3,585 thyroid-gland frames)"


def pooled_sentence(cv: dict) -> str:
    """The out-of-fold frames scored as one set (cv.json from a cv that kept the folds'
    confusion totals): what to hold against a pooled score on new frames."""
    last, chosen = cv.get("last_pooled"), cv.get("inference_pooled")
    if not (last and chosen):
        return ""
    frames = sum(r["val_images"] for r in cv["folds"])
    return f"""

Pooled over all {frames} out-of-fold frames as one set (each frame weighs by its pixels, as in a
pooled score on new frames): n_IoU {last['n_iou']:.4f} at the last epochs; {chosen['n_iou']:.4f}
for the members as shipped with the ensemble's inference (a little high: their epochs and that
inference were chosen on these same frames)."""


def tta(meta: dict) -> str:
    if not meta["tta"]:
        return "off"
    zoom = meta.get("tta_zoom") or 0
    return ("the frame and its mirror image" + (f", each also shrunk to {zoom:g} of its side in "
            "a blank frame (a zoomed-out view)" if zoom else ""))


def training_seconds(run: str) -> float:
    """A training run's time across every stop and resume: its last epoch's elapsed_seconds."""
    with open(os.path.join(run, "history.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[-1]["elapsed_seconds"] if rows else 0.0


def fold_figures(fold: dict) -> dict:
    """What cv_compare pairs of a fold: its frames, epochs, last and best epoch's figures."""
    figures = ("n_iou", "n_iou_per_image", "dice")
    return {"fold": fold["fold"], "val_images": fold["val_images"], "epochs": fold["epochs"],
            "best_epoch": fold["best_epoch"],
            "last": {k: fold["last"][k] for k in figures},
            "best": {k: fold["best"][k] for k in figures}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("dest")
    args = parser.parse_args()
    work = args.workdir

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
    folds = cv["folds"]
    counts = manifest["counts"]
    epochs = max(r["epochs"] for r in folds)  # what the folds ran, whatever EPOCHS says now
    headline = (f"{len(folds)}-fold ensemble on DDTI: CV n_IoU {cv['last_n_iou_mean']:.3f} "
                f"± {cv['last_n_iou_std']:.3f}, test split n_IoU {test['n_iou']:.3f} "
                f"({test['images']} frames); research use only")
    # no path of the machine that built it travels with the model
    meta["data"]["uri"] = meta["training"]["cross_validation"]["data"] = DATA
    pretrained = bool(meta["training"]["config"].get("init"))
    if pretrained:
        gland = read("pretrain/model/model.json")
        pre_counts = read("tg3k-prepared/manifest.json")["counts"]
        meta["training"]["config"]["init"] = (
            f"a U-Net trained {gland['training']['epochs_run']} epochs on the gland masks of "
            f"{PRETRAIN_DATA} (bench/ship_ddti.sh PRETRAIN_EPOCHS)")
    meta["card"] = {"headline": headline, "cv": {k: v for k, v in cv.items()
                                                 if k.endswith(("_mean", "_std"))},
                    "test": {k: test[k] for k in ("n_iou", "n_iou_per_image", "dice",
                                                  "precision", "recall", "images")},
                    "test_fast": {k: fast[k] for k in ("n_iou", "n_iou_per_image", "dice")},
                    "test_members": [{k: m[k] for k in ("n_iou", "n_iou_per_image", "dice")}
                                     for m in members],
                    # each fold's own figures: a later build is compared with this one
                    # (bench/cv_compare.py) without this build's workdir
                    "folds": [fold_figures(r) for r in folds]}
    os.makedirs(args.dest, exist_ok=True)
    for name in os.listdir(args.dest):  # a new version replaces the old files
        os.remove(os.path.join(args.dest, name))
    for name in meta["members"]:
        shutil.copy(os.path.join(work, "cv", "model", name), os.path.join(args.dest, name))
    with open(os.path.join(args.dest, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)
    size_mb = sum(os.path.getsize(os.path.join(args.dest, n)) for n in meta["members"]) / 1e6

    def row(name: str, m: dict) -> str:
        return (f"| {name} | {m['n_iou']:.4f} | {m['n_iou_per_image'] or 0:.4f} | "
                f"{m['dice']:.4f} |")

    fold_rows = [f"| {r['fold']} | {r['val_images']} | {r['epochs']} | {r['last']['n_iou']:.4f} | "
                 f"{r['last']['n_iou_per_image'] or 0:.4f} | {r['last']['dice']:.4f} | "
                 f"{r['best']['n_iou']:.4f} (epoch {r['best_epoch']}) |" for r in folds]
    config = meta["training"]["config"]
    clip, tile, side = (meta["prep"].get("clahe_clip"), meta["prep"].get("clahe_tile"),
                        meta["prep"]["size"])
    fold_hours, longest_hours = sum(fold_seconds) / 3600, max(fold_seconds) / 3600
    pretraining = "" if not pretrained else f"""\
- Pretraining: every fold started from one U-Net first trained to segment the thyroid
  **gland** (not nodules) on {PRETRAIN_DATA}: {pre_counts.get('train')} frames trained,
  {pre_counts.get('val')} watched the gland loss (a random split: its frames are near-duplicates
  from a few videos, so it measures nothing here), {gland['training']['epochs_run']} epochs, the
  same preparation. TG3K is from Gong H. et al., "Multi-Task Learning for Thyroid Nodule
  Segmentation with Thyroid Region Prior", IEEE ISBI 2021, released for research use without an
  explicit licence; cite it. No TG3K frame is in the package either.
"""
    gland_too = ("; its starting point learned the gland on TG3K's frames (another public set)"
                 if pretrained else "")
    rebuilt_with = f"EPOCHS={epochs}" + (
        f" PRETRAIN_EPOCHS={gland['training']['epochs_run']}" if pretrained else "") + (
        f" SIZE={meta['prep']['size']}" if meta["prep"]["size"] != 256 else "") + (
        f' CV_FLAGS="{cv_flags}"' if cv_flags else "")
    prepared_in = seconds.get("preprocess", 0) + seconds.get("preprocess-tg3k", 0)
    preprocessing = (f"preprocessing took {prepared_in / 60:.1f} minutes" if seconds
                     else "preprocessing's time was not recorded (frames prepared before)")
    pretrain_minutes = training_seconds(os.path.join(work, "pretrain")) / 60 if pretrained else 0
    pretrain_time = (f" TG3K pretraining took {pretrain_minutes:.0f} minutes (two workers), then"
                     if pretrained else "")
    pooled_text = pooled_sentence(cv)
    card = f"""# raythyroid model `ddti`: thyroid nodule segmentation in ultrasound frames

{headline}.

`raythyroid infer ddti INPUT OUTPUT` uses it; `raythyroid infer ddti INPUT OUTPUT --fast` uses
its first member alone without TTA. Built {meta['created']} by `bench/ship_ddti.sh`.

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
- Cross-validation pools train + validation ({sum(r['val_images'] for r in folds)} frames) into
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
  {config['lr'] or ('1e-3' if config['optimizer'] == 'adamw' else '1e-2')}, {config['schedule']}
  schedule), batch size {config['batch_size']}, `{config['augment']}` augmentation,
  {epochs} epochs per fold, precision {config['precision']}.
- Inference: the members' nodule probabilities are averaged; TTA: {tta(meta)}; threshold
  {meta['threshold']}; keep the {meta['postprocess']['keep_largest'] or 'all'} largest
  component(s). These were chosen as the variant with the best mean validation n_IoU
  over the folds, each fold scored by its own model.

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
{cv['best_n_iou_std']:.4f}) is a little optimistic; the last-epoch one is not.{pooled_text}

The ensemble cannot be scored on the folds that trained it; the test split scores it
({test['images']} frames, original geometry, against the original masks, pooled over pixels):

| inference | n_IoU | n_IoU/img | Dice |
| --- | ---: | ---: | ---: |
{row(f"ensemble of {len(meta['members'])}", test)}
{row("`--fast` (first member, no TTA)", fast)}
{chr(10).join(row(f"member {k} alone, its fold's chosen inference", m)
              for k, m in enumerate(members))}
{row("mean of the members alone", {key: sum(m[key] or 0 for m in members) / len(members)
                                   for key in ("n_iou", "n_iou_per_image", "dice")})}

Images per second on the machine that built it ({machine()}), the infer job end to end on
{speed['frames']} frames: ensemble {speed['ensemble_images_per_s']:.1f}, `--fast`
{speed['fast_images_per_s']:.1f}.

## Rebuilding

`bench/ship_ddti.sh` ({rebuilt_with}) from `../shared/data`. On that machine
{preprocessing},{pretrain_time}
the {len(fold_seconds)} folds trained {fold_hours:.1f} hours in all
(each fold's own clock, stopped and resumed runs included; the longest {longest_hours:.1f} h;
two folds at a time on two cores, so about half that in wall time).
"""
    with open(os.path.join(args.dest, "CARD.md"), "w") as f:
        f.write(card)
    print(headline)
    print(f"{args.dest}: {len(meta['members'])} members, {size_mb:.1f} MB, CARD.md")


if __name__ == "__main__":
    main()
