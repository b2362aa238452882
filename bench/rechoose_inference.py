"""Choose a cv-built ensemble's inference again, among the variants this version's training
tries (train.choose_inference), from its members on their own held-out folds, exactly as
`raythyroid cv` chose it (cv.shared_inference). With --write the choice and every variant's
figures go into the model's model.json.

For a model built before a variant existed (the bundled `ddti` predates TTA's zoomed-out view):
what its rebuild by bench/ship_ddti.sh would choose, without the hours of training again.

    python bench/rechoose_inference.py MODEL PREPARED [--write] [--record]

PREPARED: the preprocessed data the folds were dealt from (the split and fold seeds are in the
model's metadata); a fold whose frames do not match its member's count stops the script.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import pyarrow as pa

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from confidence_bench import every_fold  # noqa: E402

from raythyroid import cv, model, shards, split, storage, train  # noqa: E402


class HeldOut:
    """A fold's held-out frames in the batches training's validation reads (train.evaluate
    reads a Ray dataset's iter_batches; one process scores them all)."""

    def __init__(self, rows: list[dict]):
        self.columns = train.decode_block(pa.Table.from_pylist(rows), with_weights=False,
                                          full=True)

    def iter_batches(self, batch_size: int, **_):
        count = len(self.columns["image"])
        for start in range(0, count, batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.columns.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model `raythyroid cv` built, or its bundled name")
    parser.add_argument("prepared")
    parser.add_argument("--write", action="store_true", help="update the model's model.json")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    args = parser.parse_args()
    import torch

    rows = shards.read_rows(args.prepared, shards.read_manifest(args.prepared), ["train", "val"])
    seed, fold_nets, held_counts = every_fold(args.model)
    case_fold = split.folds((r["case_id"] for r in rows), len(fold_nets), seed)
    cpu, fold_variants = torch.device("cpu"), []
    for fold, (net, _) in enumerate(fold_nets):
        held = [r for r in rows if case_fold[r["case_id"]] == fold]
        if held_counts[fold] not in (None, len(held)):
            raise SystemExit(f"rechoose_inference: {args.prepared} deals fold {fold} "
                             f"{len(held)} frames where its member held out {held_counts[fold]}")
        chosen = train.choose_inference(net, HeldOut(held), 0, 1, cpu, False, 16)
        fold_variants.append(chosen["val_variants"])
        print(f"fold {fold}: {len(held)} frames; its own best: "
              f"{model.describe_tta(chosen['tta'], chosen['tta_zoom'])}, "
              f"{chosen['postprocess']}", file=sys.stderr)
    shared = cv.shared_inference(fold_variants)
    lines = ["| TTA | threshold | components kept | mean val n_IoU over folds | pooled | "
             "by fold |", "|---|---|---|---|---|---|"]
    lines += [f"| {model.describe_tta(v['tta'], v['tta_zoom'])} | {v['threshold']} | "
              f"{v['keep_largest'] or 'all'} | {v['mean_val_n_iou']:.4f} | "
              f"{v['pooled_val_n_iou']:.4f} | "
              f"{' '.join(f'{x:.4f}' for x in v['val_n_iou_by_fold'])} |"
              for v in sorted(shared["variants"], key=lambda v: -v["mean_val_n_iou"])[:12]]
    if args.record:
        from common import record

        record(f"{args.model}: the ensemble's inference chosen again over its members' "
               f"held-out folds", lines,
               [f"the 12 best of {len(shared['variants'])} variants; each fold scored by its "
                f"own member, in original geometry, fp32; the first row is the choice"])
    else:
        print("\n".join(lines))
    if args.write:
        path = os.path.join(model.resolve(args.model), model.MODEL_JSON)
        meta = json.loads(storage.read_text(path))
        meta.update(tta=shared["tta"], tta_zoom=shared["tta_zoom"],
                    threshold=shared["threshold"])
        meta["postprocess"]["keep_largest"] = shared["keep_largest"]
        crossed = meta["training"]["cross_validation"]
        crossed.update(inference_pooled=shared["pooled"],
                       inference_variants=shared["variants"])
        storage.write_text(path, json.dumps(meta, indent=2))  # as model.save writes it
        print(f"rechoose_inference: {path}: TTA "
              f"{model.describe_tta(shared['tta'], shared['tta_zoom'])}, threshold "
              f"{shared['threshold']}, keep {shared['keep_largest'] or 'all'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
