"""A PACS over DICOMweb: search (QIDO-RS), retrieve (WADO-RS) and store (STOW-RS).

INPUT `dicomweb+http://HOST:PORT/PREFIX?ModalitiesInStudy=US&StudyDate=-2d` names a server and
QIDO-RS filters. A date filter may be relative (`-2d`: from two days ago on), resolved when the
job runs, so the same command can run every night and append to the same OUTPUT.

Plain HTTP (requests, with urllib3's retry and backoff) rather than a DICOMweb client library:
searching study by study, retrying as S3 does, reading one instance per request and telling a
malformed multipart answer apart from a missing instance are each a few lines, and every error
maps to the one-line reason (or exit code) the jobs promise.

Credentials come from the environment of whichever process talks to the server (the driver, a
Ray worker), never from arguments or the job's runtime_env (Ray logs that): DICOMWEB_TOKEN (a
bearer token) or DICOMWEB_USERNAME / DICOMWEB_PASSWORD (basic). On Kubernetes a Secret puts
them in every pod; a local Ray's workers inherit them from the command that started it.
Bearer tokens of cloud PACS expire within the hour (Google's in 60 minutes) while a night's
run takes hours: DICOMWEB_TOKEN_FILE names a file that something else keeps fresh (a sidecar,
a mounted secret that is rotated), read again before every request.
"""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Iterator

from .errors import UserError
from .storage import S3_MAX_ATTEMPTS as MAX_ATTEMPTS  # one retry budget for every store

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
PAGE_SIZE = 200  # the largest QIDO-RS limit every server we know accepts (Azure's: 200)
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10.0, 120.0
DICOM_PART = 'multipart/related; type="application/dicom"'
# filters that name or identify a patient (by keyword or tag): kept and logged only as hashes
IDENTIFYING = {"patientname", "00100010", "patientid", "00100020", "patientbirthdate",
               "00100030", "otherpatientids", "00101000", "issuerofpatientid", "00100021",
               "accessionnumber", "00080050", "referringphysicianname", "00080090"}
_RELATIVE_DATE = re.compile(r"-(\d+)d")


class Unreachable(Exception):
    """The server did not answer (refused, timed out, DNS, cut off mid-answer) or said it is
    busy for longer than the retries wait: a temporary failure (exit 75), for the scheduler to
    retry, not a mistake in the command nor a fault of one instance."""


class RetrieveError(Exception):
    """One instance could not be retrieved: an error row, the job goes on."""


class StoreError(Exception):
    """The server did not store what was sent (refused, redirected, failed): the block's
    commit fails, and its sources are redone by the next run."""


def is_dicomweb(uri: str) -> bool:
    return uri.startswith(SCHEMES)


@dataclass(frozen=True)
class Query:
    base: str  # http(s)://host:port/prefix, no trailing slash
    filters: tuple[tuple[str, str], ...]  # as written: relative dates unresolved

    @property
    def identity(self) -> str:
        """What a rerun must match (OUTPUT's job record) and what logs show: the server and
        the filters as written, a relative date window included, patient filters hashed."""
        return "dicomweb+" + self.base + _shown_query(self.filters)

    def resolved(self, today: dt.date | None = None) -> list[tuple[str, str]]:
        """The filters to send tonight: `-Nd` on a date attribute becomes `YYYYMMDD-`."""
        today = today or dt.date.today()
        out = []
        for key, value in self.filters:
            match = _RELATIVE_DATE.fullmatch(value.strip())
            if match and key.lower().endswith("date"):
                value = (today - dt.timedelta(days=int(match.group(1)))).strftime("%Y%m%d") + "-"
            out.append((key, value))
        return out


def _shown_query(filters) -> str:
    """`?k=v&...` with the values of patient filters replaced by their hashes ("" for none)."""
    shown = [(k, "sha256:" + hashlib.sha256(v.encode()).hexdigest()[:16]
              if k.lower() in IDENTIFYING else v) for k, v in filters]
    query = urllib.parse.urlencode(shown, safe="-*,:")
    return f"?{query}" if query else ""


def parse(uri: str) -> Query:
    """`dicomweb+http(s)://host[:port]/prefix?filters` -> Query; a UserError names what is
    wrong with a malformed one (checked before Ray starts)."""
    if not is_dicomweb(uri):
        raise UserError(f"not a DICOMweb URL (dicomweb+http:// or dicomweb+https://): {uri}")
    parsed = urllib.parse.urlsplit(uri[len("dicomweb+"):])
    try:
        port = parsed.port
    except ValueError:
        raise UserError(f"DICOMweb URL has a bad port: {safe_uri(uri)}") from None
    if not parsed.hostname:
        raise UserError(f"DICOMweb URL has no host: {safe_uri(uri)}")
    if parsed.username or parsed.password:
        raise UserError("credentials in a DICOMweb URL would end up in logs and outputs; "
                        "set DICOMWEB_USERNAME/DICOMWEB_PASSWORD or DICOMWEB_TOKEN(_FILE) "
                        "instead")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname  # IPv6
    netloc = host + (f":{port}" if port else "")
    filters = tuple(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
    return Query(f"{parsed.scheme}://{netloc}{parsed.path.rstrip('/')}", filters)


def safe_uri(uri: str) -> str:
    """A URI as it may be printed: no user info, patient filters hashed."""
    if not is_dicomweb(uri):
        return uri
    parsed = urllib.parse.urlsplit(uri[len("dicomweb+"):])
    netloc = parsed.netloc.rsplit("@", 1)[-1]
    return f"dicomweb+{parsed.scheme}://{netloc}{parsed.path}" + _shown_query(
        urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))


# ---------------------------------------------------------------- HTTP

@functools.lru_cache(maxsize=4)
def _session(token: str | None, username: str | None, password: str | None):
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    retry = Retry(total=MAX_ATTEMPTS, connect=3, backoff_factor=0.2, backoff_max=10,
                  status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None,
                  respect_retry_after_header=True, raise_on_status=False)
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=16)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif username:
        session.auth = (username, password or "")
    return session


def session():
    """The HTTP session for this process, with the credentials its own environment holds."""
    return _session(os.environ.get("DICOMWEB_TOKEN") or _token_from_file(),
                    os.environ.get("DICOMWEB_USERNAME") or None,
                    os.environ.get("DICOMWEB_PASSWORD") or None)


def _token_from_file() -> str | None:
    """The bearer token DICOMWEB_TOKEN_FILE holds now (a few bytes read per request)."""
    path = os.environ.get("DICOMWEB_TOKEN_FILE")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            token = file.read().strip()
    except OSError as exc:
        if path in _tokens_read:  # replaced by delete and write: the last one read
            return _tokens_read[path]
        raise UserError(f"DICOMWEB_TOKEN_FILE {path} cannot be read: "
                        f"{exc.strerror or type(exc).__name__}") from None
    if not token:  # caught between a refresher's truncate and write: the last one read
        token = _tokens_read.get(path)
        if not token:
            raise UserError(f"DICOMWEB_TOKEN_FILE {path} is empty")
    _tokens_read[path] = token
    return token


_tokens_read: dict[str, str] = {}


# what a server answers when it is overloaded or behind a gateway that lost it; still so
# after the retries, the run stops for a later retry rather than record an error row
BUSY = (429, 502, 503, 504)


def _request(method: str, url: str, **kwargs):
    import requests

    for attempt in (1, 2):
        try:
            response = session().request(method, url,
                                          timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S), **kwargs)
        except (requests.ConnectionError, requests.Timeout,  # refused, timed out, DNS
                requests.exceptions.ChunkedEncodingError) as exc:  # the answer cut off
            raise Unreachable(f"DICOMweb server {_origin(url)} unreachable: "
                              f"{type(exc).__name__}") from None
        if response.status_code == 401 and attempt == 1 and _token_refreshed():
            continue  # the token expired as its refresher replaced it: once more, the new one
        break
    if response.status_code in BUSY:
        raise Unreachable(f"DICOMweb server {_origin(url)} busy ({response.status_code})")
    if response.status_code in (401, 403):
        raise UserError(f"DICOMweb authentication failed ({response.status_code})")
    return response


def _token_refreshed(wait_s: float = 2.0) -> bool:
    """Whether DICOMWEB_TOKEN_FILE holds another token than the one just refused, waiting a
    little for its refresher; False when the token does not come from a file."""
    import time

    path = os.environ.get("DICOMWEB_TOKEN_FILE")
    if not path or os.environ.get("DICOMWEB_TOKEN"):
        return False
    refused = _tokens_read.get(path)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if _token_from_file() != refused:
            return True
        time.sleep(0.2)
    return False


def _origin(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    return f"{parsed.scheme}://{parsed.netloc.rsplit('@', 1)[-1]}"


def _json(response, what: str) -> list:
    if response.status_code == 204:
        return []
    if response.status_code == 404:
        raise UserError(f"no DICOMweb service at {response.url.split('?')[0]} (404 on {what})")
    if response.status_code >= 400:
        raise UserError(f"DICOMweb {what} failed ({response.status_code}) at "
                        f"{response.url.split('?')[0]}")
    try:
        return response.json() or []
    except ValueError:
        raise UserError(f"DICOMweb {what} at {response.url.split('?')[0]} did not answer "
                        f"JSON") from None


def _value(item: dict, tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def _paged(url: str, params: list[tuple[str, str]], what: str,
           longest: list[int]) -> Iterator[dict]:
    """Every result of a search, page by page. A page shorter than the limit asked for is not
    always the last: servers cap pages (dcm4chee's and DICOMcloud's maximum results), some
    without saying so. A page shorter than the longest this kind of search has returned
    (`longest`, shared by the searches of one kind) cannot be a capped one, so it is the
    last; otherwise the next page is asked for, until an empty one. A server that ignores
    the offset (its second page repeats the first) is refused rather than read in part."""
    offset, seen = 0, set()
    while True:
        page = _json(_search(url, params + [("limit", str(PAGE_SIZE)),
                                            ("offset", str(offset))]), what)
        fresh = [item for item in page if _identity(item) not in seen]
        if page and not fresh:
            raise UserError(f"the DICOMweb server at {_origin(url)} ignores the offset of a "
                            f"paged {what}: it cannot be read in full")
        seen.update(_identity(item) for item in fresh)
        yield from fresh
        if not page or len(page) < min(longest[0], PAGE_SIZE):
            return
        longest[0] = max(longest[0], len(page))
        offset += len(page)


def _search(url: str, params: list[tuple[str, str]], **kwargs):
    """One QIDO-RS request, answered in DICOM JSON."""
    return _request("GET", url, params=params, headers={"Accept": "application/dicom+json"},
                    **kwargs)


def _identity(item: dict) -> tuple:
    return _value(item, "0020000D"), _value(item, "0020000E"), _value(item, "00080018")


@dataclass(frozen=True)
class Instance:
    study: str
    series: str
    sop: str
    sop_class: str | None
    frames: int = 1  # NumberOfFrames, which instance searches return by default

    def uri(self, query: Query) -> str:
        return (f"dicomweb+{query.base}/studies/{self.study}/series/{self.series}"
                f"/instances/{self.sop}")

    @property
    def key(self) -> str:
        return f"{self.study}/{self.series}/{self.sop}"

    @property
    def has_pixels(self) -> bool:
        """False for the SOP classes the decoder would skip (SR, SEG, ...): never retrieved."""
        from .dicom import read as dicom_read

        return dicom_read.non_image_reason(self.sop_class) is None


def studies(query: Query, today: dt.date | None = None) -> list[str]:
    """The UIDs of the studies the filters match (a paged study search), sorted."""
    found = _paged(f"{query.base}/studies", query.resolved(today), "study search", [0])
    return sorted({_value(s, "0020000D") for s in found} - {None})


def study_instances(query: Query, study: str, longest: list[int]) -> Iterator[Instance]:
    """Every instance of one study (a paged instance search); `longest` as for _paged."""
    for item in _paged(f"{query.base}/studies/{study}/instances", [], "instance search",
                       longest):
        series, sop = _value(item, "0020000E"), _value(item, "00080018")
        if series and sop:
            yield Instance(study, series, sop, _value(item, "00080016"),
                           _frame_count(_value(item, "00280008")))


def _frame_count(value: str | None) -> int:
    try:
        return max(1, int(value or 1))
    except ValueError:
        return 1  # a malformed count: the frames are counted when the instance is read


def search(query: Query, today: dt.date | None = None) -> Iterator[Instance]:
    """Every instance of every study the filters match, study by study: studies are searched
    with the filters, then each study's instances are listed, each search paged. An instance
    query paged by offset alone would skip or repeat instances while the archive grows."""
    longest = [0]  # the server's cap on instance pages is the same for every study
    for study in studies(query, today):
        yield from study_instances(query, study, longest)


def seg_series(query: Query, study: str, longest: list[int]) -> set[str]:
    """The UIDs of a study's SEG series (a series search, Modality=SEG)."""
    found = _paged(f"{query.base}/studies/{study}/series", [("Modality", "SEG")],
                   "series search", longest)
    return {_value(s, "0020000E") for s in found} - {None}


def check(query: Query) -> None:
    """One cheap search before any work: exit 2 for a wrong URL or credentials, or one that
    redirects (a store would not follow it, and credentials must not), 75 when the server is
    down."""
    response = _search(f"{query.base}/studies", [("limit", "1")], allow_redirects=False)
    if 300 <= response.status_code < 400:
        raise UserError(f"DICOMweb URL {query.base} redirects ({response.status_code}) to "
                        f"{response.headers.get('Location', 'nowhere')}: give that URL")
    _json(response, "study search")


def retrieve(uri: str) -> bytes:
    """One instance (WADO-RS), as stored (any transfer syntax). RetrieveError for one that is
    gone or answered in a form that is not one DICOM part."""
    url = uri[len("dicomweb+"):]
    try:
        response = _request("GET", url, headers={
            "Accept": f"{DICOM_PART}; transfer-syntax=*"})
    except Unreachable as exc:
        if not _answers_searches(url.split("/studies/", 1)[0]):
            raise  # the server is down or overloaded: the run stops, a later one retries
        raise RetrieveError(f"{exc} for this instance, while it answers searches") from None
    if response.status_code == 404:
        raise RetrieveError("not found on the DICOMweb server (deleted since the search?)")
    if response.status_code >= 400:
        raise RetrieveError(f"DICOMweb retrieve failed ({response.status_code})")
    content_type = response.headers.get("Content-Type", "")
    if content_type.split(";")[0].strip().lower() == "application/dicom":
        # one instance answered bare, as some servers and proxies do: DICOM is DICOM
        from .dicom import read as dicom_read

        if dicom_read.is_dicom(response.content):
            return response.content
    parts = split_multipart(content_type, response.content)
    if len(parts) != 1:
        raise RetrieveError(f"malformed multipart response: {len(parts)} parts for one instance")
    return parts[0]


def _answers_searches(base: str) -> bool:
    try:
        return _search(f"{base}/studies", [("limit", "1")]).status_code < 400
    except Unreachable:
        return False


def split_multipart(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a multipart/related response; RetrieveError when it is not one. A
    delimiter counts only at the start of a line (RFC 2046), so the boundary's bytes inside
    pixel data split nothing; lines may end in CRLF or, from lax servers, LF alone."""
    match = re.search(r'boundary=(?:"([^"]+)"|([^";,\s]+))', content_type, re.IGNORECASE)
    if not content_type.lower().startswith("multipart/related") or not match:
        raise RetrieveError(f"malformed multipart response: Content-Type "
                            f"{content_type.split(';')[0] or 'missing'}")
    boundary = re.escape((match.group(1) or match.group(2)).encode())
    sections = re.split(rb"\r?\n--" + boundary + rb"(?=--|[ \t]*\r?\n)", b"\r\n" + body)
    if len(sections) < 3 or not sections[-1].startswith(b"--"):
        raise RetrieveError("malformed multipart response: no closing boundary")
    parts = []
    for section in sections[1:-1]:
        found = re.search(rb"\r?\n\r?\n", section)
        if not found:
            raise RetrieveError("malformed multipart response: a part without headers")
        parts.append(section[found.end():])
    return parts


def store(base: str, instances: list[bytes]) -> None:
    """STOW-RS `instances` into the server at `base`; raises unless every one was stored.

    Storing again what a run already stored (a retried request, a rerun of a block whose
    results were not committed) must count as stored: our SEGs' UIDs derive from the source
    and the model, so the server holding that UID holds our SEG. Servers answer such a
    store in their own ways: Orthanc keeps one copy and says nothing, Azure's service refuses
    every duplicate (409, failure 45070), Google's refuses one whose bytes differ. So each
    instance the server refuses is looked up by its UIDs before the store is called failed."""
    import uuid

    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                    + data + b"\r\n" for data in instances) + b"--" + boundary.encode() + b"--"
    # a redirect would turn the POST into a GET and drop the instances, looking like success
    response = _request("POST", f"{base}/studies", data=body, allow_redirects=False, headers={
        "Content-Type": f'{DICOM_PART}; boundary="{boundary}"',
        "Accept": "application/dicom+json"})
    status = response.status_code
    if 300 <= status < 400:
        raise StoreError(f"DICOMweb store redirected ({status}) to "
                            f"{response.headers.get('Location', 'nowhere')}: give --stow that URL")
    if status >= 400 and status != 409:
        raise StoreError(f"DICOMweb store failed ({status})")
    try:
        answer = response.json() if response.content else {}
    except ValueError:
        answer = None
    failed = ((answer.get("00081198") or {}).get("Value") or []
              if isinstance(answer, dict) else [])
    refused = [(_value(item, "00081155"), _value(item, "00081197")) for item in failed]
    if not refused and (status == 409 or not isinstance(answer, dict)):
        refused = [(None, None)]  # a conflict naming nothing, or an answer we cannot read
    sent = _uids_by_sop(instances) if refused else {}
    missing = [(uid, reason) for uid, reason in refused  # None names every instance sent
               if not _holds(base, [uids for sop, uids in sent.items() if uid in (None, sop)])]
    if missing:
        reasons = sorted({reason for _, reason in missing} - {None})
        count = len(instances) if missing[0][0] is None else len(missing)
        raise StoreError(f"DICOMweb store ({status}) refused {count} instance(s)" +
                            (f" (failure reason {', '.join(reasons)})" if reasons else ""))


def _uids_by_sop(instances: list[bytes]) -> dict[str, tuple[str, str, str]]:
    """{SOP instance UID: (study, series, SOP instance) UIDs} of the instances sent."""
    from .dicom import read as dicom_read

    headers = (dicom_read.read_dataset(data, True) for data in instances)
    return {str(ds.SOPInstanceUID): (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                     str(ds.SOPInstanceUID)) for ds in headers}


def _holds(base: str, uids: list[tuple[str, str, str]]) -> bool:
    """Whether the server holds every one of these instances (a study-level QIDO-RS search
    each, the query level every server supports)."""
    if not uids:
        return False
    for study, series, sop in uids:
        response = _search(f"{base}/studies/{study}/instances",
                           [("SeriesInstanceUID", series), ("SOPInstanceUID", sop)])
        try:
            found = response.json() if response.status_code == 200 else []
        except ValueError:
            found = []
        if not isinstance(found, list) or not any(
                isinstance(item, dict) and _value(item, "00080018") == sop for item in found):
            return False
    return True


def uids_of(uri: str) -> dict:
    """study_uid, series_uid, sop_uid named by an instance URI (known before it is read)."""
    path = uri.split("/studies/", 1)[1].split("/")
    return {"study_uid": path[0], "series_uid": path[2], "sop_uid": path[4]}

