"""A real PACS for the tests: Orthanc with its DICOMweb plugin on a loopback port, HTTP basic
auth on, its own configuration and storage folder; a bearer-token gate in front of it; and
radiologists' corrections filed into it as a viewer files them (upload_corrections)."""
from __future__ import annotations

import base64
import datetime as dt
import http.client
import io
import json
import secrets
import shutil
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from raythyroid import dicomweb, storage

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def missing() -> str | None:
    if shutil.which("Orthanc") is None or not PLUGIN.exists():
        return ("needs Orthanc and its DICOMweb plugin (Debian packages orthanc, "
                "orthanc-dicomweb): `make test` installs them with apt-get when run as root")
    return None


class Orthanc:
    def __init__(self, folder: Path, port: int, user: str, password: str):
        self.user, self.password = user, password
        self.port = port
        self.root = f"http://127.0.0.1:{port}"
        self.dicomweb = f"{self.root}/dicom-web"
        folder.mkdir(parents=True, exist_ok=True)
        config = {"Name": "raythyroid-test", "StorageDirectory": str(folder / "db"),
                  "IndexDirectory": str(folder / "db"), "HttpPort": port,
                  "DicomServerEnabled": False, "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": True, "RegisteredUsers": {self.user: self.password},
                  "Plugins": [str(PLUGIN)],
                  "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}}
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = open(folder / "orthanc.log", "wb")
        self.process = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.get("/system")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("Orthanc did not start: " + (folder / "orthanc.log").read_text()[-2000:])

    @property
    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body,
                               headers={"Authorization": self.basic, **(headers or {})})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path)

    def upload(self, data: bytes) -> str:
        """Store one DICOM file (Orthanc's REST API, not what is under test); its Orthanc id."""
        status, body = self.request("POST", "/instances", data,
                                    {"Content-Type": "application/dicom"})
        assert status == 200, body
        return json.loads(body)["ID"]

    def instances(self, modality: str | None = None) -> list[dict]:
        """Every instance's main tags (Orthanc's own view, to check what was stored)."""
        status, body = self.get("/instances?expand")
        assert status == 200, body
        found = []
        for item in json.loads(body):
            series = json.loads(self.get(f"/series/{item['ParentSeries']}")[1])
            study = json.loads(self.get(f"/studies/{series['ParentStudy']}")[1])
            if modality is None or series["MainDicomTags"].get("Modality") == modality:
                found.append({"id": item["ID"], "sop": item["MainDicomTags"]["SOPInstanceUID"],
                              "series": series["MainDicomTags"]["SeriesInstanceUID"],
                              "study": study["MainDicomTags"]["StudyInstanceUID"]})
        return found

    def file(self, orthanc_id: str) -> bytes:
        status, body = self.get(f"/instances/{orthanc_id}/file")
        assert status == 200
        return body

    def delete(self, orthanc_id: str) -> None:
        assert self.request("DELETE", f"/instances/{orthanc_id}")[0] == 200

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class _LoopbackServer:
    """An HTTP server on a free loopback port, serving DICOMweb paths at `url`."""

    def _serve(self, handler) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TokenGate(_LoopbackServer):
    """A bearer-token check in front of Orthanc, as an identity-aware proxy would be: requests
    with `Authorization: Bearer <token>` go on with Orthanc's basic credentials, others get
    401."""

    def __init__(self, orthanc: Orthanc):
        self.token = "tok-" + secrets.token_hex(12)
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization") != f"Bearer {gate.token}":
                    return _send(self, 401)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in HOP_BY_HOP | {"authorization"}}
                _send(self, *_forward(orthanc, self.command, self.path, body, headers))

            do_GET = do_POST = _handle

        self._serve(Handler)


def _send(handler: BaseHTTPRequestHandler, status: int, data: bytes = b"", headers=()) -> None:
    """One whole answer; an upstream answer's hop-by-hop headers left out."""
    handler.send_response(status)
    for key, value in headers:
        if key.lower() not in HOP_BY_HOP:
            handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _forward(orthanc: Orthanc, method: str, path: str, body: bytes, headers: dict):
    connection = http.client.HTTPConnection("127.0.0.1", orthanc.port, timeout=60)
    try:
        connection.request(method, path, body=body or None,
                           headers={**headers, "Authorization": orthanc.basic})
        response = connection.getresponse()
        return response.status, response.read(), response.getheaders()
    finally:
        connection.close()


class MalformedServer(_LoopbackServer):
    """A 'DICOMweb server' whose retrieve answers are not multipart at all."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                body = b"<html>gateway error page</html>"
                self.send_response(200)
                self.send_header("Content-Type", "multipart/related; type=\"application/dicom\"")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._serve(Handler)



class VendorGate(_LoopbackServer):
    """Orthanc behind the policies of other PACS, each as its vendor documents it, so one
    real server shows what a client must cope with: searches capped at `page_cap` results
    whatever limit is asked (dcm4chee's and DICOMcloud's maximum results, here silent) and
    refused outright above 200 (Azure's DICOM service); an instance stored again refused with
    409 and failure 45070 (Azure's). `mode` swaps the store or the retrieve for an answer
    other servers give: "refuse" (409, nothing stored), "conflict" (409, no body),
    "redirect" (301 to https, every request), "busy" (503 to every request), "stuck" (503 to
    retrieves only), "bare" (an instance retrieved as application/dicom, not multipart),
    "no-offset" (searches ignore the offset)."""

    AZURE_MAX_LIMIT, DUPLICATE = 200, 45070

    def __init__(self, orthanc: Orthanc, page_cap: int):
        gate = self
        self.mode, self.stores = None, 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path, _, query = self.path.partition("?")
                if gate.mode == "redirect":
                    return _send(self, 301, headers=[("Location", "https://elsewhere/")])
                if gate.mode == "busy" or "/instances/" in path and gate.mode == "stuck":
                    return _send(self, 503)
                params = urllib.parse.parse_qsl(query, keep_blank_values=True)
                if gate.mode == "no-offset":
                    params = [(k, v) for k, v in params if k != "offset"]
                limits = [int(v) for k, v in params if k == "limit"]
                if limits and limits[0] > gate.AZURE_MAX_LIMIT:
                    return _send(self, 400)
                if limits:
                    params = [(k, str(min(int(v), page_cap)) if k == "limit" else v)
                              for k, v in params]
                target = path + ("?" + urllib.parse.urlencode(params) if params else "")
                status, data, headers = _forward(orthanc, "GET", target, b"",
                                                 {"Accept": self.headers.get("Accept", "*/*")})
                if "/instances/" in path and gate.mode == "bare" and status == 200:
                    content_type = dict((k.lower(), v) for k, v in headers)["content-type"]
                    data, headers = (dicomweb.split_multipart(content_type, data)[0],
                                     [("Content-Type", "application/dicom")])
                _send(self, status, data, headers)

            def do_POST(self):
                gate.stores += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if gate.mode == "redirect":
                    return _send(self, 301, headers=[("Location", "https://elsewhere/studies")])
                if gate.mode == "conflict":
                    return _send(self, 409)
                parts = dicomweb.split_multipart(self.headers.get("Content-Type", ""), body)
                refused = [p for p in parts if gate.mode == "refuse" or _held(orthanc, p)]
                if not refused:  # Orthanc's own STOW-RS answer
                    return _send(self, *_forward(orthanc, "POST", self.path, body, {
                        k: v for k, v in self.headers.items()
                        if k.lower() in ("content-type", "accept")}))
                for part in parts:
                    if part not in refused:
                        orthanc.upload(part)
                reason = gate.DUPLICATE if gate.mode is None else 0xC000
                answer = {"00081198": {"vr": "SQ", "Value": [
                    {"00081155": {"vr": "UI", "Value": [sop_uid(p)]},
                     "00081197": {"vr": "US", "Value": [reason]}} for p in refused]}}
                # Azure's codes: 409 when nothing was stored, 202 when some was
                _send(self, 409 if len(refused) == len(parts) else 202,
                            json.dumps(answer).encode(),
                            [("Content-Type", "application/dicom+json")])

        self._serve(Handler)


def sop_uid(data: bytes) -> str:
    from raythyroid.dicom import read as dicom_read

    return str(dicom_read.read_dataset(data, True).SOPInstanceUID)


def _held(orthanc: Orthanc, data: bytes) -> bool:
    status, body = orthanc.request("POST", "/tools/lookup", sop_uid(data).encode())
    return status == 200 and bool(json.loads(body))


# ---------------------------------------------------------------- corrections in a PACS

def viewer_seg(source: bytes, mask: np.ndarray, made: dt.datetime) -> bytes:
    """A correction as a viewer saves one: a new SEG written by highdicom under the viewer's
    own manufacturer, a person's (MANUAL) nodule segment, made at `made`."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Nodule",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=[pydicom.dcmread(io.BytesIO(source))],
        pixel_array=mask.astype(np.uint8), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=77,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Another Viewer Co.",
        manufacturer_model_name="Reading Room", software_versions="4.2",
        device_serial_number="11")
    seg.ContentDate, seg.ContentTime = made.strftime("%Y%m%d"), made.strftime("%H%M%S.%f")
    out = io.BytesIO()
    seg.save_as(out)
    return out.getvalue()


def _referencing_frame(seg: bytes, frame: int) -> bytes:
    """The SEG with its source reference naming `frame` of its (single-frame) source."""
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(seg))
    for item in dataset.PerFrameFunctionalGroupsSequence:
        for derivation in item.DerivationImageSequence:
            for source in derivation.SourceImageSequence:
                source.ReferencedFrameNumber = frame
    out = io.BytesIO()
    dataset.save_as(out)
    return out.getvalue()


@dataclass
class Corrections:
    """What upload_corrections filed, and what preparing it must give. Keys are infer's
    (STUDY/SERIES/SOP of the source frame)."""

    url: str  # dicomweb+ INPUT whose filters match these studies and no others
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # the newest correction by key
    frames: dict[str, np.ndarray] = field(default_factory=dict)  # the source frame by key
    patients: dict[str, str] = field(default_factory=dict)  # the PatientID by key
    ours_only: list[str] = field(default_factory=list)  # only raythyroid's own SEG on these
    older: dict[str, str] = field(default_factory=dict)  # key -> a replaced correction's UID
    broken: dict[str, str] = field(default_factory=dict)  # SEG key#frame -> the error it gives


def upload_corrections(pacs: Orthanc, frames: list[np.ndarray], masks: list[np.ndarray],
                       patients: list[str], study_date: str) -> Corrections:
    """Ultrasound frames and the radiologists' corrections of them, filed into the PACS as a
    night of infer --stow and a reading room leave them: frame i of patient `patients[i]` (one
    study per patient, dated `study_date`) with a viewer's SEG of `masks[i]`. Besides:
    raythyroid's own SEG of frame 0 (corrected after it) and of one more frame nobody
    corrected; an older correction of frame 1; a correction whose source the PACS does not
    hold; and one referencing a second frame of a single-frame source."""
    from pydicom.uid import generate_uid

    from helpers import make_dicom
    from raythyroid.dicom import seg_write

    made = dt.datetime.now() + dt.timedelta(hours=1)  # read after the night infer wrote ours
    studies = {patient: generate_uid() for patient in patients}
    corrections = Corrections(f"dicomweb+{pacs.dicomweb}?StudyDate={study_date}")

    def source(frame: np.ndarray, patient: str) -> tuple[str, bytes]:
        data = make_dicom([frame], study_uid=studies[patient], patient_id=patient,
                          study_date=study_date)
        return infer_key(data), data

    for index, (frame, mask, patient) in enumerate(zip(frames, masks, patients, strict=True)):
        key, data = source(frame, patient)
        pacs.upload(data)
        corrections.frames[key], corrections.masks[key] = frame, mask.astype(bool)
        corrections.patients[key] = patient
        pacs.upload(viewer_seg(data, mask, made))
        if index == 0:  # the model's outline, which the correction above replaces
            pacs.upload(seg_write.write_segmentation(data, {0: ~mask.astype(bool)}))
        if index == 1:  # an earlier correction of the same frame
            older = viewer_seg(data, np.roll(mask, 9, axis=1), made - dt.timedelta(days=1))
            corrections.older[key] = str(_header(older).SOPInstanceUID)
            pacs.upload(older)
        if index == 2:  # a second frame of a single-frame image
            bad = _referencing_frame(viewer_seg(data, mask, made), 2)
            corrections.broken[infer_key(bad) + "#1"] = "SEG references frame 2 of an image of 1"
            pacs.upload(bad)
    key, data = source(frames[0][:, ::-1], patients[0])
    pacs.upload(data)  # segmented by raythyroid, never corrected
    pacs.upload(seg_write.write_segmentation(data, {0: masks[0][:, ::-1].astype(bool)}))
    corrections.ours_only.append(key)
    _, gone = source(frames[-1], patients[-1])  # deleted from the PACS; its correction stays
    lost = viewer_seg(gone, masks[-1], made)
    corrections.broken[infer_key(lost) + "#1"] = "SEG references an image not in its study"
    pacs.upload(lost)
    return corrections


def _header(data: bytes):
    from raythyroid.dicom import read as dicom_read

    return dicom_read.read_dataset(data, True)


def infer_key(data: bytes) -> str:
    """The key infer and preprocess give an instance read over DICOMweb."""
    header = _header(data)
    return storage.safe_key(f"{header.StudyInstanceUID}/{header.SeriesInstanceUID}/"
                            f"{header.SOPInstanceUID}")
