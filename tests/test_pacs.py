"""A PACS as input and output: infer searches and retrieves over DICOMweb inside Ray tasks and
files each SEG back with STOW-RS, night after night; preprocess learns from the corrections
people filed there; against a real Orthanc."""
from __future__ import annotations

import datetime as dt
import json
import secrets
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from raythyroid import dicomweb, infer, results, sources
from raythyroid.dicom import read as dicom_read
from raythyroid.errors import UserError

import dicom_corpus as corpus
import pacs as pacs_lib
from helpers import INSTITUTION, PATIENT_NAME, free_port, run_cli


def source_frames(files: dict) -> list:
    """Ultrasound as a PACS holds it: uncompressed frames, scanner JPEGs and a JPEG cine, each
    with made-up patient values."""
    return files["native"][:2] + files["jpeg-baseline"][2:4] + files["cine-jpeg"]


def studied_today(path) -> bytes:
    """The file as last night's study: dated today, so a relative window finds it (and the
    other tests' studies, from the corpus's own date, stay out of it)."""
    import io

    import pydicom

    dataset = pydicom.dcmread(path)
    dataset.StudyDate = dt.date.today().strftime("%Y%m%d")
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def all_bytes(root) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in root.rglob("*") if p.is_file()]


@pytest.mark.timeout(900)
def test_nightly_infer_from_a_pacs_files_each_seg_back_once(pacs, dicom_corpus, trained_run,
                                                            ray_local, tmp_path):
    jpegs, files = dicom_corpus
    # the session's PACS holds other tests' SEGs too: this test counts the ones it files
    earlier = {s["sop"] for s in pacs.instances("SEG")}

    def filed() -> list:
        return [s for s in pacs.instances("SEG") if s["sop"] not in earlier]

    sources = {}
    for path in source_frames(files):
        data = studied_today(path)
        pacs.upload(data)
        sources[str(dicom_read.read_dataset(data, True).SOPInstanceUID)] = data
    run_uri, _ = trained_run
    output = tmp_path / "out"
    url = f"dicomweb+{pacs.dicomweb}?ModalitiesInStudy=US&StudyDate=-1d"
    # the commands and the runtime's workers hold the PACS credentials (see ray_local)
    command = ["infer", f"{run_uri}/model", url, str(output), "--stow", "--batch-size", "4"]

    first = run_cli(*command)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = results.read_results(str(output)).to_pylist()
    frames = sum(int(dicom_read.read_dataset(d, True).get("NumberOfFrames", 1)) for d in
                 sources.values())
    assert len(rows) == frames and all(r["status"] == "ok" for r in rows), rows
    assert {r["sop_uid"] for r in rows} == set(sources)
    for row in rows:
        source = dicom_read.read_dataset(sources[row["sop_uid"]], True)
        assert (row["study_uid"], row["series_uid"]) == (source.StudyInstanceUID,
                                                         source.SeriesInstanceUID)

    # one SEG per source instance, in the source's study, valid, its frames the masks
    segs = filed()
    assert len(segs) == len(sources)
    assert {r["seg_uid"] for r in rows} == {s["sop"] for s in segs}
    for seg in segs:
        data = dicomweb.retrieve(f"dicomweb+{pacs.dicomweb}/studies/{seg['study']}/series/"
                                 f"{seg['series']}/instances/{seg['sop']}")
        dataset = dicom_read.read_dataset(data)
        source_uid = dataset.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0] \
            .ReferencedSOPInstanceUID
        source = dicom_read.read_dataset(sources[source_uid], True)
        assert dataset.StudyInstanceUID == source.StudyInstanceUID
        assert int(dataset.NumberOfFrames) == int(source.get("NumberOfFrames", 1))
        (tmp_path / "seg.dcm").write_bytes(data)
        assert corpus.dciodvfy_errors(tmp_path / "seg.dcm") == []

    # the same command the next night: nothing new, nothing stored twice
    again = run_cli(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(sources)} already done, 0 to process" in again.stdout
    assert len(filed()) == len(sources)
    # a new study arrives: only it is processed, its SEG filed, the metrics cover both nights
    pacs.upload(studied_today(files["native"][4]))
    third = run_cli(*command)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"{len(sources)} already done, 1 to process" in third.stdout
    assert len(filed()) == len(sources) + 1
    assert len(results.read_results(str(output))) == frames + 1

    # identifiers stay in the PACS: none in any output, log or job record; no credential either
    job = json.loads((output / "_JOB.json").read_text())
    assert job["input"] == url
    logs = "".join(r.stdout + r.stderr for r in (first, again, third)).encode()
    session = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    for where, data in all_bytes(output) + all_bytes(session) + [("logs", logs)]:
        if where.endswith(".seg.dcm"):
            continue  # a SEG carries its patient's identity: that is how the PACS files it
        for secret in list(corpus.PATIENT.values()) + [pacs.password]:
            assert secret.encode() not in data, (where, secret)


def test_bearer_token_path_and_refused_credentials(pacs, dicom_corpus, monkeypatch, tmp_path):
    """A token-checking gate in front of the PACS: search and retrieve with DICOMWEB_TOKEN, or
    with DICOMWEB_TOKEN_FILE while the gate's token is replaced (an expiring cloud token and
    its refresher); a wrong token or password, or a token file that cannot be read, ends the
    command before Ray starts, exit 2, one line."""
    _, files = dicom_corpus
    pacs.upload(files["native"][5].read_bytes())
    gate = pacs_lib.TokenGate(pacs)
    try:
        monkeypatch.setenv("DICOMWEB_TOKEN", gate.token)
        query = dicomweb.parse(f"dicomweb+{gate.url}")
        found = list(dicomweb.search(query))
        assert found
        data = dicomweb.retrieve(found[0].uri(query))
        assert dicom_read.read_dataset(data, True).SOPInstanceUID == found[0].sop
        monkeypatch.delenv("DICOMWEB_TOKEN")
        # a token file kept fresh by someone else: read again before every request
        token_file = tmp_path / "token"
        token_file.write_text(gate.token + "\n")
        monkeypatch.setenv("DICOMWEB_TOKEN_FILE", str(token_file))
        assert [i.sop for i in dicomweb.search(query)] == [i.sop for i in found]
        gate.token = "tok-" + secrets.token_hex(12)  # the old one expired
        token_file.write_text(gate.token)
        retrieved = dicom_read.read_dataset(dicomweb.retrieve(found[0].uri(query)), True)
        assert retrieved.SOPInstanceUID == found[0].sop
        token_file.write_text("")  # read between a refresher's truncate and its write
        assert dicomweb.retrieve(found[0].uri(query)) == data
        token_file.unlink()  # a refresher that deletes, then writes
        assert dicomweb.retrieve(found[0].uri(query)) == data
        # the gate's token expires a moment before the refresher writes the new one
        gate.token = "tok-" + secrets.token_hex(12)
        threading.Timer(0.5, token_file.write_text, [gate.token]).start()
        assert dicomweb.retrieve(found[0].uri(query)) == data
        monkeypatch.delenv("DICOMWEB_TOKEN_FILE")
        wrong = run_cli("infer", "no-model", f"dicomweb+{gate.url}", "out",
                        env={"DICOMWEB_TOKEN": "not-the-token"})
        unreadable = run_cli("infer", "no-model", f"dicomweb+{gate.url}", "out",
                             env={"DICOMWEB_TOKEN_FILE": str(tmp_path / "missing")})
    finally:
        gate.stop()
    assert unreadable.returncode == 2
    assert unreadable.stderr.strip() == (f"raythyroid: error: DICOMWEB_TOKEN_FILE "
                                         f"{tmp_path / 'missing'} cannot be read: No such file "
                                         f"or directory")
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == "raythyroid: error: DICOMweb authentication failed (401)"
    assert "not-the-token" not in wrong.stdout + wrong.stderr
    password = run_cli("infer", "no-model", f"dicomweb+{pacs.dicomweb}", "out",
                       env={"DICOMWEB_USERNAME": pacs.user, "DICOMWEB_PASSWORD": "wrong"})
    assert password.returncode == 2 and "authentication failed (401)" in password.stderr


@pytest.mark.parametrize("command, url, code, words", [
    ("infer", "dicomweb+http://:8042/dicom-web", 2, "DICOMweb URL has no host"),
    ("infer", "dicomweb+http://user:pw@127.0.0.1:1/dicom-web", 2, "credentials in a DICOMweb URL"),
    ("infer", "dicomweb+http://127.0.0.1:{free}/dicom-web?StudyDate=-1d", 75, "unreachable"),
    ("preprocess", "dicomweb+http://127.0.0.1:{free}/dicom-web?StudyDate=-7d", 75, "unreachable"),
])
def test_dicomweb_url_mistakes_and_an_unreachable_server(command, url, code, words):
    model = ["no-model"] if command == "infer" else []
    result = run_cli(command, *model, url.format(free=free_port()), "out")
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert "pw" not in result.stderr


def test_deleted_or_malformed_instances_are_error_rows(pacs, dicom_corpus):
    """An instance deleted between search and retrieve, and an answer that is not multipart:
    each an error row saying so; the block goes on."""
    _, files = dicom_corpus
    gone = dicomweb.parse(f"dicomweb+{pacs.dicomweb}")
    malformed = pacs_lib.MalformedServer()
    keep = pacs.upload(files["native"][3].read_bytes())
    kept = dicom_read.read_dataset(pacs.file(keep), True)
    try:
        uris = [f"dicomweb+{gone.base}/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5",
                f"dicomweb+{malformed.url}/studies/1.2/series/1.2.3/instances/1.2.3.4",
                f"dicomweb+{gone.base}/studies/{kept.StudyInstanceUID}/series/"
                f"{kept.SeriesInstanceUID}/instances/{kept.SOPInstanceUID}"]
        block = pa.table({"key": ["gone", "malformed", "kept"], "source_uri": uris,
                          "labels": pa.nulls(3, infer.LABELS_TYPE)})
        prep = {"size": 64}
        chunks = list(sources.read_and_prepare(block, prep, 10_000_000))
    finally:
        malformed.stop()
    by_key = {k: (s, e) for chunk in chunks
              for k, s, e in zip(chunk["key"], chunk["status"], chunk["error"], strict=True)}
    sop_by_key = {k: sop for chunk in chunks
                  for k, sop in zip(chunk["key"], chunk["sop_uid"], strict=True)}
    assert by_key["gone"] == ("error", "cannot read: not found on the DICOMweb server "
                                       "(deleted since the search?)")
    assert by_key["malformed"][0] == "error"
    assert by_key["malformed"][1].startswith("cannot read: malformed multipart response")
    assert by_key["kept"] == ("ok", "")
    # an unreadable instance still names its UIDs (from its URI); a read one, its header's
    assert sop_by_key == {"gone": "1.2.3.4.5", "malformed": "1.2.3.4",
                          "kept": kept.SOPInstanceUID}


@pytest.mark.timeout(300)
def test_other_pacs_policies_lose_no_instance_and_store_each_seg_once(pacs, monkeypatch):
    """Orthanc behind other vendors' policies (pacs_lib.VendorGate). A search capped at 2
    results a page whatever limit was asked, and refused above 200, still lists all 5
    instances of a study; one that ignores the offset is refused, not read in part. An
    instance stored again (a retried block's SEG) that the server refuses as a duplicate
    counts as stored, and stays one copy; one refused for another reason, a 409 naming
    nothing and a redirect each fail the store, and the pre-flight check refuses a URL that
    redirects. An instance answered as bare application/dicom is read. A server still busy
    after the retries stops the run (Unreachable) instead of leaving an error row; an
    instance the server keeps refusing while it answers searches is an error row."""
    import numpy as np
    from pydicom.uid import generate_uid

    from helpers import make_dicom

    sop = pacs_lib.sop_uid
    study, series = generate_uid(), generate_uid()
    frame = np.full((64, 64), 90, np.uint8)
    uploaded = set()
    for _ in range(5):
        data = make_dicom([frame], study_uid=study, series_uid=series)
        pacs.upload(data)
        uploaded.add(sop(data))
    gate = pacs_lib.VendorGate(pacs, page_cap=2)
    try:
        query = dicomweb.parse(f"dicomweb+{gate.url}?StudyInstanceUID={study}")
        found = list(dicomweb.search(query))
        assert sorted(i.sop for i in found) == sorted(uploaded)
        gate.mode = "no-offset"
        with pytest.raises(UserError, match="ignores the offset of a paged study search"):
            list(dicomweb.search(query))
        gate.mode = None

        ours = make_dicom([frame], study_uid=study, series_uid=generate_uid())
        dicomweb.store(gate.url, [ours])
        dicomweb.store(gate.url, [ours])  # refused as a duplicate: already stored
        assert gate.stores == 2
        assert [i["sop"] for i in pacs.instances()].count(sop(ours)) == 1
        other = make_dicom([frame], study_uid=study, series_uid=generate_uid())
        for mode, words in (("refuse", r"refused 1 instance\(s\) \(failure reason 49152\)"),
                            ("conflict", r"refused 1 instance"),
                            ("redirect", r"redirected \(301\) to https://elsewhere")):
            gate.mode = mode
            with pytest.raises(dicomweb.StoreError, match=words):
                dicomweb.store(gate.url, [other])
        assert sop(other) not in {i["sop"] for i in pacs.instances()}
        with pytest.raises(UserError, match=r"redirects \(301\) to https://elsewhere/: give"):
            dicomweb.check(query)

        gate.mode = "bare"
        assert sop(dicomweb.retrieve(found[0].uri(query))) == found[0].sop

        monkeypatch.setattr(dicomweb, "MAX_ATTEMPTS", 1)
        dicomweb._session.cache_clear()
        block = pa.table({"key": ["busy"], "source_uri": [found[0].uri(query)],
                          "labels": pa.nulls(1, infer.LABELS_TYPE)})
        gate.mode = "busy"
        with pytest.raises(dicomweb.Unreachable, match=r"busy \(503\)"):
            list(sources.read_and_prepare(block, {"size": 64}, 10_000_000))
        gate.mode = "stuck"
        rows = [row for chunk in sources.read_and_prepare(block, {"size": 64}, 10_000_000)
                for row in zip(chunk["status"], chunk["error"], strict=True)]
        assert rows == [("error", f"cannot read: DICOMweb server {gate.url.rsplit('/', 1)[0]} "
                                  f"busy (503) for this instance, while it answers searches")]
    finally:
        gate.stop()
        dicomweb._session.cache_clear()


def test_split_multipart_reads_parts_and_refuses_what_is_not():
    body = (b"--b1\r\nContent-Type: application/dicom\r\n\r\nDICM-one\r\n"
            b"--b1\r\nContent-Type: application/dicom\r\n\r\nDICM-two\r\n--b1--\r\n")
    assert dicomweb.split_multipart('multipart/related; type="application/dicom"; boundary=b1',
                                    body) == [b"DICM-one", b"DICM-two"]
    # lines ending in LF alone; a quoted boundary with a space; its bytes inside a part
    lax = (b"preamble\n--b 1\nContent-Type: application/dicom\n\nDICM-one\n"
           b"--b 1\r\nContent-Type: application/dicom\r\n\r\nDICM--b 1-two\r\n--b 1--")
    assert dicomweb.split_multipart('multipart/related; boundary="b 1"', lax) == \
        [b"DICM-one", b"DICM--b 1-two"]
    for content_type, data in (("application/dicom", body),
                               ("multipart/related; boundary=b1", body[:40])):
        with pytest.raises(dicomweb.RetrieveError, match="malformed multipart"):
            dicomweb.split_multipart(content_type, data)


def test_query_identity_resolves_dates_and_hides_patients():
    query = dicomweb.parse("dicomweb+https://pacs.example:443/dicom-web?"
                           "ModalitiesInStudy=US&StudyDate=-2d&PatientID=MRN-123")
    assert "MRN-123" not in query.identity
    assert query.identity.startswith("dicomweb+https://pacs.example:443/dicom-web?"
                                     "ModalitiesInStudy=US&StudyDate=-2d&PatientID=sha256:")
    resolved = dict(query.resolved(dt.date(2026, 11, 28)))
    assert resolved["StudyDate"] == "20261126-" and resolved["PatientID"] == "MRN-123"
    # an IPv6 host keeps its brackets
    assert dicomweb.parse("dicomweb+http://[::1]:8042/dicom-web").base == \
        "http://[::1]:8042/dicom-web"


def ddti_frames(ddti, count: int) -> tuple[list, list]:
    """`count` DDTI frames and their masks at half size, gray (small, fast to file and read)."""
    import cv2

    frames, masks = [], []
    for path in sorted((ddti / "images").glob("*.jpg"))[:count]:
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imread(str(ddti / "masks" / f"{path.stem}.png"), cv2.IMREAD_GRAYSCALE)
        size = (gray.shape[1] // 2, gray.shape[0] // 2)
        frames.append(cv2.resize(gray, size, interpolation=cv2.INTER_AREA))
        masks.append(cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST) >= 128)
    return frames, masks


@pytest.mark.timeout(300)
def test_preprocess_from_a_pacs_learns_each_frames_newest_correction(pacs, ddti, ray_local,
                                                                     monkeypatch, tmp_path):
    """Corrections filed in a PACS (pacs_lib.upload_corrections) prepared straight over
    DICOMweb: exactly the people's newest masks come out, pixel for pixel in the frame's own
    geometry and prepared as a folder's would be; raythyroid's own unedited SEGs teach nothing;
    an older correction is a skipped row; a SEG whose source the PACS lacks, or that names a
    frame its source lacks, is one error row each; cases are hashed patients, each in one
    split; no patient value in any output. Refused credentials are one line, exit 2."""
    import contextlib
    import io

    import cv2
    import numpy as np
    import pyarrow.parquet as pq

    from raythyroid import cli, imaging
    from raythyroid.imaging import Geometry, PrepConfig

    frames, masks = ddti_frames(ddti, 5)
    patients = ["PID-PACS-A", "PID-PACS-A", "PID-PACS-B", "PID-PACS-C", "PID-PACS-D"]
    corrections = pacs_lib.upload_corrections(pacs, frames, masks, patients, "20240229")
    out = tmp_path / "prepared"
    result = run_cli("preprocess", corrections.url, str(out), "--size", "64")
    assert result.returncode == 0, result.stderr[-3000:]

    rows = [row for path in sorted(out.glob("*/*.parquet"))
            for row in pq.read_table(path).to_pylist()]
    assert sorted(r["key"] for r in rows) == sorted(corrections.masks)
    config = PrepConfig(size=64)
    for row in rows:
        drawn = corrections.masks[row["key"]]
        assert np.array_equal(imaging.decode_png(row["full_mask"]), drawn.astype(np.uint8))
        image, geometry = imaging.prepare(corrections.frames[row["key"]], config)
        assert Geometry.from_dict(row["geometry"]) == geometry
        assert np.array_equal(imaging.decode_png(row["mask"]), geometry.to_model(drawn))
        assert np.array_equal(cv2.imdecode(np.frombuffer(row["image"], np.uint8),
                                           cv2.IMREAD_UNCHANGED), image)
        assert row["case_id"] == dicom_read.case_hash(corrections.patients[row["key"]])
    splits = {}
    for row in rows:
        splits.setdefault(row["case_id"], set()).add(row["split"])
    assert len(splits) == len(set(patients)) and all(len(s) == 1 for s in splits.values())

    assert not set(corrections.ours_only) & {r["key"] for r in rows}
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert {e["stage"] for e in errors} == {"mask", "skipped"}
    broken = {e["key"]: e["reason"] for e in errors if e["stage"] == "mask"}
    assert broken.keys() == corrections.broken.keys()
    assert all(broken[key].startswith(words) for key, words in corrections.broken.items())
    older = [(e["key"], e["source_uri"].rsplit("/", 1)[1]) for e in errors
             if e["stage"] == "skipped"]
    assert older == list(corrections.older.items())
    assert "1 image(s) annotated only by raythyroid's own SEGs" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"] == corrections.url and manifest["layout"] == "dicom"
    assert (manifest["errors"], manifest["skipped"]) == (len(corrections.broken), 1)
    for where, data in all_bytes(out) + [("log", (result.stdout + result.stderr).encode())]:
        for secret in ("PID-PACS", PATIENT_NAME, INSTITUTION, pacs.password):
            assert secret.encode() not in data, (where, secret)

    # the command's own main in this process: no Python start-up for a check that ends early
    monkeypatch.setenv("DICOMWEB_PASSWORD", "wrong")
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        code = cli.main(["preprocess", corrections.url, str(tmp_path / "refused")])
    assert code == 2
    assert stderr.getvalue().strip() == "raythyroid: error: DICOMweb authentication failed (401)"
