"""Deduplicate, then split by case: 7:2:1 by default, deterministic for a given seed.

Frames of one case come from one patient, so a case never spans two splits. Cases are ranked by
a hash of (seed, case id) and cut by quota, which gives the requested fractions exactly (by case
count) and keeps every non-empty split populated even on small sets.
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Iterable, Sequence

# case ids DICOM sets carry (dicom.read.case_hash): a hashed patient, the same patient in any
# set, where a folder's case ids ("1", "1_1") are only names within their own set
PATIENT_CASE_PREFIX = "p-"

SPLITS = ("train", "val", "test")


def natural_key(text: str) -> list:
    """`1_2` < `1_10` < `2_1`: numbers compare as numbers, so the kept duplicate is the one a
    person would list first."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def find_duplicates(records: Iterable[tuple[str, str]]) -> dict[str, str]:
    """(key, sha256) pairs -> {dropped key: key it duplicates}. The first key in natural order
    of each group of byte-identical images is kept."""
    first_by_hash: dict[str, str] = {}
    dropped: dict[str, str] = {}
    for key, digest in sorted(records, key=lambda r: natural_key(r[0])):
        if digest in first_by_hash:
            dropped[key] = first_by_hash[digest]
        else:
            first_by_hash[digest] = key
    return dropped


def parse_fractions(text: str) -> tuple[float, float, float]:
    from .errors import UserError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--split takes three numbers like 0.7,0.2,0.1, got {text!r}") from None
    if len(values) != 3 or any(v < 0 for v in values) or not math.isclose(sum(values), 1.0,
                                                                           abs_tol=1e-6):
        raise UserError(f"--split takes three fractions for train,val,test that sum to 1, "
                        f"got {text!r}")
    if values[0] == 0:
        raise UserError("--split needs a non-zero train fraction")
    return values  # type: ignore[return-value]


def _case_rank(case_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{case_id}".encode()).hexdigest()


def quotas(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder apportionment; every split with a non-zero fraction gets a case when
    there are enough cases to go round."""
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    return counts


def assign(rows: Iterable[tuple[str, str, str | None]], fractions: Sequence[float] = (0.7, 0.2, 0.1),
           seed: int = 0) -> dict[str, str]:
    """(key, case_id, fixed split or None) rows -> {key: split}.

    A split fixed by the dataset (TN3K's test set) binds the whole case; the remaining cases
    share the other splits in proportion to their fractions.
    """
    rows = list(rows)
    fixed_case: dict[str, str] = {}
    for _, case_id, fixed in rows:
        if fixed:
            fixed_case.setdefault(case_id, fixed)
    free_fractions = [0.0 if name in set(fixed_case.values()) else f
                      for name, f in zip(SPLITS, fractions)]
    total = sum(free_fractions)
    free_fractions = [f / total for f in free_fractions] if total > 0 else list(fractions)
    free_cases = sorted({case for _, case, _ in rows if case not in fixed_case},
                        key=lambda c: _case_rank(c, seed))
    case_split = dict(fixed_case)
    start = 0
    for name, count in zip(SPLITS, quotas(len(free_cases), free_fractions)):
        for case in free_cases[start:start + count]:
            case_split[case] = name
        start += count
    return {key: case_split[case_id] for key, case_id, _ in rows}


def folds(case_ids: Iterable[str], k: int, seed: int = 0, start: int = 0) -> dict[str, int]:
    """Case -> fold in 0..k-1: cases ranked by the same hash as the splits, dealt round-robin
    from fold `start % k` (where a deal of other cases left off), so fold sizes differ by at
    most one case and a case is never in two folds."""
    ranked = sorted(set(case_ids), key=lambda c: _case_rank(c, seed))
    return {case: (start + i) % k for i, case in enumerate(ranked)}
