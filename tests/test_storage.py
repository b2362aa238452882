import os

import pytest

from raythyroid import storage
from raythyroid.errors import UserError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3").bucket("storage")


def test_write_read_overwrite(root):
    uri = storage.join(root, "a", "b.bin")
    storage.write_bytes(uri, b"first")
    storage.write_bytes(uri, b"second")
    assert storage.read_bytes(uri) == b"second"
    assert storage.exists(uri)
    assert storage.is_dir(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "missing"))


def test_listing_is_recursive_paginated_and_filtered(root):
    names = ["x/1.png", "x/2.JPG", "x/y/3.png", "x/y/z/4.tif", "x/notes.txt", "x/.hidden.png",
             "x/_SUCCESS", "x/dicomfile"]
    for name in names:
        storage.write_bytes(storage.join(root, name), b"data")
    pages = list(storage.list_pages(storage.join(root, "x"), (".png", ".jpg", ".tif", ""),
                                    page_size=2))
    assert all(len(page) <= 2 for page in pages)
    found = sorted(storage.relative(u, storage.join(root, "x")) for page in pages for u in page)
    assert found == ["1.png", "2.JPG", "dicomfile", "y/3.png", "y/z/4.tif"]
    everything = storage.list_files(storage.join(root, "x"))
    assert len(everything) == 6  # hidden and _-prefixed names are never listed


def test_delete_tree_and_file(root):
    for name in ["t/a", "t/b/c"]:
        storage.write_bytes(storage.join(root, name), b"1")
    storage.delete(storage.join(root, "t", "a"))
    assert not storage.exists(storage.join(root, "t", "a"))
    storage.delete_tree(storage.join(root, "t"))
    assert storage.list_files(storage.join(root, "t")) == []
    assert not storage.exists(storage.join(root, "t", "b", "c"))


def test_local_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    storage.write_bytes(str(target), b"old")

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", explode)
    with pytest.raises(OSError):
        storage.write_bytes(str(target), b"new content")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_file_uri_and_relative(tmp_path):
    storage.write_bytes(f"file://{tmp_path}/d/e.txt", b"ok")
    assert (tmp_path / "d" / "e.txt").read_bytes() == b"ok"
    assert storage.relative(str(tmp_path / "d" / "e.txt"), f"file://{tmp_path}") == "d/e.txt"
    assert storage.normalize("s3://bucket/key/") == "s3://bucket/key"


def test_s3_endpoint_specific_variable_wins(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)
    bucket = s3.bucket("endpoint")
    storage.write_bytes(storage.join(bucket, "k"), b"v")
    assert storage.read_bytes(storage.join(bucket, "k")) == b"v"


def test_root_checks_give_user_errors(s3, tmp_path):
    with pytest.raises(UserError, match="input not found"):
        storage.check_readable_root(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no objects"):
        storage.check_readable_root(s3.bucket("empty") + "/nothing")
    with pytest.raises(UserError, match="cannot"):
        storage.check_writable_root("s3://no-such-bucket-here/out")
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(UserError, match="is a file"):
        storage.check_writable_root(str(tmp_path / "afile"))


def test_missing_object_is_described_as_not_found(s3):
    bucket = s3.bucket("missing")
    with pytest.raises(Exception) as info:
        storage.read_bytes(storage.join(bucket, "absent.png"))
    assert storage.describe_error(info.value) == "not found"


def test_a_job_driver_leaves_its_jobs_storage_variables_to_the_job(monkeypatch):
    """A job submitted with AWS_ENDPOINT_URL in its runtime env: the driver passes Ray only the
    storage variables the job does not set (Ray refuses a driver that sets one again)."""
    import json

    from raythyroid import runtime

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.example:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert runtime.storage_environment()["AWS_ENDPOINT_URL"] == "http://minio.example:9000"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip",
                         "env_vars": {"AWS_ENDPOINT_URL": "http://minio.example:9000"}}}))
    passed = runtime.storage_environment()
    assert "AWS_ENDPOINT_URL" not in passed and passed["AWS_DEFAULT_REGION"] == "eu-west-1"
