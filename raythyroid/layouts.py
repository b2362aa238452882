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

MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# images may also be DICOM: `.dcm`, or no extension / a UID as the name (PACS exports)
IMAGE_SUFFIXES = MASK_SUFFIXES + (".dcm", ".dicom", "")
LAYOUTS = ("auto", "folders", "ddti", "tn3k", "tnscui", "dicom")


@dataclass
class Pair:
    key: str
    case_id: str
    image_uri: str
    mask_uri: str | None = None
    mask_polygons: str | None = None  # JSON [[[x, y], ...], ...] in image pixel coordinates
    split: str | None = None  # set where the dataset itself fixes the split (TN3K's test set)
    frame: int | None = None  # 1-based frame of a multi-frame image (DICOM cine)
    mask_frame: int | None = None  # 1-based frame of a DICOM SEG mask_uri

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
    """The path without a known extension; a DICOM UID name (`1.2.840.113619.2.55.3`) is
    kept whole, its last dot being no extension."""
    stem, ext = posixpath.splitext(relative_path)
    return stem if ext.lower() in IMAGE_SUFFIXES + (".xml",) else relative_path


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
    """Images and masks by stem. A multi-frame image (a DICOM cine `cine.dcm`) pairs with one
    mask per annotated frame, named `cine#<frame>.png` as infer names its frame keys."""
    images, problems = _index(images_root)
    masks, mask_problems = _index(masks_root, MASK_SUFFIXES)
    problems += mask_problems
    frame_masks: dict[str, dict[int, str]] = {}
    for stem, uri in masks.items():
        base, hash_, number = stem.rpartition("#")
        if hash_ and number.isdigit() and base in images and base not in masks:
            frame_masks.setdefault(base, {})[int(number)] = stem
    pairs = []
    for stem, uri in sorted(images.items()):
        key = key_prefix + stem
        if stem in frame_masks:
            for number, mask_stem in sorted(frame_masks[stem].items()):
                pairs.append(Pair(f"{key}#{number}", case_from_key(key), uri,
                                  mask_uri=masks[mask_stem], split=split, frame=number))
            continue
        if stem not in masks:
            problems.append(Problem(key, uri, "no mask for image"))
            continue
        pairs.append(Pair(key, case_from_key(key), uri, mask_uri=masks[stem], split=split))
    used = set(images) | {m for frames in frame_masks.values() for m in frames.values()}
    for stem in sorted(set(masks) - used):
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


SEGS_FROM = ("people", "any")  # which SEGs teach: a person's, or raythyroid's own too
SEVERAL_SEGS = ("newest", "refuse")  # one frame annotated by several SEGs


@dataclass(frozen=True)
class DicomRules:
    """Which SEGs of a dicom layout become masks. By default a person's: raythyroid's own
    SEGs, stored by infer and never edited, would teach the model its own mistakes; and of
    several SEGs of one frame the newest, a radiologist's latest correction."""

    segs_from: str = "people"
    several: str = "newest"

    def __post_init__(self):
        if self.segs_from not in SEGS_FROM or self.several not in SEVERAL_SEGS:
            raise UserError(f"SEGs from {self.segs_from!r}, several {self.several!r}: choose "
                            f"from {', '.join(SEGS_FROM)} and {', '.join(SEVERAL_SEGS)}")


@dataclass(frozen=True)
class DicomImage:
    """An image a SEG may reference: where it is, its frame count, and its key (its frames'
    keys add `#frame` when it has several)."""

    uri: str
    frames: int
    key: str


@dataclass(frozen=True)
class SegHeader:
    """A DICOM SEG as pairing reads it: its key, where it is, its header (pixels unread)."""

    key: str
    uri: str
    ds: object  # pydicom Dataset


@dataclass
class Annotated:
    """What SEGs annotate under DicomRules: one pair per frame (by key), the instances a SEG
    that teaches annotates, and those raythyroid's own SEGs annotate."""

    pairs: list[Pair]
    annotated: set[str]
    ours: set[str]


def pair_segs(segs: list[SegHeader], images: dict[str, DicomImage], rules: DicomRules,
              problems: list[Problem], where: str) -> Annotated:
    """The one choice of masks from SEGs, a folder's or a PACS's: each SEG's nodule segment
    (the one labelled or coded as a nodule, or its only segment) pairs each of its frames with
    the frame of `images` (by SOP Instance UID) it references, under `rules`. A reference to
    an image not in `images` (`where` names their home) or to a frame it lacks, and a SEG
    that cannot be read as an annotation, are error rows."""
    found, ours = _annotations(segs, images, rules, problems, where)
    chosen = _chosen_annotations(found, rules, problems)
    return Annotated([chosen[k] for k in sorted(chosen)],
                     {sop_uid for sop_uid, _ in found.values()}, ours)


def read_dicom(root: str, rules: DicomRules = DicomRules()) -> tuple[list[Pair], list[Problem]]:
    """DICOM images annotated by DICOM SEG objects, as hospitals store them (pair_segs). Keys
    are the image's path (without extension), `#frame` added for multi-frame images; the case,
    a hash of the patient, is read from the image when it is prepared. Only headers are read
    here."""
    images, segs, problems = _dicom_headers(root)
    found = pair_segs(segs, images, rules, problems, "the dataset")
    for sop_uid, image in sorted(images.items(), key=lambda item: item[1].uri):
        if sop_uid in found.annotated:
            continue
        if sop_uid in found.ours:
            problems.append(Problem(image.key, image.uri, "annotated only by raythyroid's own "
                                    "SEG, which no person edited (--segs-from any learns from "
                                    "it)", "skipped"))
        else:
            problems.append(Problem(image.key, image.uri, "no SEG references this image"))
    return found.pairs, problems


def _dicom_headers(root: str) -> tuple[dict[str, DicomImage], list[SegHeader], list[Problem]]:
    """Every file's header under `root`: the images by SOP Instance UID, the SEGs, and a
    problem row for each file that is neither."""
    from . import imaging
    from .dicom import read as dicom_read, seg_read

    def header(uri):
        try:
            data = storage.read_bytes(uri)
            if imaging.sniff_format(data) != "dicom":
                return uri, None, "not a DICOM file"
            return uri, dicom_read.read_dataset(data, stop_before_pixels=True), None
        except Exception as exc:
            reason = str(exc) if isinstance(exc, imaging.DecodeError) else \
                f"cannot read: {storage.describe_error(exc)}"
            return uri, None, reason

    images: dict[str, DicomImage] = {}
    segs: list[SegHeader] = []
    problems: list[Problem] = []
    with ThreadPoolExecutor(max_workers=16) as pool:
        for uri, ds, error in pool.map(header, storage.list_files(root, IMAGE_SUFFIXES)):
            key = _stem(storage.relative(uri, root))
            if error:
                problems.append(Problem(key, uri, error))
                continue
            sop_class = dicom_read.sop_class_of(ds)
            skip = dicom_read.non_image_reason(sop_class)
            if sop_class == seg_read.SEGMENTATION_STORAGE:
                segs.append(SegHeader(key, uri, ds))
            elif skip:
                problems.append(Problem(key, uri, skip, "skipped"))
            else:
                images[str(ds.get("SOPInstanceUID", ""))] = DicomImage(
                    uri, int(ds.get("NumberOfFrames", 1) or 1), key)
    return images, segs, problems


def _annotations(segs: list[SegHeader], images: dict[str, DicomImage], rules: DicomRules,
                 problems: list[Problem], where: str) -> tuple[dict, set[str]]:
    """Every frame key -> (the instance it is a frame of, [(made at, SEG uri, Pair)] in listing
    order) from the SEGs `rules` lets teach; and the instances raythyroid's own SEGs annotate."""
    from . import imaging
    from .dicom import seg_read

    found: dict[str, tuple[str, list]] = {}
    ours: set[str] = set()
    for seg in segs:
        try:
            references = seg_read.nodule_references(seg.ds)
        except imaging.DecodeError as exc:
            problems.append(Problem(seg.key, seg.uri, str(exc), "mask"))
            continue
        if rules.segs_from == "people" and seg_read.made_by_raythyroid(seg.ds):
            ours.update(ref.sop_instance_uid for ref in references)
            continue
        for ref in references:
            pair = _referenced_pair(seg, ref, images, where, problems)
            if pair is None:
                continue
            candidates = found.setdefault(pair.key, (ref.sop_instance_uid, []))[1]
            if any(listed == seg.uri for _, listed, _ in candidates):
                problems.append(Problem(pair.key, seg.uri, "the SEG annotates this frame twice "
                                        "(its first frame for it is kept)", "mask"))
                continue
            candidates.append((seg_read.made_at(seg.ds), seg.uri, pair))
    return found, ours


def _referenced_pair(seg: SegHeader, ref, images: dict[str, DicomImage], where: str,
                     problems: list[Problem]) -> Pair | None:
    """One SEG frame and the image frame it references as a pair; None, and an error row,
    where that image or frame is not there."""
    image = images.get(ref.sop_instance_uid)
    reason = None
    if image is None:
        reason = f"SEG references an image not in {where}"
    elif (ref.frame or 1) > image.frames:
        reason = f"SEG references frame {ref.frame} of an image of {image.frames} frame(s)"
    if reason:
        problems.append(Problem(f"{seg.key}#{ref.seg_frame}", seg.uri, reason, "mask"))
        return None
    frame = (ref.frame or 1) if image.frames > 1 else None
    key = image.key + (f"#{frame}" if frame else "")
    return Pair(key, image.key, image.uri, mask_uri=seg.uri, frame=frame,
                mask_frame=ref.seg_frame)


def _chosen_annotations(found: dict, rules: DicomRules, problems: list) -> dict[str, Pair]:
    """One annotation per frame: the newest (ties: the last listed), or with several
    refused, the first listed, and an error row for every other."""
    pairs = {}
    for key, (_, candidates) in found.items():
        if rules.several == "refuse":
            chosen = candidates[0]
        else:
            chosen = max(candidates, key=lambda c: (c[0], c[1]))
        pairs[key] = chosen[2]
        for made, seg_uri, _ in candidates:
            if seg_uri == chosen[1]:
                continue
            if rules.several == "refuse":
                problems.append(Problem(key, seg_uri, f"second annotation of this frame (first "
                                        f"in {storage.basename(chosen[1])}; --several-segs "
                                        f"newest keeps the newest)", "mask"))
            else:
                problems.append(Problem(key, seg_uri, f"an older annotation of this frame than "
                                        f"{storage.basename(chosen[1])}", "skipped"))
    return pairs


PACS_WHERE = "its study on the DICOMweb server"  # the images a PACS's SEG may reference


@dataclass
class PacsListing:
    """What a DICOMweb query holds for preprocess: in each study the filters match that has a
    SEG series, the instances of its SEG series (key, URI) and its images by SOP Instance
    UID. Keys are infer's: STUDY/SERIES/SOP UIDs, made safe (hashed when too long)."""

    segs: list[tuple[str, str]]
    images: dict[str, DicomImage]
    studies: int


def list_pacs(input_uri: str) -> PacsListing:
    """A DICOMweb INPUT's SEGs and the images they may reference: the studies the filters
    match, a series search for SEGs in each (Modality=SEG), then the instances of the studies
    that have one. Nothing is retrieved here."""
    from . import dicomweb

    query = dicomweb.parse(input_uri)
    listing = PacsListing([], {}, 0)
    series_pages, instance_pages = [0], [0]  # each kind of search's longest page
    for study in dicomweb.studies(query):
        segs = dicomweb.seg_series(query, study, series_pages)
        if not segs:
            continue
        listing.studies += 1
        for instance in dicomweb.study_instances(query, study, instance_pages):
            key, uri = storage.safe_key(instance.key), instance.uri(query)
            if instance.series in segs:
                listing.segs.append((key, uri))
            elif instance.has_pixels:
                listing.images[instance.sop] = DicomImage(uri, instance.frames, key)
    return listing


def pacs_layout(layout: str) -> str:
    """A DICOMweb INPUT is read as the dicom layout (images annotated by SEGs): `layout` must
    say so or leave it to us."""
    if layout not in ("auto", "dicom"):
        raise UserError(f"a DICOMweb INPUT holds DICOM images and SEGs: --layout dicom (or "
                        f"auto), not {layout}")
    return "dicom"


READERS = {"folders": read_folders, "ddti": read_ddti, "tn3k": read_tn3k, "tnscui": read_tnscui,
           "dicom": read_dicom}


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
    first = next(iter(storage.list_pages(root, (".dcm", ".dicom", ""), page_size=1)), None)
    if first:
        from . import imaging

        if imaging.sniff_format(storage.read_bytes(first[0])[:4096]) == "dicom":
            return "dicom"
    raise UserError(f"cannot tell the layout of {root}: expected images/ + masks/, DDTI XML "
                    f"files, trainval-image/ (TN3K), image/ + mask/ + train.csv (TN-SCUI) or "
                    f"DICOM images with DICOM SEG annotations; pass --layout")


def scan(root: str, layout: str = "auto", rules: DicomRules = DicomRules()
         ) -> tuple[str, list[Pair], list[Problem]]:
    """(layout, pairs, problems) of a dataset; `rules` choose a dicom layout's masks."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect(root)
    pairs, problems = read_dicom(root, rules) if layout == "dicom" else READERS[layout](root)
    if not pairs:
        raise UserError(f"no image/mask pairs found in {root} with the {layout} layout")
    return layout, pairs, problems
