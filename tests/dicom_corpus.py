"""Real-world DICOM for the tests: DDTI frames wrapped and recompressed by dcmtk and GDCM, the
way scanners and PACS write them, each carrying made-up patient tags.

Every container holds the same frames; `native` (dcmtk's decompression of the scanner-style
JPEG) is the uncompressed reference the others are compared with.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

TOOLS = ("img2dcm", "dcmodify", "dcmdjpeg", "dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmconv",
         "gdcmconv", "dciodvfy")
ULTRASOUND = "1.2.840.10008.5.1.4.1.1.6.1"
ULTRASOUND_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"

# made-up patient values: finding any of them in an output other than a SEG is a leak
PATIENT = {"PatientName": "Madeup^Ursula^Quinn", "PatientID": "MRN-MADEUP-40417",
           "PatientBirthDate": "19580214", "InstitutionName": "Madeup Thyroid Institute",
           "AccessionNumber": "ACC-MADEUP-9931", "StudyDate": "20261003",
           "ReferringPhysicianName": "Referrer^Madeup"}

# Containers of one frame. Lossless ones hold exactly `native`'s pixels (gray ones: its gray);
# a lossy one is compared with its own decompression by the reference tool (dcmtk's dcmdjpeg,
# GDCM's gdcmconv --raw), the "uncompressed frame" of that container: decoders may differ by a
# level or two, colour or bit-depth mistakes by far more.
LOSSLESS = ("native", "implicit-le", "explicit-be", "deflate", "no-meta", "rle",
            "jpeg-lossless-sv1", "jpeg-lossless", "jpeg-ls", "j2k-lossless")
GRAY = ("gray8", "gray16", "monochrome1", "palette")
LOSSY = {"jpeg-baseline": "native", "j2k-lossy": "j2k-lossy-decompressed",
         "jpeg-extended-12bit": "jpeg-extended-12bit-decompressed"}


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")


def _patient_keys() -> list[str]:
    keys = []
    for name, value in PATIENT.items():
        keys += ["-k", f"{name}={value}"]
    return keys


def build(jpegs: list[Path], root: Path, patient_id: str | None = None) -> dict[str, list[Path]]:
    """Every container of every frame under root/<container>/<frame>.dcm, plus root/cine.

    Returns container -> files (in the order of `jpegs`); `cine` is one multi-frame file.
    """
    import pydicom

    out: dict[str, list[Path]] = {}
    keys = _patient_keys()
    if patient_id:
        keys += ["-k", f"PatientID={patient_id}"]

    def target(kind: str, stem: str) -> Path:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stem}.dcm"
        out.setdefault(kind, []).append(path)
        return path

    for jpeg in jpegs:
        stem = jpeg.stem
        # a scanner's JPEG baseline ultrasound image (YBR_FULL_422), as sent to a PACS
        baseline = target("jpeg-baseline", stem)
        run("img2dcm", *keys, "-k", "Modality=US", str(jpeg), str(baseline))
        run("dcmodify", "-nb", "-m", f"SOPClassUID={ULTRASOUND}", str(baseline))
        native = target("native", stem)
        run("dcmdjpeg", str(baseline), str(native))
        run("dcmconv", "+ti", str(native), str(target("implicit-le", stem)))
        run("dcmconv", "+tb", str(native), str(target("explicit-be", stem)))
        run("dcmconv", "+td", str(native), str(target("deflate", stem)))
        run("dcmconv", "-F", str(native), str(target("no-meta", stem)))
        run("dcmcrle", str(native), str(target("rle", stem)))
        run("dcmcjpeg", "+e1", str(native), str(target("jpeg-lossless-sv1", stem)))
        run("dcmcjpeg", "+el", str(native), str(target("jpeg-lossless", stem)))
        run("dcmcjpls", str(native), str(target("jpeg-ls", stem)))
        # GDCM applies the colour transform inside the codestream but labels it RGB; the
        # standard's labels for that are YBR_RCT (reversible) and YBR_ICT (irreversible)
        j2k = target("j2k-lossless", stem)
        run("gdcmconv", "--j2k", str(native), str(j2k))
        run("dcmodify", "-nb", "-m", "PhotometricInterpretation=YBR_RCT", str(j2k))
        j2k = target("j2k-lossy", stem)
        run("gdcmconv", "--j2k", "--lossy", "-q", "60", str(native), str(j2k))
        run("gdcmconv", "--raw", str(j2k), str(target("j2k-lossy-decompressed", stem)))
        run("dcmodify", "-nb", "-m", "PhotometricInterpretation=YBR_ICT", str(j2k))
        _gray_variants(pydicom.dcmread(native), stem, target)
    _cine(out["native"], root, out)
    return out


def gray_of(native: Path) -> np.ndarray:
    """The gray frame the pipeline makes of the native (RGB) file: the reference for the
    grayscale containers."""
    from raythyroid import imaging

    return imaging.to_gray(imaging.open_frames(native.read_bytes()).frame(0))


def _gray_variants(native, stem: str, target) -> None:
    """Grayscale containers of the same frame, written by pydicom, the 12-bit one compressed
    by dcmtk: 8- and 16-bit MONOCHROME2, MONOCHROME1, PALETTE COLOR, JPEG extended 12-bit."""
    import io

    from raythyroid import imaging

    buffer = io.BytesIO()
    native.save_as(buffer)
    gray = imaging.to_gray(imaging.open_frames(buffer.getvalue()).frame(0))

    def write(kind, pixels, photometric, bits_stored, **extra):
        ds = native.copy()
        ds.PhotometricInterpretation = photometric
        ds.SamplesPerPixel = 1
        if "PlanarConfiguration" in ds:
            del ds.PlanarConfiguration
        ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
        for name, value in extra.items():
            setattr(ds, name, value)
            if name.endswith("Descriptor"):
                ds[name].VR = "US"
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        path = target(kind, stem)
        ds.save_as(path, enforce_file_format=True)
        return path

    write("gray8", gray, "MONOCHROME2", 8)
    write("gray16", gray.astype(np.uint16) * 257, "MONOCHROME2", 16)
    write("monochrome1", 255 - gray, "MONOCHROME1", 8)
    ramp = (np.arange(256, dtype=np.uint16) * 257).tobytes()
    write("palette", gray, "PALETTE COLOR", 8,
          RedPaletteColorLookupTableDescriptor=[256, 0, 16],
          GreenPaletteColorLookupTableDescriptor=[256, 0, 16],
          BluePaletteColorLookupTableDescriptor=[256, 0, 16],
          RedPaletteColorLookupTableData=ramp, GreenPaletteColorLookupTableData=ramp,
          BluePaletteColorLookupTableData=ramp)
    twelve = write("gray12-native", gray.astype(np.uint16) * 16, "MONOCHROME2", 12)
    extended = target("jpeg-extended-12bit", stem)
    run("dcmcjpeg", "+ee", str(twelve), str(extended))
    run("dcmdjpeg", str(extended), str(target("jpeg-extended-12bit-decompressed", stem)))


def _cine(natives: list[Path], root: Path, out: dict) -> None:
    """A multi-frame ultrasound cine of the frames (same size), JPEG baseline YBR_FULL_422
    by dcmtk, and its native twin."""
    import pydicom

    datasets = [pydicom.dcmread(p) for p in natives]
    shape = datasets[0].pixel_array.shape
    frames = [d for d in datasets if d.pixel_array.shape == shape]
    cine = frames[0].copy()
    cine.SOPClassUID = cine.file_meta.MediaStorageSOPClassUID = ULTRASOUND_MULTIFRAME
    cine.NumberOfFrames = len(frames)
    cine.FrameTime = 33.3
    cine.FrameIncrementPointer = 0x00181063
    cine.PixelData = b"".join(d.PixelData for d in frames)
    (root / "cine").mkdir(parents=True, exist_ok=True)
    native = root / "cine" / "cine-native.dcm"
    cine.save_as(native, enforce_file_format=True)
    jpeg = root / "cine" / "cine-jpeg.dcm"
    run("dcmcjpeg", "+eb", str(native), str(jpeg))
    out["cine-native"], out["cine-jpeg"] = [native], [jpeg]
    out["cine-frames"] = [Path(str(d.filename)) for d in frames]


def dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
