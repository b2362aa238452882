"""DICOM SEG in, as an annotation (preprocess, `--layout dicom`): the frames of the nodule
segment, the source frames they annotate, and each as a bool mask.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np

from ..pixels import DecodeError
from . import codecs

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
NODULE_CODE = "27925004"  # SNOMED CT "Nodule", the segmented property type our SEGs carry
# what raythyroid's own SEGs carry (seg_write), and a person's edit of one does not: a viewer
# that saves a corrected copy writes its own manufacturer, and a person's segment is MANUAL or
# SEMIAUTOMATIC
OUR_MANUFACTURER = "raythyroid"
OUR_ALGORITHM = "raythyroid U-Net"


@dataclass(frozen=True)
class SegReference:
    """One SEG frame of the nodule segment and the source frame it annotates."""

    sop_instance_uid: str
    frame: int | None  # 1-based source frame; None for single-frame sources
    seg_frame: int  # 1-based frame of the SEG


def nodule_references(ds) -> list[SegReference]:
    """The SEG frames of the segment labelled as a nodule (by label or SNOMED code), or of the
    only segment; DecodeError when the SEG has several and none is a nodule."""
    segments = list(ds.get("SegmentSequence", []) or [])
    if not segments:
        raise DecodeError("DICOM SEG without segments")
    if len(segments) == 1:
        chosen = int(segments[0].SegmentNumber)
    else:
        nodules = [int(s.SegmentNumber) for s in segments if _is_nodule(s)]
        if not nodules:
            raise DecodeError(f"DICOM SEG with {len(segments)} segments, none labelled a nodule")
        chosen = nodules[0]
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    references = []
    for number, item in enumerate(ds.get("PerFrameFunctionalGroupsSequence", []) or [], 1):
        identification = item.get("SegmentIdentificationSequence") or \
            (shared.get("SegmentIdentificationSequence") if shared else None)
        if not identification or int(identification[0].ReferencedSegmentNumber) != chosen:
            continue
        for derivation in item.get("DerivationImageSequence", []) or []:
            for source in derivation.get("SourceImageSequence", []) or []:
                frame = source.get("ReferencedFrameNumber")
                references.append(SegReference(str(source.ReferencedSOPInstanceUID),
                                               int(frame) if frame else None, number))
    if not references and len(ds.get("PerFrameFunctionalGroupsSequence", []) or []) == 1:
        # a one-frame SEG that names its source only in the series references
        instances = [i for s in ds.get("ReferencedSeriesSequence", []) or []
                     for i in s.get("ReferencedInstanceSequence", []) or []]
        if len(instances) == 1:
            references.append(SegReference(str(instances[0].ReferencedSOPInstanceUID), None, 1))
    return references


def made_by_raythyroid(ds) -> bool:
    """A SEG raythyroid stored and nobody edited: our manufacturer, and every segment our
    algorithm's automatic one."""
    if str(ds.get("Manufacturer", "") or "") != OUR_MANUFACTURER:
        return False
    for segment in ds.get("SegmentSequence", []) or []:
        algorithms = [str(a.get("AlgorithmName", "") or "") for a in
                      segment.get("SegmentationAlgorithmIdentificationSequence", []) or []]
        if str(segment.get("SegmentAlgorithmType", "")) != "AUTOMATIC" or \
                OUR_ALGORITHM not in algorithms:
            return False
    return True


def made_at(ds) -> str:
    """When the SEG was made, as a sortable string: its content's date and time, else its
    series', else its creation's; "" when it says none (such a SEG is the oldest)."""
    for date, time in (("ContentDate", "ContentTime"), ("SeriesDate", "SeriesTime"),
                       ("InstanceCreationDate", "InstanceCreationTime")):
        # digits only: older writers put separators in (2024.01.03, 14:04:38)
        day = re.sub(r"\D", "", str(ds.get(date, "") or ""))
        if day:
            # a DICOM time stops at any precision (HH, HHMM, HHMMSS.FFFFFF): pad both parts
            whole, _, fraction = str(ds.get(time, "") or "").strip().partition(".")
            return (day + re.sub(r"\D", "", whole).ljust(6, "0")
                    + re.sub(r"\D", "", fraction).ljust(6, "0"))
    return ""


def _is_nodule(segment) -> bool:
    label = str(segment.get("SegmentLabel", "") or "").lower()
    codes = segment.get("SegmentedPropertyTypeCodeSequence", []) or []
    return "nodule" in label or any(str(c.get("CodeValue", "")) == NODULE_CODE for c in codes)


def seg_mask(ds, seg_frame: int) -> np.ndarray:
    """One frame of a DICOM SEG (a dataset from read_dataset, parsed once for all its frames)
    as a bool mask; fractional SEGs: at least half the maximum."""
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= seg_frame <= count:
        raise DecodeError(f"DICOM SEG has no frame {seg_frame}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr, _ = codecs.decoder(ds.file_meta.TransferSyntaxUID).as_array(
                ds, index=seg_frame - 1 if count > 1 else None)
    except Exception as exc:
        raise DecodeError(f"corrupt DICOM SEG frame {seg_frame} ({type(exc).__name__})") from None
    if str(ds.get("SegmentationType", "BINARY")) == "FRACTIONAL":
        top = int(ds.get("MaximumFractionalValue", 255) or 255)
        return arr.astype(np.int64) * 2 >= top
    return arr > 0
