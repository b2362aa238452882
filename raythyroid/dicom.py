"""DICOM frames for the pipeline: pixels and pixel spacing, nothing else.

Only the pixel data and the geometry tags are read out of a DICOM object. No patient, study,
institution or device identifier is ever copied into a row, a key, a log line or an error
message; the only output allowed to carry the source's patient and study modules is the opt-in
DICOM SEG (`write_segmentation`), which must, to be filed in the source's study.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from .imaging import DecodeError, check_size, normalize_pixels


ULTRASOUND_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


@dataclass
class DicomFrames:
    count: int
    height: int
    width: int
    spacing_mm: tuple[float, float] | None  # (row, column) pixel size


def _open(data: bytes):
    import pydicom

    try:
        return pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise DecodeError(f"unreadable DICOM ({type(exc).__name__})") from None


def spacing_mm(ds) -> tuple[float, float] | None:
    """PixelSpacing (mm), else the first ultrasound region's PhysicalDeltaY/X when its units
    are centimetres (code 3), as ultrasound scanners record calibration."""
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2 and float(spacing[0]) > 0:
        return float(spacing[0]), float(spacing[1])
    for region in ds.get("SequenceOfUltrasoundRegions", []) or []:
        units_x, units_y = region.get("PhysicalUnitsXDirection"), region.get("PhysicalUnitsYDirection")
        dx, dy = region.get("PhysicalDeltaX"), region.get("PhysicalDeltaY")
        if units_x == 3 and units_y == 3 and dx and dy and float(dx) > 0 and float(dy) > 0:
            return abs(float(dy)) * 10.0, abs(float(dx)) * 10.0
    return None


def inspect(data: bytes, max_pixels: int) -> tuple[object, DicomFrames]:
    """Parse the header, check sizes before any pixel is decoded."""
    ds = _open(data)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError("DICOM without pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception:
        raise DecodeError("DICOM without Rows/Columns") from None
    count = int(ds.get("NumberOfFrames", 1) or 1)
    check_size(cols, rows, max_pixels)
    return ds, DicomFrames(count, rows, cols, spacing_mm(ds))


def frame(ds, info: DicomFrames, index: int) -> np.ndarray:
    """One frame as uint8 gray or BGR; a corrupt frame raises DecodeError for that frame only."""
    from pydicom.pixels import convert_color_space, pixel_array

    try:
        arr = pixel_array(ds, index=index if info.count > 1 else None)
    except Exception as exc:
        raise DecodeError(f"corrupt DICOM frame {index + 1} of {info.count} "
                          f"({type(exc).__name__})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if photometric.startswith("YBR"):
            arr = convert_color_space(arr, photometric, "RGB")
        arr = arr[:, :, ::-1]  # RGB -> BGR, the order imaging works in
    elif photometric == "MONOCHROME1":  # inverted gray
        arr = arr.max() - arr
    return normalize_pixels(np.ascontiguousarray(arr))


def write_segmentation(source_data: bytes, masks: dict[int, np.ndarray]) -> bytes:
    """A DICOM SEG (binary, one segment "thyroid nodule") for the given source frames.

    `masks` maps a 0-based frame index to a bool mask in that frame's geometry. The SEG
    references the source instance (and frame) and copies its patient and study modules, which
    is what lets PACS file it in the same study and overlay it.
    """
    import copy

    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    source = _open(source_data)
    frames = sorted(masks)
    multi = int(source.get("NumberOfFrames", 1) or 1) > 1
    # highdicom builds multi-frame SEGs only for sources with a patient coordinate system,
    # which ultrasound cine loops lack: build it for the first frame, then add the others
    first = copy.deepcopy(source)
    if multi:  # the first frame, presented as a single-frame ultrasound image
        del first.NumberOfFrames
        first.SOPClassUID = ULTRASOUND_IMAGE_STORAGE
        first.PixelData = source.PixelData[: len(source.PixelData) // int(source.NumberOfFrames)]
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="thyroid nodule",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="raythyroid U-Net", version=_version(),
            family=codes.cid7162.ArtificialIntelligence))
    seg = hd.seg.Segmentation(
        source_images=[first], pixel_array=masks[frames[0]].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="raythyroid", manufacturer_model_name="raythyroid",
        software_versions=_version(), device_serial_number="0", omit_empty_frames=False)
    if multi:
        _add_source_frames(seg, source, masks, frames)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, seg, enforce_file_format=True)
    return buffer.getvalue()


def _add_source_frames(seg, source, masks: dict[int, np.ndarray], frames: list[int]) -> None:
    """One SEG frame per segmented source frame, each naming its source frame number."""
    import copy

    from pydicom.pixels import pack_bits

    template = seg.PerFrameFunctionalGroupsSequence[0]
    items = []
    for position, index in enumerate(frames, 1):
        item = copy.deepcopy(template)
        reference = item.DerivationImageSequence[0].SourceImageSequence[0]
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedFrameNumber = index + 1
        item.FrameContentSequence[0].DimensionIndexValues = [1, position]
        items.append(item)
    seg.PerFrameFunctionalGroupsSequence = items
    for reference in seg.get("SourceImageSequence", []):
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedFrameNumber = [i + 1 for i in frames]
    for series in seg.ReferencedSeriesSequence:
        for reference in series.ReferencedInstanceSequence:
            reference.ReferencedSOPClassUID = source.SOPClassUID
    seg.NumberOfFrames = len(frames)
    seg.PixelData = pack_bits(np.concatenate([masks[i].astype(np.uint8).ravel()
                                              for i in frames]))


def _version() -> str:
    from . import __version__

    return __version__
