"""The prepared-data contract between preprocess and its readers (train, cv, benches):
where the manifest and shards live, and how to read them. preprocess writes it; nothing here
needs Ray."""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Sequence

from . import storage
from .errors import UserError
from .split import PATIENT_CASE_PREFIX

MANIFEST = "manifest.json"
ERRORS = "errors.parquet"


def read_manifest(data: str) -> dict:
    """The manifest of a finished preprocess output; its absence means the output is not done."""
    uri = storage.join(storage.normalize(data), MANIFEST)
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        raise UserError(f"{data} is not a finished preprocess output (no {MANIFEST})") from None
    except OSError as exc:
        raise UserError(f"cannot read {uri}: {storage.describe_error(exc)}") from None


def format_version(manifest: dict) -> int:
    """`raythyroid-preprocess/N` -> N (2 and later: shards carry full_mask)."""
    return int(str(manifest.get("format", "/1")).rsplit("/", 1)[-1])


def shard_uris(data: str, manifest: dict, names) -> list[str]:
    """The shard files of one split or a list of splits, as the manifest vouches for them."""
    names = [names] if isinstance(names, str) else names
    return [storage.join(data, s) for name in names for s in manifest["shards"].get(name) or []]


def read_rows(data: str, manifest: dict, names, columns: list[str] | None = None) -> list[dict]:
    """Every row of the named splits, in shard order (small data: demos, benches, tests)."""
    return [row for uri in shard_uris(data, manifest, names)
            for row in storage.read_parquet(uri, columns).to_pylist()]


@dataclass(frozen=True)
class PreparedSet:
    """One finished preprocess output: where it is and what its manifest says."""

    uri: str
    manifest: dict

    @property
    def provenance(self) -> dict:
        """What a model.json records of the set it learnt from."""
        return {"uri": self.uri, "counts": self.manifest["counts"],
                "created": self.manifest["created"]}


@dataclass(frozen=True)
class PreparedData:
    """The prepared sets one run learns from: usually one, or several (public data and a
    hospital's own frames) trained on as one. Each set keeps the split its preprocess made by
    case, so the union of their train parts trains, of their val parts validates and of their
    test parts tests, and no case crosses splits. A folder's case ids ("1", "1_1") belong to
    their set: the same id in two sets names two patients (each set is folded on its own,
    never merged by id). DICOM sets' ids are hashed patients, the same patient in any set, so
    sets sharing one are refused (read_prepared)."""

    sets: tuple[PreparedSet, ...]

    @property
    def uris(self) -> list[str]:
        return [s.uri for s in self.sets]

    @property
    def name(self) -> str:
        """How messages name the data: its URI, or its URIs joined by ' + '."""
        return " + ".join(self.uris)

    @property
    def prep(self) -> dict:
        return self.sets[0].manifest["prep"]

    def count(self, split: str) -> int:
        return sum(s.manifest["counts"].get(split) or 0 for s in self.sets)

    @property
    def full_masks(self) -> bool:
        """Whether every set's shards carry the original-geometry labels (format 2)."""
        return all(format_version(s.manifest) >= 2 for s in self.sets)

    @property
    def provenance(self) -> dict:
        """model.json's `data`: one set as it always was ({uri, counts, created}); several as
        {"sets": [each one's], "counts": summed by split} (model.ModelInfo.data_uris reads
        both)."""
        if len(self.sets) == 1:
            return self.sets[0].provenance
        splits = sorted({name for s in self.sets for name in s.manifest["counts"]})
        return {"sets": [s.provenance for s in self.sets],
                "counts": {name: self.count(name) for name in splits}}

    @property
    def param(self) -> str | list[str]:
        """The data as run records (cv.json, MLflow's parameters) name it: a URI, or a list."""
        return self.uris[0] if len(self.sets) == 1 else self.uris


def read_prepared(data: str | Sequence[str] | PreparedData) -> PreparedData:
    """One prepared set, or several to train on as one (a PreparedData already read is
    returned as it is). Several must be distinct sets prepared alike (one model.json records
    one preparation, which infer applies to every frame) that share no frame and no hashed
    patient; anything else is the user's mistake, refused in one line."""
    if isinstance(data, PreparedData):
        return data
    uris = [storage.normalize(u) for u in ([data] if isinstance(data, str) else data)]
    if not uris:
        raise UserError("no prepared data given")
    repeated = sorted({u for u in uris if uris.count(u) > 1})
    if repeated:
        raise UserError(f"{repeated[0]} is given twice: its frames would count twice")
    prepared = PreparedData(tuple(PreparedSet(u, read_manifest(u)) for u in uris))
    if len(uris) > 1:
        _check_compatible(prepared)
        _check_disjoint(prepared)
    return prepared


def _check_compatible(prepared: PreparedData) -> None:
    from .imaging import PrepConfig

    first, *others = prepared.sets
    config = PrepConfig.from_dict(first.manifest["prep"])
    for other in others:
        theirs = PrepConfig.from_dict(other.manifest["prep"])
        differs = [f"{k} {v} (not {getattr(config, k)})" for k, v in theirs.to_dict().items()
                   if v != getattr(config, k)]
        if differs:
            raise UserError(f"{other.uri} was prepared with {', '.join(differs)} as "
                            f"{first.uri} was: preprocess both with the same --size and "
                            f"--no-crop")


def _check_disjoint(prepared: PreparedData) -> None:
    """No frame and no patient in two sets: each set splits its own cases, so either could
    train in one and test in the other (a candidate `promote` scores on frames of patients it
    trained on). Byte-identical images are found by the hash preprocess dedupes with."""
    read = [read_rows(s.uri, s.manifest, list(s.manifest["shards"]), ["sha256", "case_id"])
            for s in prepared.sets]
    hashes = [{row["sha256"] for row in rows} for rows in read]
    patients = [{row["case_id"] for row in rows
                 if str(row["case_id"] or "").startswith(PATIENT_CASE_PREFIX)} for rows in read]
    for (a, in_a, pa), (b, in_b, pb) in itertools.combinations(
            zip(prepared.sets, hashes, patients), 2):
        if in_a & in_b:
            raise UserError(f"{a.uri} and {b.uri} share {len(in_a & in_b)} identical "
                            f"image(s): a frame could train in one and test in the other; "
                            f"prepare their frames as one set (preprocess dedupes them) or "
                            f"give one of them")
        if pa & pb:
            raise UserError(f"{a.uri} and {b.uri} hold frames of {len(pa & pb)} same "
                            f"patient(s): each set splits its own patients, so one could train "
                            f"in one and test in the other; prepare their frames as one set")
