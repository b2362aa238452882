"""Accuracy: what each change of the training recipe gives on DDTI's validation split.

Preprocesses ../shared/data/ddti (case-level 7:2:1 split) at 256 px (and 384 px for the size
variant), trains each recipe variant for the same wall-time budget on this machine, and records
the best validation n_IoU and n_IoU per image; the test split is never looked at here. The last
variant's model.json also lists the inference variants (flip TTA, keeping the largest
components) scored on validation.

    python bench/accuracy_bench.py [--minutes 8] [--ddti ../shared/data/ddti]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

from common import HERE, record  # noqa: E402

VARIANTS = [  # name, size, train flags: each row changes one thing from the row before
    ("paper: weighted CE, basic augmentation", 256,
     ["--loss", "weighted-ce", "--augment", "basic"]),
    ("Dice + CE", 256, ["--loss", "dice-ce", "--augment", "basic"]),
    ("+ strong augmentation (grid distortion, blur)", 256,
     ["--loss", "dice-ce", "--augment", "strong"]),
    ("+ 384 px input", 384, ["--loss", "dice-ce", "--augment", "strong"]),
]
DEFAULT_RECIPE = 3  # what `raythyroid train` does without flags
# what a variant recorded before a setting existed had in its place
UNSET = {"threshold": 0.5, "tta_zoom": 0.0}


def _describe(variant: dict) -> str:
    zoom = f" + zoom {variant['tta_zoom']:g}" if variant.get("tta_zoom") else ""
    return (f"TTA {'flip' + zoom if variant['tta'] else 'off'}, threshold "
            f"{variant.get('threshold', 0.5)}, keep largest {variant['keep_largest'] or 'all'}")


def cli(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "raythyroid.cli", *args],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--ddti", default=str(HERE.parent.parent / "shared" / "data" / "ddti"))
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "raythyroid-accuracy-bench"))
    parser.add_argument("--only", type=int, nargs="*", help="variant numbers to run (1-based)")
    parser.add_argument("--reuse", action="store_true",
                        help="report finished runs in --workdir instead of training them again")
    args = parser.parse_args()
    rows = ["| recipe (cumulative) | input | epochs in budget | best val n_IoU | "
            "best val n_IoU/img | inference chosen on val | its val n_IoU |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    default_meta = None
    for number, (name, size, flags) in enumerate(VARIANTS, 1):
        if args.only and number not in args.only:
            continue
        data = os.path.join(args.workdir, f"ddti-{size}")
        if not os.path.exists(os.path.join(data, "manifest.json")):
            cli("preprocess", args.ddti, data, "--size", str(size))
        run = os.path.join(args.workdir, f"run-{number}")
        model_json = os.path.join(run, "model", "model.json")
        if not (args.reuse and os.path.exists(model_json)):
            shutil.rmtree(run, ignore_errors=True)
            cli("train", data, run, "--time-limit", str(args.minutes), *flags)
        meta = json.load(open(model_json))
        best = meta["training"]["best_val"]
        chosen = max(meta["training"]["inference_variants"], key=lambda v: v["val_n_iou"])
        rows.append(f"| {number}. {name} | {size} | {meta['training']['epochs_run']} | "
                    f"{best['n_iou']:.4f} | {best['n_iou_per_image']:.4f} | "
                    f"{_describe(chosen)} | {chosen['val_n_iou']:.4f} |")
        if number == DEFAULT_RECIPE:
            default_meta = meta
    notes = [f"each variant trained for {args.minutes:g} minutes of wall time (data "
             f"preparation included) on 2 Ray Train workers; best epoch by val n_IoU"]
    if default_meta:
        variants = default_meta["training"]["inference_variants"]
        plain = variants[0]  # tta off, threshold 0.5, every component kept

        def best_where(**fixed):
            return max((v for v in variants
                        if all(v.get(k, UNSET.get(k)) == x for k, x in fixed.items())),
                       key=lambda v: v["val_n_iou"])

        notes.append(f"inference variants of the default recipe ({DEFAULT_RECIPE}.) on "
                     f"validation: plain n_IoU "
                     f"{plain['val_n_iou']:.4f} (n_IoU/img {plain['val_n_iou_per_image']:.4f})")
        for label, v in [
                ("+ flip TTA", best_where(tta=True, tta_zoom=0.0, threshold=0.5,
                                         keep_largest=0)),
                ("keep the 2 largest components", best_where(tta=False, threshold=0.5,
                                                             keep_largest=2)),
                ("keep the largest component", best_where(tta=False, threshold=0.5,
                                                          keep_largest=1)),
                ("best threshold alone", best_where(tta=False, keep_largest=0)),
                ("chosen", best_where())]:
            notes.append(f"{label} ({_describe(v)}): n_IoU {v['val_n_iou']:.4f} "
                         f"({v['val_n_iou'] - plain['val_n_iou']:+.4f}), n_IoU/img "
                         f"{v['val_n_iou_per_image']:.4f}")
    record("accuracy on DDTI validation (recipe changes)", rows, notes)


if __name__ == "__main__":
    main()
