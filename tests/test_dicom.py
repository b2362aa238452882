"""DICOM as archives hold it: files written by dcmtk, GDCM and the pydicom test suite, decoded
to the uncompressed frame; non-images skipped; SEGs that pass dciodvfy and read back in
highdicom; preprocess from DICOM images with PNG or SEG masks."""
from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

import dicom_corpus as corpus
from raythyroid import imaging, layouts, phantom
from raythyroid.imaging import DecodeError, PrepConfig, SkipInput

from helpers import PATIENT_ID, PATIENT_NAME, make_dicom, missing
from pacs import viewer_seg


def pydicom_file(name: str) -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files" / name


def frames_of(path: Path):
    return imaging.open_frames(path.read_bytes())


# ---------------------------------------------------------------- decoding

def test_every_container_gives_the_uncompressed_frame(dicom_corpus):
    """Lossless containers give the model the exact input of the uncompressed frame; lossy ones
    differ by decoder rounding only. The syntax and photometric of each file are checked, so
    the test cannot silently test another container."""
    import pydicom

    _, files = dicom_corpus
    expected = {
        "native": ("1.2.840.10008.1.2.1", "RGB"), "implicit-le": ("1.2.840.10008.1.2", "RGB"),
        "explicit-be": ("1.2.840.10008.1.2.2", "RGB"),
        "deflate": ("1.2.840.10008.1.2.1.99", "RGB"), "rle": ("1.2.840.10008.1.2.5", "RGB"),
        "jpeg-baseline": ("1.2.840.10008.1.2.4.50", "YBR_FULL_422"),
        "jpeg-lossless-sv1": ("1.2.840.10008.1.2.4.70", "RGB"),
        "jpeg-lossless": ("1.2.840.10008.1.2.4.57", "RGB"),
        "jpeg-ls": ("1.2.840.10008.1.2.4.80", "RGB"),
        "j2k-lossless": ("1.2.840.10008.1.2.4.90", "YBR_RCT"),
        "j2k-lossy": ("1.2.840.10008.1.2.4.91", "YBR_ICT"),
        "gray8": ("1.2.840.10008.1.2.1", "MONOCHROME2"),
        "gray16": ("1.2.840.10008.1.2.1", "MONOCHROME2"),
        "monochrome1": ("1.2.840.10008.1.2.1", "MONOCHROME1"),
        "palette": ("1.2.840.10008.1.2.1", "PALETTE COLOR"),
        "jpeg-extended-12bit": ("1.2.840.10008.1.2.4.51", "MONOCHROME2"),
    }
    prep = PrepConfig(size=128)
    natives = files["native"]
    reference = [imaging.prepare(frames_of(p).frame(0), prep)[0] for p in natives]
    gray = [corpus.gray_of(p) for p in natives]
    for kind, (syntax, photometric) in expected.items():
        for index, path in enumerate(files[kind]):
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if kind != "no-meta":
                assert str(ds.file_meta.TransferSyntaxUID) == syntax, (kind, path)
            assert ds.PhotometricInterpretation == photometric, (kind, path)
            frame = frames_of(path).frame(0)
            if kind in corpus.LOSSY:
                # against the reference tool's decompression: decoders differ by a level
                decompressed = frames_of(files[corpus.LOSSY[kind]][index]).frame(0)
                difference = np.abs(imaging.to_gray(frame).astype(int)
                                    - imaging.to_gray(decompressed))
                assert difference.mean() < 0.5 and difference.max() <= 4, (kind, path)
                # and the loss itself stays small against the uncompressed original
                assert np.abs(imaging.to_gray(frame).astype(int) - gray[index]).mean() < 1.0
            else:
                model_input = imaging.prepare(frame, prep)[0]
                assert np.array_equal(model_input, reference[index]), (kind, path)
    # a bare dataset: no preamble, no file meta, the syntax inferred from the bytes
    bare = files["no-meta"][0].read_bytes()
    assert bare[128:132] != b"DICM" and imaging.sniff_format(bare) == "dicom"


def test_multiframe_cine_one_frame_at_a_time(dicom_corpus):
    _, files = dicom_corpus
    cine, native = frames_of(files["cine-jpeg"][0]), frames_of(files["cine-native"][0])
    singles = files["cine-frames"]
    assert cine.count == native.count == len(singles) >= 2
    for index, single in enumerate(singles):
        assert np.array_equal(native.frame(index), frames_of(single).frame(0))
        difference = np.abs(imaging.to_gray(cine.frame(index)).astype(int)
                            - imaging.to_gray(native.frame(index)))
        assert difference.mean() < 2.0


def test_pydicom_test_files_tiff_preambles_colour_and_depths():
    import pydicom

    # valid DICOM whose preamble is a TIFF header: recognised as DICOM, not misread as TIFF
    for name in ("examples_rgb_color.dcm", "CT_small.dcm", "MR_small.dcm"):
        data = pydicom_file(name).read_bytes()
        assert data[:4] in (b"II*\x00", b"MM\x00*") and imaging.sniff_format(data) == "dicom"
        assert frames_of(pydicom_file(name)).frame(0).shape[:2] == \
            pydicom.dcmread(pydicom_file(name)).pixel_array.shape[:2]
    # one picture stored as RGB (RLE) and as YBR_FULL_422 / YBR_FULL JPEG: colour converted once
    rgb = frames_of(pydicom_file("SC_rgb_rle.dcm")).frame(0).astype(int)
    for name in ("SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm",
                 "SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm",
                 "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_gdcm_KY.dcm"):
        assert np.abs(frames_of(pydicom_file(name)).frame(0) - rgb).mean() < 3, name
    # JPEG 2000 with YBR_RCT, the ultrasound one and GDCM's
    assert frames_of(pydicom_file("examples_jpeg2k.dcm")).frame(0).shape == (480, 640, 3)
    assert frames_of(pydicom_file("GDCMJ2K_TextGBR.dcm")).frame(0).shape == (400, 400, 3)
    # 12-bit JPEG extended decodes to what the 12-bit reference values say
    extended = frames_of(pydicom_file("JPGExtended.dcm")).frame(0)
    assert extended.shape == (1024, 256) and extended.max() > 0
    palette = frames_of(pydicom_file("examples_palette.dcm")).frame(0)
    assert palette.ndim == 3 and palette.shape == (350, 800, 3)
    cine = frames_of(pydicom_file("examples_ybr_color.dcm"))
    assert cine.count == 30 and cine.frame(29).shape == (240, 320, 3)


def test_monochrome1_is_inverted_against_its_bit_depth():
    """A 12-bit MONOCHROME1 frame using part of its range equals the MONOCHROME2 frame with
    values 4095 - v, not max - v of that frame."""
    from pydicom import dcmread

    values = np.random.default_rng(0).integers(1000, 2001, (64, 64), dtype=np.uint16)

    def write(pixels, photometric):
        ds = dcmread(pydicom_file("MR_small.dcm"))
        ds.PhotometricInterpretation = photometric
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer)
        return buffer.getvalue()

    inverted = imaging.open_frames(write(values, "MONOCHROME1")).frame(0)
    expected = imaging.open_frames(write((4095 - values).astype(np.uint16), "MONOCHROME2")).frame(0)
    assert np.array_equal(inverted, expected)
    wrong = imaging.to_uint8((values.max() - values).astype(np.uint16))
    assert not np.array_equal(inverted, wrong)


def test_non_images_are_skipped_by_sop_class():
    cases = {"reportsi.dcm": "not an image (SR)", "test-SR.dcm": "not an image (SR)",
             "rtplan.dcm": "not an image (RT)", "rtdose.dcm": "not an image (RT)",
             "rtstruct.dcm": "not an image (RT)", "waveform_ecg.dcm": "not an image (waveform)",
             "liver_1frame.dcm": "not an image (SEG)", "ExplVR_LitEndNoMeta.dcm":
                 "not an image (RT)", "dicomdirtests/DICOMDIR": "not an image (DICOMDIR)"}
    for name, reason in cases.items():
        with pytest.raises(SkipInput) as caught:
            frames_of(pydicom_file(name))
        assert str(caught.value) == reason, name
    # RT Image is a radiograph inside the RT family: segmented as CT and MR frames are
    from pydicom import dcmread

    ds = dcmread(pydicom_file("MR_small.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.1"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    assert imaging.open_frames(buffer.getvalue()).frame(0).shape == (64, 64)


def _native_cine(frames: int, declared: int | None = None, cut: int = 0) -> bytes:
    from pydicom import dcmread

    ds = dcmread(pydicom_file("MR_small.dcm"))
    pixels = np.arange(frames * 64 * 64, dtype=np.uint16).reshape(frames, 64, 64) % 3000
    ds.NumberOfFrames = declared or frames
    data = pixels.tobytes()
    ds.PixelData = data[:len(data) - cut] if cut else data
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def test_broken_dicom_names_what_is_wrong_and_keeps_the_rest():
    from pydicom import dcmread

    # cut short inside frame 2 of 3: frame 1 decodes, 2 is cut short, 3 is missing
    short = imaging.open_frames(_native_cine(3, cut=64 * 64 * 2 + 100))
    assert short.frame(0).shape == (64, 64)
    with pytest.raises(DecodeError, match=r"pixel data cut short inside frame 2 of 3"):
        short.frame(1)
    with pytest.raises(DecodeError, match=r"frame 3 of 3 missing"):
        short.frame(2)
    # NumberOfFrames says 5, the data holds 3
    liar = imaging.open_frames(_native_cine(3, declared=5))
    assert [liar.frame(i).shape for i in range(3)] == [(64, 64)] * 3
    with pytest.raises(DecodeError, match="NumberOfFrames is 5 but the pixel data holds 3"):
        liar.frame(3)
    # an unknown transfer syntax
    ds = dcmread(pydicom_file("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(DecodeError, match=r"unsupported transfer syntax 1\.2\.3\.4\.5\.6"):
        imaging.open_frames(buffer.getvalue())


def test_files_named_by_uid_are_listed(tmp_path):
    from raythyroid import sources

    (tmp_path / "1.2.840.113619.2.55.3.6041").write_bytes(pydicom_file("MR_small.dcm").read_bytes())
    (tmp_path / "notes.txt").write_text("x")
    table, _ = sources.list_inputs(str(tmp_path))
    assert table.column("key").to_pylist() == ["1.2.840.113619.2.55.3.6041"]


# ---------------------------------------------------------------- infer: masks, SEG, skipped

SEG_KINDS = ("native", "jpeg-baseline", "gray8", "gray16", "monochrome1", "palette",
             "j2k-lossless", "j2k-lossy", "jpeg-extended-12bit", "jpeg-lossless-sv1")


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_infer_dicom_archive_masks_seg_and_skipped(dicom_corpus, ddti, trained_run, ray_local,
                                                   tmp_path):
    """One infer run over every container, a cine, and non-image objects: masks of lossless
    containers equal the uncompressed frame's, lossy ones overlap them (IoU >= 0.98); every SEG
    passes dciodvfy and reads back in highdicom equal to the PNG masks; non-images are skipped
    rows, counted apart from errors; no made-up patient value outside the SEGs."""
    import highdicom as hd
    import pydicom

    from raythyroid import infer
    from raythyroid import results as infer_results

    jpegs, files = dicom_corpus
    archive, labels, output = tmp_path / "archive", tmp_path / "labels", tmp_path / "out"
    kinds = corpus.LOSSLESS + corpus.GRAY + tuple(corpus.LOSSY) + tuple(corpus.LOSSY.values())
    for kind in kinds:
        for path in files[kind]:
            (archive / kind).mkdir(parents=True, exist_ok=True)
            (archive / kind / path.name).write_bytes(path.read_bytes())
    (archive / "cine").mkdir()
    (archive / "cine" / "cine.dcm").write_bytes(files["cine-jpeg"][0].read_bytes())
    skipped = {"other/report": "reportsi.dcm", "other/plan": "rtplan.dcm",
               "other/ecg": "waveform_ecg.dcm", "other/seg": "liver_1frame.dcm"}
    (archive / "other").mkdir()
    for key, name in skipped.items():
        (archive / f"{key}.dcm").write_bytes(pydicom_file(name).read_bytes())
    # a still with a calibrated ultrasound region, named without a suffix as PACS exports are
    still = next(phantom.generate(1, seed=21, height=200, width=300)).image
    (archive / "still").write_bytes(make_dicom([cv2.cvtColor(still, cv2.COLOR_BGR2GRAY)],
                                               ultrasound_region=True))
    (archive / "broken").mkdir()
    (archive / "broken" / "short.dcm").write_bytes(_native_cine(3, cut=64 * 64 * 2 + 100))
    (archive / "broken" / "liar.dcm").write_bytes(_native_cine(3, declared=5))
    unknown = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    unknown.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"
    unknown.save_as(archive / "broken" / "unknown-syntax.dcm")
    for jpeg in jpegs[:2]:
        (labels / "native").mkdir(parents=True, exist_ok=True)
        (labels / "native" / f"{jpeg.stem}.png").write_bytes(
            (ddti / "masks" / f"{jpeg.stem}.png").read_bytes())

    run_uri, _ = trained_run
    summary = infer.run(f"{run_uri}/model", str(archive), str(output), labels=str(labels),
                        options=infer.InferOptions(batch_size=8, dicom_seg=True,
                                                   max_error_rate=0.0),
                        log=lambda *_: None)
    rows = {r["key"]: r for r in infer_results.read_results(str(output)).to_pylist()}
    errors = {k: r["error"] for k, r in rows.items() if r["status"] == "error"}
    # a broken DICOM: its good frames go through, each bad one is an error row saying why
    assert errors == {
        "broken/short#2": "DICOM pixel data cut short inside frame 2 of 3",
        "broken/short#3": "DICOM frame 3 of 3 missing: NumberOfFrames is 3 but the pixel data "
                          "holds 1",
        "broken/liar#4": "DICOM frame 4 of 5 missing: NumberOfFrames is 5 but the pixel data "
                         "holds 3",
        "broken/liar#5": "DICOM frame 5 of 5 missing: NumberOfFrames is 5 but the pixel data "
                         "holds 3",
        "broken/unknown-syntax": "unsupported transfer syntax 1.2.3.4.5.6"}
    assert all(rows[k]["status"] == "ok" for k in ("broken/short#1", "broken/liar#1",
                                                   "broken/liar#3"))
    for key, name in skipped.items():
        assert rows[key]["status"] == "skipped" and rows[key]["error"].startswith("not an image")
    # skipped rows count in neither part of the error rate
    assert summary.errors == len(errors) and summary.skipped == len(skipped)
    assert summary.error_rate == pytest.approx(len(errors) / (len(rows) - len(skipped)))
    assert summary.too_many_errors
    saved = json.loads((output / "metrics.json").read_text())
    assert saved["skipped"] == len(skipped) and saved["errors"] == len(errors)
    assert saved["images"] == 2

    def mask(key):
        return imaging.decode_png((output / "masks" / f"{key}.png").read_bytes()) > 0

    reference = {p.stem: mask(f"native/{p.stem}") for p in files["native"]}
    assert any(m.any() for m in reference.values()), "the model found nothing: a vacuous test"
    for kind in corpus.LOSSLESS + corpus.GRAY:
        for path in files[kind]:
            assert np.array_equal(mask(f"{kind}/{path.stem}"), reference[path.stem]), \
                (kind, path.stem)
    for kind, uncompressed in corpus.LOSSY.items():
        for path in files[kind]:
            got, want = mask(f"{kind}/{path.stem}"), mask(f"{uncompressed}/{path.stem}")
            union = (got | want).sum()
            assert union == 0 or (got & want).sum() / union >= 0.98, (kind, path.stem)
    cine_keys = sorted(k for k in rows if k.startswith("cine/cine#"))
    assert len(cine_keys) == len(files["cine-frames"])

    seg_dir = output / "dicom-seg"
    checked = 0
    for kind in SEG_KINDS + ("cine",):
        sources = [archive / "cine" / "cine.dcm"] if kind == "cine" else \
            [archive / kind / p.name for p in files[kind][:2]]
        for source in sources:
            stem = source.stem
            seg_path = seg_dir / kind / f"{stem}.seg.dcm"
            assert corpus.dciodvfy_errors(seg_path) == [], (kind, stem)
            seg = hd.seg.segread(seg_path)
            uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
            if kind == "cine":
                numbers = list(range(1, len(cine_keys) + 1))
                pixels = seg.get_pixels_by_source_frame(uid, numbers)[..., 0]
                expected = [mask(f"cine/cine#{n}") for n in numbers]
            else:
                pixels = seg.get_pixels_by_source_instance([uid])[..., 0]
                expected = [mask(f"{kind}/{stem}")]
            assert len(pixels) == len(expected)
            for got, want in zip(pixels, expected):
                assert np.array_equal(got > 0, want), (kind, stem)
            checked += 1
    assert checked == 2 * len(SEG_KINDS) + 1
    # the cine's SEG belongs to its source's patient and study, and names the source instance
    # and each frame it was derived from
    source = pydicom.dcmread(archive / "cine" / "cine.dcm", stop_before_pixels=True)
    seg = pydicom.dcmread(seg_dir / "cine" / "cine.seg.dcm")
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.PatientID == source.PatientID and seg.StudyInstanceUID == source.StudyInstanceUID
    assert [ref.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
            for ref in series.ReferencedInstanceSequence] == [source.SOPInstanceUID]
    assert sorted((r.ReferencedSOPInstanceUID, int(r.ReferencedFrameNumber)) for r in (
        item.DerivationImageSequence[0].SourceImageSequence[0]
        for item in seg.PerFrameFunctionalGroupsSequence)) == \
        [(source.SOPInstanceUID, n) for n in range(1, len(cine_keys) + 1)]
    assert rows["still"]["status"] == "ok" and rows["still"]["area_mm2"] is not None
    assert corpus.dciodvfy_errors(seg_dir / "still.seg.dcm") == []
    # the SEGs of the frames a broken cine still gave (an MR cine: a source in patient space)
    partial = sorted((seg_dir / "broken").glob("*.seg.dcm"))
    assert partial and {p.name: corpus.dciodvfy_errors(p) for p in partial} == {
        p.name: [] for p in partial}

    leaks = [v for v in corpus.PATIENT.values()] + [PATIENT_ID, PATIENT_NAME]
    for path in output.rglob("*"):
        if path.is_file() and "dicom-seg" not in path.parts:
            data = path.read_bytes()
            assert not any(v.encode() in data for v in leaks), path


# ---------------------------------------------------------------- preprocess from DICOM

@pytest.mark.ray
@pytest.mark.timeout(900)
def test_preprocess_dicom_images_with_png_or_seg_masks(dicom_corpus, ddti, ray_local, tmp_path):
    """DICOM images with PNG masks (folders layout) and with DICOM SEG masks (dicom layout):
    shards hold the same masks as the PNGs give, cases are hashed patients, one patient never
    straddles two splits, and non-image objects are skipped rows."""
    from raythyroid import preprocess
    from raythyroid.dicom import read as dicom_read, seg_write

    jpegs, _ = dicom_corpus
    patients = {f"MRN-MADEUP-{n}": [] for n in range(4)}
    work = tmp_path / "made"
    for index, jpeg in enumerate(sorted((ddti / "images").glob("*.jpg"))[:16]):
        patient = f"MRN-MADEUP-{index % 4}"
        built = corpus.build([jpeg], work / f"{index}", patient_id=patient)
        patients[patient].append((jpeg.stem, built["jpeg-baseline"][0]))

    folders, archive = tmp_path / "folders", tmp_path / "archive"
    for patient, frames in patients.items():
        for stem, path in frames:
            (folders / "images").mkdir(parents=True, exist_ok=True)
            (folders / "masks").mkdir(parents=True, exist_ok=True)
            (folders / "images" / f"{stem}.dcm").write_bytes(path.read_bytes())
            (folders / "masks" / f"{stem}.png").write_bytes(
                (ddti / "masks" / f"{stem}.png").read_bytes())
            data = path.read_bytes()
            label = imaging.decode_mask((ddti / "masks" / f"{stem}.png").read_bytes())
            (archive / "images").mkdir(parents=True, exist_ok=True)
            (archive / "annotations").mkdir(parents=True, exist_ok=True)
            uid = str(dicom_read.read_dataset(data, stop_before_pixels=True).SOPInstanceUID)
            (archive / "images" / uid).write_bytes(data)  # named by UID, as PACS export
            (archive / "annotations" / f"{stem}.seg.dcm").write_bytes(
                seg_write.write_segmentation(data, {0: label}))
    (archive / "images" / "report.dcm").write_bytes(pydicom_file("reportsi.dcm").read_bytes())

    results = {}
    for name, root, layout in (("folders", folders, "folders"), ("dicom", archive, "auto")):
        out = tmp_path / f"prepared-{name}"
        # the SEGs here are raythyroid's own: learning from them is asked for
        manifest = preprocess.run(str(root), str(out), layout=layout,
                                  config=PrepConfig(size=128), log=lambda *_: None,
                                  dicom_rules=layouts.DicomRules(segs_from="any"))
        assert manifest["layout"] == ("dicom" if name == "dicom" else "folders")
        assert manifest["rows"] == 16, manifest
        tables = [pq.read_table(p) for p in out.rglob("*.parquet") if p.name != "errors.parquet"]
        rows = [r for t in tables for r in t.to_pylist()]
        results[name] = {r["sha256"]: r for r in rows}
        cases = {}
        for row in rows:
            assert row["case_id"].startswith("p-") and "MADEUP" not in row["case_id"]
            cases.setdefault(row["case_id"], set()).add(row["split"])
        assert len(cases) == 4 and all(len(s) == 1 for s in cases.values()), cases
        errors = pq.read_table(out / "errors.parquet").to_pylist()
        if name == "dicom":
            assert [(e["stage"], e["reason"]) for e in errors] == [("skipped",
                                                                    "not an image (SR)")]
            assert manifest["skipped"] == 1 and manifest["errors"] == 0
        for path in out.rglob("*"):
            if path.is_file():
                assert b"MRN-MADEUP" not in path.read_bytes() and \
                    corpus.PATIENT["PatientName"].encode() not in path.read_bytes()
    # the same frames, masks from PNG or from SEG: identical shard images and masks
    assert results["folders"].keys() == results["dicom"].keys()
    for digest, row in results["folders"].items():
        other = results["dicom"][digest]
        assert row["image"] == other["image"] and row["mask"] == other["mask"]


def test_seg_for_every_pydicom_test_image_passes_dciodvfy(tmp_path):
    """SEGs for every image among pydicom's test files (CT, MR, US, secondary capture; every
    photometric; single- and multi-frame; sources lacking Type 2 tags or with malformed dates):
    no dciodvfy Error line, and highdicom reads the masks back."""
    import highdicom as hd
    import pydicom

    from raythyroid.dicom import seg_write

    if corpus.missing_tools():
        missing("needs dicom3tools' dciodvfy: `make test` installs it when run as root")
    written = 0
    for path in sorted(pydicom_file("").glob("*.dcm")):
        try:
            source = frames_of(path)
            source.frame(0)
        except (DecodeError, SkipInput):
            continue
        masks = {}
        for index in range(min(source.count, 2)):
            masks[index] = np.zeros((source.height, source.width), bool)
            masks[index][10 + index:30, 12:40] = True
        seg_path = tmp_path / f"{path.stem}.seg.dcm"
        seg_path.write_bytes(seg_write.write_segmentation(path.read_bytes(), masks))
        assert corpus.dciodvfy_errors(seg_path) == [], path.name
        seg = hd.seg.segread(seg_path)
        stored = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
        assert [np.array_equal(stored[i] > 0, masks[i]) for i in masks] == [True] * len(masks)
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0] \
            .ReferencedSOPInstanceUID == uid
        written += 1
    assert written >= 40


def test_a_persons_newest_seg_teaches_and_raythyroids_own_does_not(tmp_path):
    """Four frames that raythyroid segmented (its own SEGs, as infer --dicom-seg files them)
    and radiologists corrected in a viewer: one once, one twice, one never, one annotated by a
    person alone. The masks are the people's, the newest of two; raythyroid's own SEGs teach
    only when asked; refusing several annotations of a frame makes the older an error row."""
    import pydicom
    from pydicom.uid import generate_uid

    from raythyroid.dicom import seg_read, seg_write

    root = tmp_path / "archive"
    (root / "images").mkdir(parents=True)
    (root / "segs").mkdir()
    shape = (128, 128)
    night = dt.datetime.now()
    drawn = {}

    def outline(seed: int) -> np.ndarray:
        mask = np.zeros(shape, bool)
        mask[20 + seed * 5:70 + seed * 3, 30 + seed * 4:90] = True
        return mask

    sources = {}
    for name in ("corrected", "twice", "never", "person_only"):
        ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer)
        sources[name] = buffer.getvalue()
        (root / "images" / f"{name}.dcm").write_bytes(sources[name])
        if name != "person_only":
            (root / "segs" / f"{name}.ours.dcm").write_bytes(
                seg_write.write_segmentation(sources[name], {0: outline(0)}))
    for stem, name, seed, hours in (("corrected.fix", "corrected", 1, 8),
                                    ("twice.first", "twice", 2, 8), ("twice.second", "twice", 3, 30),
                                    ("person_only.fix", "person_only", 4, 9)):
        drawn[stem] = outline(seed)
        (root / "segs" / f"{stem}.dcm").write_bytes(
            viewer_seg(sources[name], drawn[stem], night + dt.timedelta(hours=hours)))

    def masks(rules: layouts.DicomRules) -> tuple[dict, dict]:
        _, pairs, problems = layouts.scan(str(root), "dicom", rules)
        return ({p.key: Path(p.mask_uri).name for p in pairs},
                {(Path(p.source_uri).name, p.stage): p.reason for p in problems})

    chosen, problems = masks(layouts.DicomRules())
    assert chosen == {"images/corrected": "corrected.fix.dcm", "images/twice": "twice.second.dcm",
                      "images/person_only": "person_only.fix.dcm"}
    assert "older annotation" in problems[("twice.first.dcm", "skipped")]
    assert "raythyroid's own SEG" in problems[("never.dcm", "skipped")]
    assert not [stage for _, stage in problems if stage not in ("skipped",)]
    for key, seg_name in chosen.items():  # the pixels a person drew, as drawn
        ds = pydicom.dcmread(root / "segs" / seg_name)
        assert not seg_read.made_by_raythyroid(ds)
        assert np.array_equal(seg_read.seg_mask(ds, 1), drawn[seg_name[:-len(".dcm")]])
    assert seg_read.made_by_raythyroid(pydicom.dcmread(root / "segs" / "never.ours.dcm"))

    # raythyroid's own SEGs teach when asked; the people's later corrections still win
    chosen, _ = masks(layouts.DicomRules(segs_from="any"))
    assert chosen["images/never"] == "never.ours.dcm"
    assert chosen["images/corrected"] == "corrected.fix.dcm"
    # several annotations refused: the first listed stays, each other is an error row
    chosen, problems = masks(layouts.DicomRules(several="refuse"))
    assert chosen["images/twice"] == "twice.first.dcm"
    assert "second annotation" in problems[("twice.second.dcm", "mask")]


def test_when_a_seg_was_made_orders_whatever_its_writer_wrote():
    """The newest of several corrections wins: dates and times compare by their digits,
    however precise, with an older exporter's separators, or from the series when the content
    gives none."""
    from pydicom.dataset import Dataset

    from raythyroid.dicom import seg_read

    def made(**values) -> str:
        ds = Dataset()
        for name, value in values.items():
            setattr(ds, name, value)
        return seg_read.made_at(ds)

    ordered = [made(),  # says nothing: the oldest
               made(SeriesDate="20240102", SeriesTime="0900"),
               made(ContentDate="2024.01.02", ContentTime="14:04:38"),
               made(ContentDate="20240102", ContentTime="140438.5"),
               made(ContentDate="20240102", ContentTime="1405"),
               made(ContentDate="20240103")]
    assert ordered == sorted(ordered) and len(set(ordered)) == len(ordered)
