"""User mistakes end in one line on stderr and exit code 2, never a traceback."""
import contextlib
import io
from types import SimpleNamespace

import pytest

from helpers import run_cli


def assert_one_line_error(result, words):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("raythyroid: error:") and words in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("args, words", [
    (["preprocess", "/definitely/not/here", "out"], "input not found"),
    (["preprocess", ".", "out", "--size", "100"], "multiple of 16"),
    (["preprocess", ".", "out", "--split", "0.9,0.9,0.1"], "sum to 1"),
    (["preprocess", ".", "out", "--layout", "coco"], "invalid choice"),
    (["preprocess", ".", "out", "--bogus"], "unrecognized arguments"),
    (["preprocess"], "required"),
    (["preprocess", "dicomweb+http://:8042/dicom-web", "out"], "DICOMweb URL has no host"),
    (["preprocess", "dicomweb+http://127.0.0.1:1/dicom-web", "out", "--layout", "folders"],
     "--layout dicom (or auto), not folders"),
    (["frobnicate"], "invalid choice"),
    (["infer", "ddti", ".", "out", "--fast", "--tta"], "one of --fast and --tta"),
    (["infer", "ddti", ".", "out", "--precision", "int8"], "ddti has no int8 weights"),
    (["infer", "ddti", ".", "out", "--precision", "int8", "--fast"], "give one of them"),
    (["quantize", "ddti", ".", "out"], "int8 is for one network"),
    (["infer", "no-such-model", ".", "out"], "nor the name of a bundled model"),
])
def test_user_mistakes_are_one_line_and_exit_2(args, words):
    # the command's own main in this process: the same code path as the console entry point
    # (shown as a subprocess below), without a Python start-up per case
    assert_one_line_error(in_process(*args), words)


def in_process(*args: str) -> SimpleNamespace:
    from raythyroid import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_the_console_entry_point_reports_a_mistake_the_same_way():
    assert_one_line_error(run_cli("preprocess", "/definitely/not/here", "out"), "input not found")


def test_missing_bucket_is_a_user_error(s3, tmp_path):
    assert_one_line_error(run_cli("preprocess", "s3://no-such-bucket/data", str(tmp_path)),
                          "cannot list")


def test_folder_without_a_known_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(run_cli("preprocess", str(tmp_path), str(tmp_path / "out")),
                          "cannot tell the layout")


def test_resuming_a_run_under_another_architecture_is_a_user_error(trained_run,
                                                                   phantom_dataset, tmp_path):
    """Without the check, loading the checkpoint fails inside every worker, once per retry."""
    import json
    import shutil

    from raythyroid import training

    run_uri, _ = trained_run
    _, prepared = phantom_dataset
    unfinished = tmp_path / "run"
    shutil.copytree(run_uri, unfinished)
    (unfinished / "metrics.json").unlink()  # as if the first run had died mid-training
    assert json.loads((unfinished / training.checkpoints.RUN_SETTINGS).read_text())["base"] == 16
    result = run_cli("train", prepared, str(unfinished), "--base", "8", "--optimizer", "sgd")
    assert_one_line_error(result, "--base 16 (now 8), --optimizer adamw (now sgd)")
    assert not (unfinished / "metrics.json").exists()
