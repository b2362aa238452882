"""URIs for every job: local paths, file:// and s3:// (any S3-compatible endpoint).

The S3 endpoint comes from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, as boto3 reads it, so one
environment serves pyarrow (reads, writes, Ray Data) and boto3 (paginated listing) alike. Retries
with backoff for both clients are configured here and nowhere else.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
import urllib.parse
from typing import Iterable, Iterator

import pyarrow.fs as pafs

# One retry policy for every S3 call the project makes (pyarrow and boto3): transient 503
# SlowDown and dropped connections are retried with exponential backoff before a read fails.
# The SDKs' legacy retry mode, not "standard": standard mode keeps a retry quota per client
# that a sustained fault rate (a fifth of requests throttled for an hour) drains, after which
# every error fails at once; an overnight batch job would rather wait and finish.
S3_MAX_ATTEMPTS = int(os.environ.get("RAYTHYROID_S3_MAX_ATTEMPTS", "10"))
S3_CONNECT_TIMEOUT_S = 10.0
S3_REQUEST_TIMEOUT_S = 60.0
LIST_PAGE_SIZE = 1000


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _local_path(uri: str) -> str:
    if uri.startswith("file://"):
        uri = urllib.parse.unquote(urllib.parse.urlparse(uri).path)
    return os.path.abspath(os.path.expanduser(uri))


def _split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key.strip("/")


def _split_s3_exact(uri: str) -> tuple[str, str]:
    """bucket, key with the key exactly as given (no stripping of slashes)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


class _S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem that pickles as the endpoint and region it was built from, so
    the copy a Ray process unpickles (Ray Train's controller and workers get the run's
    filesystem that way) keeps S3_MAX_ATTEMPTS: pyarrow's own pickling drops the retry
    strategy, and its default (3 attempts, with a quota) failed a checkpoint upload on a
    flaky store."""

    def __init__(self, endpoint: str | None, region: str):
        self._built_from = (endpoint, region)
        kwargs = {}
        if endpoint:
            parsed = urllib.parse.urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        super().__init__(
            region=region,
            connect_timeout=S3_CONNECT_TIMEOUT_S,
            request_timeout=S3_REQUEST_TIMEOUT_S,
            retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
            **kwargs,
        )

    def __reduce__(self):
        return _s3_filesystem, self._built_from


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    return _S3FileSystem(endpoint, region)


@functools.lru_cache(maxsize=8)
def _boto3_client(endpoint: str | None, region: str):
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "legacy"},
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=S3_REQUEST_TIMEOUT_S,
    )
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def s3_client():
    return _boto3_client(s3_endpoint(), _region())


# What neither SDK retries: a response cut off while its body streams (the connection reset
# after the request had succeeded) surfaces from pyarrow as one of these; so do 503s to HEAD
# requests, which carry no body to name the error by.
_TRANSIENT_S3_ERRORS = ("AWS Error INTERNAL_FAILURE", "AWS Error NETWORK_CONNECTION",
                        "AWS Error SLOW_DOWN", "AWS Error SERVICE_UNAVAILABLE",
                        "(HTTP status 503)", "(HTTP status 500)",
                        "Failed to flush response stream", "Connection reset")


def retry_transient(operation, attempts: int = S3_MAX_ATTEMPTS, first_wait_s: float = 0.2):
    """Run `operation()` again, with backoff, while it fails on a transient S3 error: for
    whole-object operations (a download, a dataset read, an upload) that the SDKs'
    per-request retries cannot restart."""
    import time

    for attempt in range(attempts):
        try:
            return operation()
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            time.sleep(min(first_wait_s * 2 ** attempt, 5.0))


def is_transient(exc: Exception) -> bool:
    """Whether an S3 failure may pass if the same operation is tried again."""
    if isinstance(exc, OSError):
        return any(text in str(exc) for text in _TRANSIENT_S3_ERRORS)
    # boto3's body stream cut off: botocore's own exceptions, not OSErrors
    return type(exc).__name__ in ("ResponseStreamingError", "IncompleteReadError")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for a URI and the path to pass to it (bucket/key for S3)."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return _s3_filesystem(s3_endpoint(), _region()), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), _local_path(uri)


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = out + "/" + part.strip("/")
    return out


def normalize(uri: str) -> str:
    """Canonical form: s3://bucket/key without trailing slash, or an absolute local path."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return f"s3://{bucket}/{key}".rstrip("/")
    return _local_path(uri)


def relative(uri: str, root: str) -> str:
    uri, root = normalize(uri), normalize(root)
    if uri == root:
        return ""
    if not uri.startswith(root + "/"):
        raise ValueError(f"{uri} is not under {root}")
    return uri[len(root) + 1:]


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        with open(_local_path(uri), "rb") as f:
            return f.read()
    # boto3 rather than pyarrow: it takes any key S3 can hold, including ones with empty or
    # '..' components that pyarrow's path handling rejects or rewrites
    bucket, key = _split_s3_exact(uri)
    return retry_transient(lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes, content_type: str | None = None) -> None:
    """Write all or nothing: a reader never sees a half-written object.

    Local files go to a hidden temporary name in the same folder and are renamed into place;
    an S3 object only appears once its upload completes, with `content_type` when given (a
    bucket served as a static site hands a browser the type stored with the object).
    """
    if is_s3(uri):
        fs, path = filesystem(uri)
        metadata = {"Content-Type": content_type} if content_type else None

        def upload():
            with fs.open_output_stream(path, metadata=metadata) as f:
                f.write(data)

        retry_transient(upload)
        return
    path = _local_path(uri)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)


def delete_tree(uri: str) -> None:
    if not is_s3(uri):
        shutil.rmtree(_local_path(uri), ignore_errors=True)
        return
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path, missing_dir_ok=True)


def make_dirs(uri: str) -> None:
    """Local folders only: S3 has no folders, and marker objects would only confuse listings."""
    if not is_s3(uri):
        os.makedirs(_local_path(uri), exist_ok=True)


def _hidden(name: str) -> bool:
    """Temporary files, markers and dot-files; `.` and `..` are not hidden: an S3 key may hold
    them literally, and such an object is still an input (its key is sanitised later)."""
    return (name.startswith(".") or name.startswith("_")) and name not in (".", "..")


def _is_uid_name(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 1 and all(p.isdigit() for p in parts)


def list_pages(uri: str, suffixes: Iterable[str] | None = None,
               page_size: int = LIST_PAGE_SIZE) -> Iterator[list[str]]:
    """Every file under a folder or prefix, recursively, as pages of URIs.

    Pages keep memory flat on archives of millions of objects. Names starting with '.' or '_'
    (temporary files, _SUCCESS markers) are skipped. `suffixes` filters case-insensitively;
    an empty string in it admits files without an extension, and files named by a DICOM UID
    (`1.2.840.113619.2.55.3`: digits and dots), as PACS exports name them.
    """
    wanted = None if suffixes is None else tuple(s.lower() for s in suffixes)

    def keep(name: str) -> bool:
        if _hidden(name):
            return False
        if wanted is None:
            return True
        lower = name.lower()
        if "" in wanted and ("." not in lower or _is_uid_name(lower)):
            return True
        return lower.endswith(tuple(w for w in wanted if w))

    if is_s3(uri):
        yield from _list_s3_pages(uri, keep, page_size)
        return
    root = _local_path(uri)
    if os.path.isfile(root):
        yield [root] if keep(os.path.basename(root)) else []
        return
    page: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        for name in sorted(files):
            if keep(name):
                page.append(os.path.join(folder, name))
                if len(page) >= page_size:
                    yield page
                    page = []
    if page:
        yield page


def _list_s3_pages(uri: str, keep, page_size: int) -> Iterator[list[str]]:
    bucket, key = _split_s3(uri)
    prefix = key + "/" if key else ""
    paginator = s3_client().get_paginator("list_objects_v2")
    for response in paginator.paginate(Bucket=bucket, Prefix=prefix,
                                       PaginationConfig={"PageSize": page_size}):
        page = []
        for obj in response.get("Contents", []):
            name = obj["Key"]
            if name.endswith("/"):
                continue
            parts = name[len(prefix):].split("/")
            if any(_hidden(p) for p in parts[:-1]) or not keep(parts[-1]):
                continue
            page.append(f"s3://{bucket}/{name}")
        if page:
            yield page


def list_files(uri: str, suffixes: Iterable[str] | None = None) -> list[str]:
    return [u for page in list_pages(uri, suffixes) for u in page]


def check_readable_root(uri: str) -> None:
    """Fail early, with a message a user can act on, when an input location is not there."""
    from .errors import UserError

    if is_s3(uri):
        bucket, _ = _split_s3(uri)
        if not bucket:
            raise UserError(f"not an S3 URI with a bucket: {uri}")
        try:
            if exists(uri):  # an object (a manifest) or a prefix with objects
                return
            next(iter(_list_s3_pages(uri, lambda name: True, 1)))
        except StopIteration:
            raise UserError(f"input not found: {uri} (no objects under this prefix)") from None
        except Exception as exc:  # botocore's NoSuchBucket, credential and endpoint errors
            raise UserError(f"cannot list {uri}: {describe_error(exc)}") from None
        return
    if not os.path.exists(_local_path(uri)):
        raise UserError(f"input not found: {uri}")


def check_writable_root(uri: str) -> None:
    from .errors import UserError

    if is_s3(uri):
        bucket, _ = _split_s3(uri)
        if not bucket:
            raise UserError(f"not an S3 URI with a bucket: {uri}")
        try:
            s3_client().head_bucket(Bucket=bucket)
        except Exception as exc:
            raise UserError(f"cannot write to {uri}: {describe_error(exc)}") from None
        return
    path = _local_path(uri)
    if os.path.isfile(path):
        raise UserError(f"output is a file, expected a folder: {uri}")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write to {uri}: permission denied")


def describe_error(exc: BaseException) -> str:
    """One line for an error table or a message: the exception's own first line, no traceback."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, FileNotFoundError) or "NoSuchKey" in text or "Path does not exist" in text:
        return "not found"
    if isinstance(exc, PermissionError) or "ACCESS_DENIED" in text or "AccessDenied" in text \
            or "403" in text:
        return "permission denied"
    return f"{type(exc).__name__}: {text}"[:300]


# ---------------------------------------------------------------- Parquet in and out

def write_parquet(uri: str, table) -> None:
    """One Parquet file, written atomically like every other object."""
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(uri, buffer.getvalue())


def read_parquet(uri: str, columns: list[str] | None = None):
    """A Parquet file, or only `columns` of it: those are read through pyarrow's filesystem,
    which fetches the footer and just their column chunks (the keys of a prepared shard
    without its images), where a whole file is one GET."""
    import io

    import pyarrow.parquet as pq

    if columns is None:
        return pq.read_table(io.BytesIO(read_bytes(uri)))
    fs, path = filesystem(uri)
    return retry_transient(lambda: pq.read_table(path, columns=columns, filesystem=fs))


# ---------------------------------------------------------------- keys

MAX_KEY_LENGTH = 180
_UNSAFE = re.compile(r"[^A-Za-z0-9._#+=@-]")


def safe_key(relative: str) -> str:
    """A relative input path (without extension) -> a key that is also a safe output path.

    Each '/'-separated part keeps letters, digits and `._#+=@-`; anything else becomes '_';
    empty, '.' and '..' parts are dropped, so no key can climb out of OUTPUT or be absolute.
    Keys longer than MAX_KEY_LENGTH are cut and suffixed with a hash of the full name.
    """
    parts = []
    for part in relative.replace("\\", "/").split("/"):
        part = _UNSAFE.sub("_", part.replace("\x00", "")).lstrip(".")
        if part:
            parts.append(part)
    key = "/".join(parts) or "_"
    if len(key) > MAX_KEY_LENGTH or any(len(p) > 100 for p in parts):
        digest = hashlib.sha256(relative.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        key = "/".join(p[:100] for p in parts)[:MAX_KEY_LENGTH - 13].rstrip("/") + "-" + digest
    return key
