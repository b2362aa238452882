"""Prepared shards -> decoded Ray datasets the workers (and cv's folds) train and validate on."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .. import imaging, losses, shards, split, storage
from ..errors import UserError


def decode_block(batch: pa.Table, with_weights: bool, folds: dict | None = None,
                 full: bool = False) -> dict:
    """Parquet rows -> numpy columns the workers consume (no strings: iter_torch_batches);
    distill decodes its taught rows with it too.

    `full` adds what scoring in each frame's own geometry needs: the label at its original
    size (PNG bytes, decoded when scored) and the geometry that maps a prediction back.
    """
    keys = batch.column("key").to_pylist()
    images = np.stack([imaging.decode_png(b) for b in batch.column("image").to_pylist()])
    masks = np.stack([imaging.decode_png(b) for b in batch.column("mask").to_pylist()])
    out = {"image": images, "mask": masks,
           # which worker scores this row during validation: stable, and independent of order
           "part": np.array([zlib.crc32(k.encode()) for k in keys], np.int64)}
    if with_weights:
        out["weight"] = np.stack([losses.boundary_weight_map(m) for m in masks]
                                 ).astype(np.float16)
    if folds is not None:  # cross-validation: which fold each row's case belongs to
        out["fold"] = np.array([folds[k] for k in keys], np.int64)
    if full:
        out["full_mask"] = np.array(batch.column("full_mask").to_pylist(), dtype=object)
        out["geometry"] = np.array([imaging.Geometry.from_dict(g).to_row()
                                    for g in batch.column("geometry").to_pylist()], np.int32)
    return out

FULL_COLUMNS = ["full_mask", "geometry"]


def load_split(data: shards.PreparedData, name, with_weights: bool = False,
               folds: Folds | None = None, full: bool = False):
    """One split (or a list of splits) of the prepared sets, every set's together, as a
    materialized Ray dataset, or None if empty. `folds` (`deal_folds`) adds a fold column for
    cross-validation; `full` the original-geometry labels validation scores against (shards
    from before they were written, in any of the sets, score in the prepared square instead)."""
    full = full and data.full_masks
    columns = ["key", "image", "mask"] + (FULL_COLUMNS if full else [])
    parts = []
    for i, prepared in enumerate(data.sets):
        uris = shards.shard_uris(prepared.uri, prepared.manifest, name)
        if uris:
            parts.append(read_shards(uris, columns, decode_block, with_weights=with_weights,
                                     folds=None if folds is None else folds.by_set[i],
                                     full=full))
    if not parts:
        return None
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).materialize()


@dataclass(frozen=True)
class Folds:
    """The prepared sets' train and val frames dealt into k case-disjoint folds."""

    k: int
    by_set: tuple[dict[str, int], ...]  # each set's key -> fold, in PreparedData's order
    cases: int

    @property
    def of_frames(self) -> list[int]:
        """Every frame's fold."""
        return [fold for dealt in self.by_set for fold in dealt.values()]


def deal_folds(data: shards.PreparedData, k: int, seed: int) -> Folds:
    """Each set's cases dealt into k folds among themselves: fold i is every set's fold i, so
    each fold holds its share of every set, and a case id two sets share stays two cases. The
    deal goes on where the set before left off, so fold sizes differ by at most one case
    overall; a single set is dealt exactly as split.folds deals it."""
    by_set, cases = [], 0
    for prepared in data.sets:
        uris = shards.shard_uris(prepared.uri, prepared.manifest, ["train", "val"])
        rows = read_shards(uris, ["key", "case_id"]).take_all() if uris else []
        case_fold = split.folds((r["case_id"] for r in rows), k, seed, start=cases)
        by_set.append({r["key"]: case_fold[r["case_id"]] for r in rows})
        cases += len(case_fold)
    if cases < k:
        raise UserError(f"{cases} cases cannot fill {k} folds")
    return Folds(k, tuple(by_set), cases)


DECODE_ROWS = 64  # rows per decoded block: a shard's images decoded at once would not fit


def read_shards(uris: list[str], columns: list[str], transform=None, **transform_args):
    """A Ray dataset of the shard files the manifest lists, one read task per file, each
    table (`columns` only) passed through `transform` DECODE_ROWS rows at a time.

    Not ray.data.read_parquet: in Ray 2.60 it first starts a pool of footer-reading actors
    (32 processes asked for, each call) to discover what the manifest already says, about 5 s
    a split on two cores where this takes under one."""
    import ray

    return ray.data.from_items([{"uri": uri} for uri in uris],
                               override_num_blocks=len(uris)).map_batches(
        _read_shard, fn_kwargs={"columns": columns, "transform": transform,
                                "transform_args": transform_args},
        batch_size=1, batch_format="numpy")


def _read_shard(batch: dict, columns: list[str], transform, transform_args: dict):
    for uri in batch["uri"]:
        table = storage.read_parquet(str(uri), columns)
        for start in range(0, table.num_rows, DECODE_ROWS):
            rows = table.slice(start, DECODE_ROWS)
            yield transform(rows, **transform_args) if transform else rows
