"""Two builds of the bundled model side by side, fold by fold: is a recipe change worth keeping?

Each WORKDIR is one `bench/ship_ddti.sh` run (its cv over the same case-disjoint folds, then
the test split scored for the ensemble, --fast and each member). The folds pair up because
both runs dealt the same cases with the same seed; this refuses runs whose folds differ.

    python bench/cv_compare.py BEFORE AFTER [--names "from scratch" "pretrained"] [--record TITLE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def mean_sd(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.pstdev(values):.4f}"


def fold_table(before: dict, after: dict, names: list[str]) -> list[str]:
    """Validation at each fold's last epoch (cv's own figure: no selection on the fold)."""
    a, b = ({r["fold"]: r for r in run["folds"]} for run in (before, after))
    dealt = [(run["k"], run.get("config", {}).get("seed")) for run in (before, after)]
    if (dealt[0] != dealt[1] or sorted(a) != sorted(b)
            or any(a[k]["val_images"] != b[k]["val_images"] for k in a)):
        raise SystemExit("cv_compare: the two runs' folds differ (another --folds, seed or "
                         "data): their folds do not pair")
    lines = [f"| fold | val frames | n_IoU, {names[0]} | n_IoU, {names[1]} | change | "
             f"n_IoU/img, {names[0]} | n_IoU/img, {names[1]} |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    columns: dict[str, list[float]] = {"a": [], "b": [], "d": [], "ai": [], "bi": []}
    for k in sorted(a):
        x, y = a[k]["last"], b[k]["last"]
        row = {"a": x["n_iou"], "b": y["n_iou"], "d": y["n_iou"] - x["n_iou"],
               "ai": x["n_iou_per_image"], "bi": y["n_iou_per_image"]}
        for key, value in row.items():
            columns[key].append(value)
        lines.append(f"| {k} | {a[k]['val_images']} | {row['a']:.4f} | {row['b']:.4f} | "
                     f"{row['d']:+.4f} | {row['ai']:.4f} | {row['bi']:.4f} |")
    lines.append(f"| mean ± sd | | {mean_sd(columns['a'])} | {mean_sd(columns['b'])} | "
                 f"{statistics.fmean(columns['d']):+.4f} | {mean_sd(columns['ai'])} | "
                 f"{mean_sd(columns['bi'])} |")
    return lines


def test_table(before: Path, after: Path, names: list[str], folds: list[int]) -> list[str]:
    """The untouched test split: the ensemble, --fast and every member alone."""
    variants = [("ensemble of the %d" % len(folds), "test-ensemble"),
                ("`--fast` (member 0, no TTA)", "test-fast")]
    variants += [(f"member {k} alone", f"test-member-{k}") for k in folds]
    frames = read(before / "test-ensemble" / "metrics.json")["images"]
    header = " | ".join(f"{metric}, {name}" for metric in ("n_IoU", "n_IoU/img", "Dice")
                        for name in names)
    lines = [f"| on the test split ({frames} frames) | {header} |",
             "| --- |" + " ---: |" * 6]
    for label, folder in variants:
        pair = [read(run / folder / "metrics.json") for run in (before, after)]
        cells = [f"{m[key]:.4f}" for key in ("n_iou", "n_iou_per_image", "dice") for m in pair]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--names", nargs=2, default=["before", "after"])
    parser.add_argument("--record", metavar="TITLE", help="append to BENCHMARKS.md")
    args = parser.parse_args()
    for run in (args.before, args.after):
        if not (run / "cv" / "cv.json").exists():
            raise SystemExit(f"cv_compare: no finished cv in {run} (run bench/ship_ddti.sh)")
    before, after = (read(run / "cv" / "cv.json") for run in (args.before, args.after))
    lines = fold_table(before, after, args.names)
    folds = [r["fold"] for r in before["folds"]]
    if all((run / "test-ensemble" / "metrics.json").exists() for run in (args.before,
                                                                           args.after)):
        lines += [""] + test_table(args.before, args.after, args.names, folds)
    print("\n".join(lines))
    if args.record:
        from common import record

        record(args.record, lines, ["each fold's validation n_IoU at its last epoch, pooled "
                                    "over its held-out frames; the folds pair because both "
                                    "runs dealt the same cases"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
