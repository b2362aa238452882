"""Two builds of the bundled model side by side, fold by fold: is a recipe change worth keeping?

Each build is a `release/ship_ddti.sh` WORKDIR (its cv over the same case-disjoint folds, then
the test split scored for the ensemble, --fast and each member), or a model it built: a model
folder or a bundled model's name (`ddti`), whose model.json keeps its folds' and test figures,
so the shipped build is compared with no workdir kept. While a WORKDIR's cv still runs, its
finished folds are compared (stop a candidate early when they come out lower). The folds pair
up because both builds dealt the same cases with the same seed; this refuses builds whose fold
count, seed or any fold's frames differ (a cv still running has no fold count or seed on
record yet: its folds' frames are checked).

    python release/cv_compare.py BEFORE AFTER [--names "shipped" "candidate"] [--record TITLE]

BEFORE and AFTER may also be a cv RUN or a `raythyroid distill --folds` RUN: its folds' own
validation figures (a distilled student's fold k against the member that taught it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def mean_sd(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.pstdev(values):.4f}"


TEST_FOLDERS = {"test": "test-ensemble", "test_fast": "test-fast"}


def load_build(where: str) -> dict:
    """{"k", "seed", "folds": [fold.json records], "test": {test folder: metrics}} of a WORKDIR
    (k and seed None while its cv runs) or of a model ship_ddti.sh built."""
    work = Path(where)
    if list(work.glob("fold-*/fold.json")):  # a cv or `distill --folds` RUN itself
        done = [read(f) for f in sorted(work.glob("fold-*/fold.json"))]
        summary = read(work / "cv.json") if (work / "cv.json").exists() else {}
        return {"k": summary.get("k"), "seed": summary.get("config", {}).get("seed"),
                "folds": done, "test": {}}
    if (work / "cv").is_dir():
        test = {folder.name: read(folder / "metrics.json")
                for folder in sorted(work.glob("test-*")) if (folder / "metrics.json").exists()}
        if (work / "cv" / "cv.json").exists():
            summary = read(work / "cv" / "cv.json")
            return {"k": summary["k"], "seed": summary.get("config", {}).get("seed"),
                    "folds": summary["folds"], "test": test}
        return {"k": None, "seed": None, "test": test,
                "folds": [read(f) for f in sorted(work.glob("cv/fold-*/fold.json"))]}
    from raythyroid import model

    meta_path = Path(model.resolve(where)) / model.MODEL_JSON
    meta = read(meta_path) if meta_path.exists() else {}
    card = meta.get("card", {})
    if not card.get("folds"):
        raise SystemExit(f"cv_compare: {where} is neither a release/ship_ddti.sh WORKDIR nor a "
                         "model it built")
    training = meta["training"]
    test = {folder: card[key] for key, folder in TEST_FOLDERS.items()}
    test.update({f"test-member-{k}": m for k, m in enumerate(card["test_members"])})
    return {"k": training["cross_validation"]["folds"], "seed": training["config"]["seed"],
            "folds": card["folds"], "test": test}


def fold_table(before: dict, after: dict, names: list[str]) -> list[str]:
    """Validation at each fold's last epoch (cv's own figure: no selection on the fold), over
    the folds both builds have finished."""
    a, b = ({r["fold"]: r for r in run["folds"]} for run in (before, after))
    dealt = [(run["k"], run["seed"]) for run in (before, after)]
    both = sorted(set(a) & set(b))
    if (None not in dealt[0] + dealt[1] and dealt[0] != dealt[1]) or not both or any(
            a[k]["val_images"] != b[k]["val_images"] for k in both):
        raise SystemExit("cv_compare: the two builds' folds differ (another --folds, seed or "
                         "data) or none has finished in both: their folds do not pair")
    a, b = {k: a[k] for k in both}, {k: b[k] for k in both}
    lines = [f"| fold | val frames | n_IoU, {names[0]} | n_IoU, {names[1]} | change | "
             f"n_IoU/img, {names[0]} | n_IoU/img, {names[1]} |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    columns: dict[str, list[float]] = {"a": [], "b": [], "d": [], "ai": [], "bi": []}
    for k in sorted(a):
        x, y = a[k]["last"], b[k]["last"]
        # a fold with no nodule pixel in its frames has no per-image figure (cv writes None)
        row = {"a": x["n_iou"], "b": y["n_iou"], "d": y["n_iou"] - x["n_iou"],
               "ai": x["n_iou_per_image"] or 0.0, "bi": y["n_iou_per_image"] or 0.0}
        for key, value in row.items():
            columns[key].append(value)
        lines.append(f"| {k} | {a[k]['val_images']} | {row['a']:.4f} | {row['b']:.4f} | "
                     f"{row['d']:+.4f} | {row['ai']:.4f} | {row['bi']:.4f} |")
    lines.append(f"| mean ± sd | | {mean_sd(columns['a'])} | {mean_sd(columns['b'])} | "
                 f"{statistics.fmean(columns['d']):+.4f} | {mean_sd(columns['ai'])} | "
                 f"{mean_sd(columns['bi'])} |")
    return lines


def test_table(before: dict, after: dict, names: list[str], folds: list[int]) -> list[str]:
    """The untouched test split: the ensemble, --fast and every member alone."""
    variants = [("ensemble of the %d" % len(folds), "test-ensemble"),
                ("`--fast` (member 0, no TTA)", "test-fast")]
    variants += [(f"member {k} alone", f"test-member-{k}") for k in folds]
    frames = before["test"]["test-ensemble"]["images"]
    header = " | ".join(f"{metric}, {name}" for metric in ("n_IoU", "n_IoU/img", "Dice")
                        for name in names)
    lines = [f"| on the test split ({frames} frames) | {header} |",
             "| --- |" + " ---: |" * 6]
    for label, folder in variants:
        pair = [run["test"][folder] for run in (before, after)]
        cells = [f"{m[key] or 0:.4f}" for key in ("n_iou", "n_iou_per_image", "dice")
                 for m in pair]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="a release/ship_ddti.sh WORKDIR, or a model it built")
    parser.add_argument("after", help="the same")
    parser.add_argument("--names", nargs=2, default=["before", "after"])
    parser.add_argument("--record", metavar="TITLE", help="append to BENCHMARKS.md")
    args = parser.parse_args()
    before, after = load_build(args.before), load_build(args.after)
    lines = fold_table(before, after, args.names)
    folds = [r["fold"] for r in before["folds"]]
    wanted = ["test-ensemble", "test-fast"] + [f"test-member-{k}" for k in folds]
    if all(folder in run["test"] for run in (before, after) for folder in wanted):
        lines += [""] + test_table(before, after, args.names, folds)
    print("\n".join(lines))
    if args.record:  # bench/common.py appends to bench/BENCHMARKS.md
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
        from common import record

        record(args.record, lines, ["each fold's validation n_IoU at its last epoch, pooled "
                                    "over its held-out frames; the folds pair because both "
                                    "runs dealt the same cases"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
