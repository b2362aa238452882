"""DICOM SEG out: one binary segment, "thyroid nodule", for a source's frames, filed in the
source's study. highdicom builds it; the workarounds here make it take the sources archives
hold (multi-frame ultrasound, 2D classes without a Frame of Reference, missing or malformed
Type 2 attributes) and reference each under its real SOP class.
"""
from __future__ import annotations

import io
import re
import warnings

import numpy as np

from . import seg_read
from .read import read_dataset

ULTRASOUND_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
_SINGLE_FRAME_CLASSES = {  # IODs without Number of Frames: no frame numbers in references
    "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1", "1.2.840.10008.5.1.4.1.1.1.3",
    "1.2.840.10008.5.1.4.1.1.1.3.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.128"}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SERIES_DESCRIPTION = "raythyroid nodule"
# Type 2 attributes of the patient and study modules that highdicom copies from the source:
# absent in some exports, present and empty is what the standard allows in their place
_TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID",
                 "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName")


def write_segmentation(source_data: bytes, masks: dict[int, np.ndarray],
                       model_id: str = "", model_version: str = "") -> bytes:
    """A DICOM SEG (binary, one segment "thyroid nodule") for the given source frames.

    `masks` maps a 0-based frame index to a bool mask in that frame's geometry. The SEG
    references the source instance (and frame) and copies its patient and study modules, which
    is what lets PACS file it in the same study and overlay it. Its UIDs derive from the
    source (its series, its instance) and `model_id`, so writing it again gives the same
    object, and another model's SEG another one. `model_version` (the model version label)
    is the segment's algorithm version and in the series description, where a viewer shows
    which version drew it. `source_data` may be the header alone.
    """
    import pydicom

    # the header is all a SEG copies or references: the pixels are neither parsed nor copied
    source = read_dataset(source_data, stop_before_pixels=True)
    frames = sorted(masks)
    multi = int(source.get("NumberOfFrames", 1) or 1) > 1
    first = _first_frame_source(source, multi)
    try:
        seg = _build_segmentation(first, masks[frames[0]], source, model_id, model_version)
    except ValueError as exc:
        if "Frame Of Reference" not in str(exc):
            raise
        # highdicom wants a Frame of Reference for CT/MR-like classes; a source that lacks one
        # is segmented as the 2D picture it is, referenced under its real class below
        first.SOPClassUID = _SECONDARY_CAPTURE
        seg = _build_segmentation(first, masks[frames[0]], source, model_id, model_version)
    # LO: 64 characters at most
    seg.SeriesDescription = (f"{SERIES_DESCRIPTION}, model {model_version}" if model_version
                             else SERIES_DESCRIPTION)[:64]
    if multi:
        _add_source_frames(seg, source, masks, frames)
    _reference_real_class(seg, source, frames if multi else None)
    if "PatientOrientation" not in seg:
        # General Image, Type 2C: needed unless the planes are oriented in patient space
        # (ultrasound and secondary capture never are); "may be present otherwise"
        seg.PatientOrientation = source.get("PatientOrientation", "")
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.get("PixelMeasuresSequence")
    if measures and "SliceThickness" not in measures[0]:
        # without a slice thickness (2D sources) the macro is incomplete: leave it out
        del shared.PixelMeasuresSequence
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, seg, enforce_file_format=True)
    return buffer.getvalue()


def _first_frame_source(source, multi: bool):
    """A copy of the source as highdicom accepts it: single-frame, Type 2 attributes present."""
    import copy

    from pydicom.uid import generate_uid

    first = copy.deepcopy(source)
    if multi:  # highdicom builds multi-frame SEGs only for sources in patient space
        del first.NumberOfFrames
        first.SOPClassUID = ULTRASOUND_IMAGE_STORAGE
    for name in _TYPE2_COPIED:
        if name not in first:
            setattr(first, name, "")
    for name, parse in (("StudyDate", "DA"), ("StudyTime", "TM"), ("PatientBirthDate", "DA")):
        if not _parses(first.get(name), parse):
            setattr(first, name, "")  # a malformed value is copied as "unknown", not refused
    if first.get("PatientIdentityRemoved") == "YES" and "DeidentificationMethod" not in first \
            and "DeidentificationMethodCodeSequence" not in first:
        first.DeidentificationMethod = "not recorded in the source"
    instance = str(source.get("SOPInstanceUID", "") or "")
    if "StudyInstanceUID" not in first:
        first.StudyInstanceUID = generate_uid(entropy_srcs=["study", instance])
    if "SeriesInstanceUID" not in first:
        first.SeriesInstanceUID = generate_uid(entropy_srcs=["series", instance])
    if "Modality" not in first:
        first.Modality = "OT"
    return first


_DA = re.compile(r"\d{8}")
_TM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")


def _parses(value, vr: str) -> bool:
    """A DA/TM value in the standard's form (older exporters write `1997.04.24`, `14:04:38`)."""
    if value in (None, ""):
        return True
    return bool((_DA if vr == "DA" else _TM).fullmatch(str(value).strip()))


def segmentation_uid(source_instance: str, model_id: str) -> str:
    """The SOP Instance UID of the SEG `model_id` writes for a source instance: derived, never
    drawn, so a retried or repeated write is the same object."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["raythyroid seg", source_instance, model_id]))


def _build_segmentation(first, mask: np.ndarray, source, model_id: str, model_version: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    instance = str(source.get("SOPInstanceUID", "") or "")
    series = str(first.SeriesInstanceUID)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="thyroid nodule",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            # LO: 64 characters at most
            name=seg_read.OUR_ALGORITHM, version=(model_version or _version())[:64],
            family=codes.cid7162.ArtificialIntelligence))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom's remarks on the source's name formats
        return hd.seg.Segmentation(
            source_images=[first], pixel_array=mask.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            # one SEG series per source series and model; one SEG per source instance
            series_instance_uid=generate_uid(entropy_srcs=["raythyroid seg series", series,
                                                           model_id]),
            series_number=900,
            sop_instance_uid=segmentation_uid(instance, model_id),
            instance_number=1, manufacturer=seg_read.OUR_MANUFACTURER,
            manufacturer_model_name=seg_read.OUR_MANUFACTURER,
            software_versions=_version(), device_serial_number="0", omit_empty_frames=False)


def _reference_real_class(seg, source, frames: list[int] | None) -> None:
    """Every reference names the source's own SOP class, and frame numbers only where that
    class has frames."""
    sop_class = str(source.SOPClassUID)
    numbered = frames is not None and sop_class not in _SINGLE_FRAME_CLASSES
    references = list(seg.get("SourceImageSequence", []))
    for item in seg.PerFrameFunctionalGroupsSequence:
        for derivation in item.get("DerivationImageSequence", []):
            references.extend(derivation.get("SourceImageSequence", []))
    for reference in references:
        reference.ReferencedSOPClassUID = sop_class
        if not numbered and "ReferencedFrameNumber" in reference:
            del reference.ReferencedFrameNumber
    for series in seg.ReferencedSeriesSequence:
        for reference in series.ReferencedInstanceSequence:
            reference.ReferencedSOPClassUID = sop_class


def _add_source_frames(seg, source, masks: dict[int, np.ndarray], frames: list[int]) -> None:
    """One SEG frame per segmented source frame, each naming its source frame number.

    A cine loop's frames are a time series: besides the segment number, each SEG frame is
    indexed by its temporal position (the source frame's order), so the dimension index
    has one value per dimension, as the Multi-frame Dimension module requires.
    """
    import copy

    from pydicom.dataset import Dataset
    from pydicom.pixels import pack_bits

    temporal = Dataset()
    temporal.DimensionIndexPointer = 0x00209128  # Temporal Position Index
    temporal.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
    temporal.DimensionOrganizationUID = seg.DimensionIndexSequence[0].DimensionOrganizationUID
    temporal.DimensionDescriptionLabel = "Source frame"
    # the segment number and the source frame; a plane-position dimension that highdicom adds
    # for sources in patient space (an MR or CT cine) would leave frames a value short
    seg.DimensionIndexSequence = [seg.DimensionIndexSequence[0], temporal]
    template = seg.PerFrameFunctionalGroupsSequence[0]
    items = []
    for position, index in enumerate(frames, 1):
        item = copy.deepcopy(template)
        reference = item.DerivationImageSequence[0].SourceImageSequence[0]
        reference.ReferencedFrameNumber = index + 1
        content = item.FrameContentSequence[0]
        content.DimensionIndexValues = [1, position]
        content.TemporalPositionIndex = position
        items.append(item)
    seg.PerFrameFunctionalGroupsSequence = items
    for reference in seg.get("SourceImageSequence", []):
        reference.ReferencedFrameNumber = [i + 1 for i in frames]
    seg.NumberOfFrames = len(frames)
    seg.PixelData = pack_bits(np.concatenate([masks[i].astype(np.uint8).ravel()
                                              for i in frames]))


def _version() -> str:
    from .. import __version__

    return __version__
