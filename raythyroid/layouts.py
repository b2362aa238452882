"""Dataset folders as they are published -> one row per image/mask pair.

A layout is data about where files sit, not code per dataset: each reader lists a root (local or
S3) and yields `Pair` rows plus `Problem` rows for what cannot be paired. Nothing is decoded here.
"""
from __future__ import annotations

import csv
import io
import json
import posixpath
import re
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from . import storage
from .errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LAYOUTS = ("auto", "folders", "ddti", "tn3k", "tnscui")


@dataclass
class Pair:
    key: str
    case_id: str
    image_uri: str
    mask_uri: str | None = None
    mask_polygons: str | None = None  # JSON [[[x, y], ...], ...] in image pixel coordinates
    split: str | None = None  # set where the dataset itself fixes the split (TN3K's test set)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Problem:
    key: str
    source_uri: str
    reason: str
    stage: str = "layout"

    def to_dict(self) -> dict:
        return asdict(self)


def case_of(key: str) -> str:
    """`12_3` -> `12`: frames of one patient share the stem before the last underscore."""
    folder, _, name = key.rpartition("/")
    case = name.rsplit("_", 1)[0] if "_" in name else name
    return f"{folder}/{case}" if folder else case


def _stem(relative_path: str) -> str:
    return posixpath.splitext(relative_path)[0]


def _index(root: str, suffixes=IMAGE_SUFFIXES, skip_dirs: tuple[str, ...] = ()
           ) -> tuple[dict[str, str], list[Problem]]:
    """stem (relative, '/'-separated) -> uri; a second file with the same stem is a Problem."""
    found: dict[str, str] = {}
    problems: list[Problem] = []
    for uri in storage.list_files(root, suffixes):
        rel = storage.relative(uri, root)
        if skip_dirs and any(part.lower() in skip_dirs for part in rel.split("/")[:-1]):
            continue
        stem = _stem(rel)
        if stem in found:
            problems.append(Problem(stem, uri, f"duplicate key: {storage.basename(found[stem])} "
                                                f"has the same name"))
            continue
        found[stem] = uri
    return found, problems


def _pair_folders(images_root: str, masks_root: str, key_prefix: str = "",
                  split: str | None = None, case_from_key=case_of
                  ) -> tuple[list[Pair], list[Problem]]:
    images, problems = _index(images_root)
    masks, mask_problems = _index(masks_root)
    problems += mask_problems
    pairs = []
    for stem, uri in sorted(images.items()):
        key = key_prefix + stem
        if stem not in masks:
            problems.append(Problem(key, uri, "no mask for image"))
            continue
        pairs.append(Pair(key, case_from_key(key), uri, mask_uri=masks[stem], split=split))
    for stem in sorted(set(masks) - set(images)):
        problems.append(Problem(key_prefix + stem, masks[stem], "mask without image"))
    return pairs, problems


def read_folders(root: str) -> tuple[list[Pair], list[Problem]]:
    return _pair_folders(storage.join(root, "images"), storage.join(root, "masks"))


def read_tn3k(root: str) -> tuple[list[Pair], list[Problem]]:
    """TN3K: trainval-image/ trainval-mask/ test-image/ test-mask/; its test set stays test.

    TN3K publishes no patient ids, so every image is its own case.
    """
    pairs, problems = _pair_folders(storage.join(root, "trainval-image"),
                                    storage.join(root, "trainval-mask"), "trainval/",
                                    case_from_key=lambda k: k)
    if storage.exists(storage.join(root, "test-image")):
        test_pairs, test_problems = _pair_folders(
            storage.join(root, "test-image"), storage.join(root, "test-mask"), "test/",
            split="test", case_from_key=lambda k: k)
        pairs += test_pairs
        problems += test_problems
    return pairs, problems


def read_tnscui(root: str) -> tuple[list[Pair], list[Problem]]:
    """TN-SCUI 2020: image/, mask/ and train.csv (ID, CATE); the csv says which images count."""
    pairs, problems = _pair_folders(storage.join(root, "image"), storage.join(root, "mask"),
                                    case_from_key=lambda k: k)
    csv_uri = storage.join(root, "train.csv")
    if not storage.exists(csv_uri):
        return pairs, problems
    listed = []
    for row in csv.DictReader(io.StringIO(storage.read_text(csv_uri))):
        ident = (row.get("ID") or row.get("id") or "").strip()
        if ident:
            listed.append(_stem(ident))
    wanted = set(listed)
    have = {p.key for p in pairs} | {p.key for p in problems}
    pairs = [p for p in pairs if p.key in wanted]
    problems = [p for p in problems if p.key in wanted]
    for key in sorted(wanted - have):
        problems.append(Problem(key, csv_uri, "listed in train.csv but no image"))
    return pairs, problems


_DDTI_FRAME = re.compile(r"^(\d+)_(\d+)$")


def _ddti_outlines(xml_bytes: bytes) -> tuple[str, dict[int, list]]:
    """DDTI XML -> (case number, frame -> list of outlines as [[x, y], ...])."""
    root = ET.fromstring(xml_bytes)
    number = (root.findtext("number") or "").strip()
    frames: dict[int, list] = {}
    for mark in root.iter("mark"):
        frame = int((mark.findtext("image") or "").strip())
        svg = (mark.findtext("svg") or "").strip()
        regions = json.loads(svg) if svg else []
        outlines = frames.setdefault(frame, [])
        for region in regions:
            outlines.append([[float(p["x"]), float(p["y"])] for p in region.get("points", [])])
    return number, frames


def read_ddti(root: str) -> tuple[list[Pair], list[Problem]]:
    """DDTI's native release: `<case>_<frame>.jpg` frames and one `<case>.xml` per case whose
    marks hold the outlines; every outline of a frame's mark is filled into its mask."""
    xml_uris = storage.list_files(root, (".xml",))
    images, problems = _index(root, skip_dirs=("mask", "masks"))
    frames_by_case: dict[str, dict[str, str]] = {}
    for stem, uri in images.items():
        match = _DDTI_FRAME.match(posixpath.basename(stem))
        if match:
            frames_by_case.setdefault(match.group(1), {})[match.group(2)] = uri

    def load(uri):
        try:
            return uri, _ddti_outlines(storage.read_bytes(uri)), None
        except Exception as exc:
            return uri, None, f"unreadable DDTI XML: {storage.describe_error(exc)}"

    pairs: list[Pair] = []
    seen_cases = set()
    with ThreadPoolExecutor(max_workers=16) as pool:
        for uri, parsed, error in pool.map(load, xml_uris):
            case_name = _stem(storage.basename(uri))
            if error:
                problems.append(Problem(case_name, uri, error))
                continue
            number, outlines = parsed
            case = number or case_name
            seen_cases.add(case)
            frames = frames_by_case.get(case, {})
            for frame, polygons in sorted(outlines.items()):
                key = f"{case}_{frame}"
                if str(frame) not in frames:
                    problems.append(Problem(key, uri, f"outline for frame {frame} but no image"))
                    continue
                pairs.append(Pair(key, case, frames[str(frame)],
                                  mask_polygons=json.dumps(polygons, separators=(",", ":"))))
            for frame, image_uri in sorted(frames.items()):
                if int(frame) not in outlines:
                    problems.append(Problem(f"{case}_{frame}", image_uri,
                                            f"no outline in {case_name}.xml for frame {frame}"))
    for case, frames in sorted(frames_by_case.items()):
        if case not in seen_cases:
            for frame, image_uri in sorted(frames.items()):
                problems.append(Problem(f"{case}_{frame}", image_uri,
                                        f"no annotation XML for case {case}"))
    pairs.sort(key=lambda p: p.key)
    return pairs, problems


READERS = {"folders": read_folders, "ddti": read_ddti, "tn3k": read_tn3k, "tnscui": read_tnscui}


def detect(root: str) -> str:
    def has(name):
        return storage.exists(storage.join(root, name))

    if has("trainval-image"):
        return "tn3k"
    if has("train.csv") and has("image") and has("mask"):
        return "tnscui"
    if has("images") and has("masks"):
        return "folders"
    if next(iter(storage.list_pages(root, (".xml",), page_size=1)), None):
        return "ddti"
    raise UserError(f"cannot tell the layout of {root}: expected images/ + masks/, DDTI XML "
                    f"files, trainval-image/ (TN3K) or image/ + mask/ + train.csv (TN-SCUI); "
                    f"pass --layout")


def scan(root: str, layout: str = "auto") -> tuple[str, list[Pair], list[Problem]]:
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect(root)
    pairs, problems = READERS[layout](root)
    if not pairs:
        raise UserError(f"no image/mask pairs found in {root} with the {layout} layout")
    return layout, pairs, problems
