"""DICOM in: recognised by content, headers read, frames decoded one at a time, colour
converted once, non-image objects skipped.

Decoding is pydicom's pixel pipeline (pydicom >= 3) with permissive plugins only: Pillow (JPEG
baseline, JPEG 2000), pyjpegls (JPEG-LS), pydicom itself (native, deflate, RLE) and, added by
`codecs`, imagecodecs for what those lack: JPEG lossless (process 14) and 12-bit JPEG extended.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np

from ..pixels import DecodeError, SkipInput, check_size, normalize_pixels
from ..split import PATIENT_CASE_PREFIX
# every decode asks codecs.decoder: without its plugin pydicom has no permissive decoder for
# JPEG lossless and 12-bit JPEG
from . import codecs

# SOP classes that hold no image to segment: a UID itself or the root of a family of UIDs (the
# first entry that matches wins, so KO comes before the SR family, and RT Image, a radiograph
# (None: an image), before the RT family). RT Dose and SEG carry pixel data, so the SOP class
# decides, never the presence of pixels.
_NON_IMAGE_CLASSES = (
    ("1.2.840.10008.5.1.4.1.1.88.59", "KO"),
    ("1.2.840.10008.5.1.4.1.1.88", "SR"),
    ("1.2.840.10008.5.1.4.1.1.11", "PR"),
    ("1.2.840.10008.5.1.4.1.1.481.1", None),
    ("1.2.840.10008.5.1.4.1.1.481", "RT"),
    ("1.2.840.10008.5.1.4.34", "RT"),
    ("1.2.840.10008.5.1.4.1.1.9", "waveform"),
    ("1.2.840.10008.5.1.4.1.1.104", "encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.66.4", "SEG"),
    ("1.2.840.10008.5.1.4.1.1.66.5", "surface segmentation"),
    ("1.2.840.10008.5.1.4.1.1.66", "raw data or registration"),
    ("1.2.840.10008.5.1.4.1.1.67", "real world value mapping"),
    ("1.2.840.10008.5.1.4.1.1.68", "surface"),
    ("1.2.840.10008.5.1.4.1.1.4.2", "MR spectroscopy"),
    ("1.2.840.10008.5.1.4.1.1.78", "measurements"),
    ("1.2.840.10008.5.1.4.1.1.79", "measurements"),
    ("1.2.840.10008.5.1.4.1.1.80", "measurements"),
    ("1.2.840.10008.5.1.4.1.1.81", "measurements"),
    ("1.2.840.10008.5.1.4.1.1.82", "measurements"),
    ("1.2.840.10008.5.1.4.1.1.90", "assessment"),
    ("1.2.840.10008.5.1.4.1.1.91", "annotation"),
    ("1.2.840.10008.5.1.4.1.1.200", "protocol"),
    ("1.2.840.10008.1.3.10", "DICOMDIR"),
)


_IMPLICIT_LE, _EXPLICIT_LE, _EXPLICIT_BE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                                            "1.2.840.10008.1.2.2")
# deflated data is inflated while the file is read: its pixels are native from then on
_NATIVE = (_IMPLICIT_LE, _EXPLICIT_LE, _EXPLICIT_BE, "1.2.840.10008.1.2.1.99")

# The first element of a dataset written without preamble and file meta: a group that
# every object starts with (file meta, DICOMDIR, identifying), in either byte order.
_FIRST_GROUPS = (0x0002, 0x0004, 0x0008)
_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
        b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST",
        b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}




def is_dicom(data: bytes) -> bool:
    """DICOM by content: `DICM` after the 128-byte preamble (whatever the preamble holds, a TIFF
    header included), or a bare dataset whose first element is a DICOM tag."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    if len(data) < 12:
        return False
    if data.startswith(b"DICM"):  # file meta without preamble
        return True
    for order in ("little", "big"):
        group = int.from_bytes(data[0:2], order)
        if group not in _FIRST_GROUPS:
            continue
        if data[4:6] in _VRS:  # explicit VR
            return True
        length = int.from_bytes(data[4:8], order)  # implicit VR: a plausible value length
        if length < len(data) or length == 0xFFFFFFFF:
            return True
    return False


def non_image_reason(sop_class: str | None) -> str | None:
    """`not an image (SR)` for SOP classes that hold no image to segment; None otherwise."""
    if not sop_class:
        return None
    sop_class = str(sop_class)
    for root, name in _NON_IMAGE_CLASSES:
        if sop_class == root or sop_class.startswith(root + "."):
            return f"not an image ({name})" if name else None
    return None


def instance_uids(ds) -> dict:
    """Where an image is in its archive: UIDs only, which name no one."""
    return {"study_uid": str(ds.get("StudyInstanceUID", "") or "") or None,
            "series_uid": str(ds.get("SeriesInstanceUID", "") or "") or None,
            "sop_uid": str(ds.get("SOPInstanceUID", "") or "") or None}


def header_bytes(ds) -> bytes:
    """The dataset without its pixel data, as a file: what a SEG copies and references, a few
    kB however large the image."""
    import pydicom
    from pydicom.dataset import FileDataset

    pixel_tags = {0x7FE00010, 0x7FE00008, 0x7FE00009}
    header = FileDataset(None, {}, file_meta=ds.file_meta, preamble=b"\0" * 128)
    for element in ds:  # a new dataset sharing the elements: the source keeps its pixels
        if element.tag not in pixel_tags:
            header.add(element)
    header.set_original_encoding(ds.is_implicit_VR, ds.is_little_endian,
                                 ds.original_character_set)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, header, enforce_file_format=False)
    return buffer.getvalue()


def case_hash(value: str) -> str:
    """A one-way id for a patient (or study): equal inputs give equal ids, the id gives
    nothing back."""
    return PATIENT_CASE_PREFIX + hashlib.sha256(b"raythyroid-case\0" + value.encode()
                                                ).hexdigest()[:20]


def read_dataset(data: bytes, stop_before_pixels: bool = False):
    """Bytes -> pydicom Dataset, with a transfer syntax in file meta even when the file had
    none (bare datasets: the syntax pydicom inferred while reading is the one the pixels use)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True,
                                 stop_before_pixels=stop_before_pixels)
    except Exception as exc:
        raise DecodeError(f"unreadable DICOM ({type(exc).__name__})") from None
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta or not _valid_uid(ds.file_meta.TransferSyntaxUID):
        implicit, little = ds.original_encoding
        if implicit is not None:
            ds.file_meta.TransferSyntaxUID = (
                _IMPLICIT_LE if implicit else _EXPLICIT_LE if little else _EXPLICIT_BE)
    return ds


def _valid_uid(uid) -> bool:
    text = str(uid or "")
    return bool(text) and all(part.isdigit() for part in text.split("."))


def sop_class_of(ds) -> str | None:
    value = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    return str(value) if value else None


def spacing_mm(ds) -> tuple[float, float] | None:
    """PixelSpacing (mm), else the first ultrasound region's PhysicalDeltaY/X when its units
    are centimetres (code 3), as ultrasound scanners record calibration."""
    try:
        spacing = ds.get("PixelSpacing")
        if spacing is not None and len(spacing) == 2 and float(spacing[0]) > 0:
            return float(spacing[0]), float(spacing[1])
        for region in ds.get("SequenceOfUltrasoundRegions", []) or []:
            units_x = region.get("PhysicalUnitsXDirection")
            units_y = region.get("PhysicalUnitsYDirection")
            dx, dy = region.get("PhysicalDeltaX"), region.get("PhysicalDeltaY")
            if units_x == 3 and units_y == 3 and dx and dy and float(dx) > 0 and float(dy) > 0:
                return abs(float(dy)) * 10.0, abs(float(dx)) * 10.0
    except (TypeError, ValueError):
        pass  # malformed calibration: areas stay in pixels
    return None


@dataclass
class DicomFrames:
    """One DICOM image object, header parsed; frames decode one at a time on demand."""

    ds: object
    count: int
    height: int
    width: int
    spacing_mm: tuple[float, float] | None
    case_id: str | None  # hash of PatientID (StudyInstanceUID when absent)
    available: int  # whole frames the pixel data holds (may disagree with `count`)
    cut_short: bool = False  # the data ends inside frame `available` + 1

    def frame(self, index: int) -> np.ndarray:
        """Frame `index` (0-based) as uint8 gray or BGR; DecodeError names what is wrong with
        that frame only."""
        if index == self.available and self.cut_short:
            raise DecodeError(f"DICOM pixel data cut short inside frame {index + 1} of "
                              f"{self.count}")
        if index >= self.available:
            raise DecodeError(f"DICOM frame {index + 1} of {self.count} missing: "
                              f"NumberOfFrames is {self.count} but the pixel data holds "
                              f"{self.available}")
        if self.available < self.count and str(self.ds.file_meta.TransferSyntaxUID) in _NATIVE:
            # pydicom checks the length of all frames: decode this one from its own bytes
            return _decode_frame(_native_frame(self.ds, index, self.height, self.width), 0, 1)
        return _decode_frame(self.ds, index, self.count)


def open_frames(data: bytes, max_pixels: int) -> DicomFrames:
    """Parse the header and check what can be checked before any pixel is decoded.

    Raises SkipInput for objects that are not images and DecodeError for broken ones.
    """
    ds = read_dataset(data)
    skip = non_image_reason(sop_class_of(ds))
    if skip:
        raise SkipInput(skip)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError("DICOM without pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception:
        raise DecodeError("DICOM without Rows/Columns") from None
    try:
        count = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise DecodeError(f"DICOM with an invalid NumberOfFrames "
                          f"({str(ds['NumberOfFrames'].value)[:20]!r})") from None
    if count < 1:
        raise DecodeError(f"DICOM with NumberOfFrames {count}")
    check_size(cols, rows, max_pixels)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    _check_syntax(syntax)
    patient = str(ds.get("PatientID", "") or "").strip()
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    case_id = case_hash(patient) if patient else case_hash(study) if study else None
    available, cut_short = _frames_present(ds, count, rows, cols)
    return DicomFrames(ds, count, rows, cols, spacing_mm(ds), case_id, available, cut_short)


def _check_syntax(syntax) -> None:
    if not syntax:
        raise DecodeError("DICOM without a transfer syntax")
    try:
        decoder = codecs.decoder(syntax)
    except NotImplementedError:
        raise DecodeError(f"unsupported transfer syntax {syntax}") from None
    if not decoder.is_available:
        raise DecodeError(f"no decoder installed for transfer syntax {syntax} "
                          f"({getattr(syntax, 'name', '')})")


def _frames_present(ds, count: int, rows: int, cols: int) -> tuple[int, bool]:
    """(whole frames the pixel data holds, whether it ends inside the next one): native data
    by its length, encapsulated data by its offset table or fragments, so a short file still
    yields the frames it has and names what it lacks."""
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if "PixelData" not in ds:
        return count, False
    if syntax in _NATIVE:
        bits = int(ds.get("BitsAllocated", 8) or 8)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frame_bits = rows * cols * samples * bits
        have_bits = len(ds.PixelData) * 8
        if frame_bits <= 0:
            return 0, False
        # subsampled YBR_FULL_422 holds 2 samples per pixel, not 3
        if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
            frame_bits = frame_bits * 2 // 3
        whole = have_bits // frame_bits
        return min(count, whole), whole < count and have_bits % frame_bits >= 8
    from pydicom.encaps import parse_basic_offsets, parse_fragments

    try:
        buffer = io.BytesIO(ds.PixelData)
        offsets = parse_basic_offsets(buffer)
        fragments, _ = parse_fragments(buffer)
    except Exception:
        return 0, True
    if offsets:
        return min(count, len(offsets)), False
    if "ExtendedOffsetTable" in ds:
        return min(count, len(ds.ExtendedOffsetTable) // 8), False
    # without an offset table one frame per fragment is the only reading that is safe
    return (count if count == 1 and fragments else min(count, fragments)), False


_PIXEL_MODULE = ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns",
                 "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                 "PlanarConfiguration", "RedPaletteColorLookupTableDescriptor",
                 "GreenPaletteColorLookupTableDescriptor", "BluePaletteColorLookupTableDescriptor",
                 "RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableData",
                 "BluePaletteColorLookupTableData")


def _native_frame(ds, index: int, rows: int, cols: int):
    import copy

    from pydicom.dataset import Dataset

    frame_bytes = rows * cols * int(ds.get("SamplesPerPixel", 1) or 1) * \
        int(ds.BitsAllocated) // 8
    single = Dataset()  # the Image Pixel module only: a copy of a large object is not needed
    single.file_meta = copy.deepcopy(ds.file_meta)
    for name in _PIXEL_MODULE:
        if name in ds:
            setattr(single, name, ds[name].value)
    single.PixelData = ds.PixelData[index * frame_bytes:(index + 1) * frame_bytes]
    return single


def _decode_frame(ds, index: int, count: int) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    syntax = ds.file_meta.TransferSyntaxUID
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # as_rgb: the decoder reports the colour space it produced, and pydicom converts
            # YBR to RGB only if the codec did not already: the conversion happens once
            arr, meta = codecs.decoder(syntax).as_array(
                ds, index=index if count > 1 else None, as_rgb=True)
    except Exception as exc:
        raise DecodeError(_frame_error(exc, index, count)) from None
    photometric = str(meta.get("photometric_interpretation")
                      or ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as exc:
            raise DecodeError(f"DICOM palette unreadable ({type(exc).__name__})") from None
        if arr.dtype != np.uint8:  # 16-bit palette entries: keep the top 8 bits
            arr = (arr >> 8).astype(np.uint8)
        photometric = "RGB"
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if photometric != "RGB":
            raise DecodeError(f"unsupported DICOM colour space {photometric}")
        arr = arr[:, :, ::-1]  # RGB -> BGR, the order imaging works in
    elif photometric == "MONOCHROME1":
        arr = _invert(arr, ds)
    return normalize_pixels(np.ascontiguousarray(arr))


def _invert(arr: np.ndarray, ds) -> np.ndarray:
    """MONOCHROME1 (white is 0) -> MONOCHROME2 across the full range of the stored bit depth,
    so the same pixel value maps to the same gray in every frame."""
    bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8) or 8)
    if int(ds.get("PixelRepresentation", 0) or 0):  # signed: -2^(b-1) .. 2^(b-1)-1
        return (-1 - arr.astype(np.int64)).astype(np.int32)
    return ((1 << bits) - 1 - arr.astype(np.int64)).clip(0).astype(np.uint32 if bits > 16
                                                                    else np.uint16)


def _frame_error(exc: Exception, index: int, count: int) -> str:
    text = str(exc)
    if "less than expected" in text or "truncated" in text.lower() or "too short" in text:
        return f"DICOM pixel data cut short (frame {index + 1} of {count})"
    return f"corrupt DICOM frame {index + 1} of {count} ({type(exc).__name__})"
