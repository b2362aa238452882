"""One OUTPUT across model versions, as a nightly job keeps it through promotions: a new version
goes on in the OUTPUT (another version of the same registered or bundled model by itself, a
replaced folder with --new-version), each row and SEG names its version, what earlier versions
committed is kept unless --redo-older, and metrics and the report split by version."""
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pydicom
import pytest

from raythyroid import claim, cli, model, phantom, results, storage
from raythyroid.errors import UserError

from helpers import make_dicom

JOB = {"input": "s3://archive", "labels": None, "model": "models:/thyroid/1",
       "weights": "1111111111111111", "tta": True, "tta_zoom": 0.0,
       "postprocess": {"threshold": 0.5, "min_area_fraction": 0.0005, "fill_holes": True,
                       "keep_largest": 2}}


def claimed(output, job, new_version=False):
    """claim_output then begin, as a run does before it reads what is done."""
    versions = claim.claim_output(str(output), job, new_version)
    claim.begin(str(output), versions)
    return versions


def test_another_version_of_the_model_goes_on_and_any_other_change_is_refused(tmp_path):
    out = tmp_path / "nightly"
    assert claimed(out, JOB).current == "thyroid/1"
    # the champion promoted: another version of the registered model, with its own inference
    second = dict(JOB, model="models:/thyroid/2", weights="2222222222222222", tta=False)
    assert (claimed(out, second).previous, claimed(out, second).current) == ("thyroid/1",
                                                                            "thyroid/2")
    held = results.read_job(str(out))
    assert held["version"] == "thyroid/2" and held["model"] == "models:/thyroid/2"
    assert [v["version"] for v in held["versions"]] == ["thyroid/1", "thyroid/2"]

    # another registered model, or a folder, is a mistake unless --new-version says otherwise
    for uri in ("models:/other/2", "s3://models/run/model"):
        unrelated = dict(second, model=uri, weights="3333333333333333")
        with pytest.raises(UserError, match=r"holds the results of another job \(model: .*"
                                            r"--new-version goes on with it"):
            claimed(out, unrelated)
    assert results.read_job(str(out)) == held  # a refused run changes nothing
    # what is not the model's must stay: --fast, the input, the labels
    for name, value in (("fast", True), ("input", "s3://other"), ("labels", "s3://labels")):
        with pytest.raises(UserError, match=rf"another job \({name}: "):
            claimed(out, dict(second, model="models:/thyroid/3", weights="3" * 16,
                              **{name: value}))
    with pytest.raises(UserError, match="thyroid/1 made with other weights"):
        claimed(out, dict(JOB, weights="9" * 16))  # another registry's thyroid/1
    # a folder replaced, said so; then a rollback to version 1: the last run's goes last
    folder = dict(second, model="s3://models/run/model", weights="3" * 16)
    assert claimed(out, folder, new_version=True).current == "3" * 16
    # the same weights elsewhere with another TTA are no new version, said so or not
    with pytest.raises(UserError, match=r"another job \(model: "):
        claimed(out, dict(folder, model="s3://models/moved", tta=True), new_version=True)
    claimed(out, JOB)
    assert [v["version"] for v in results.read_job(str(out))["versions"]] == [
        "thyroid/2", "3" * 16, "thyroid/1"]

    # an OUTPUT of a release before rows named their version: its rows are its model's
    older = tmp_path / "older"
    older.mkdir()
    (older / results.JOB_FILE).write_text(json.dumps(JOB))
    claimed(older, second)
    assert results.read_job(str(older))["unversioned"] == "thyroid/1"


def write_rows(output, rows):
    blank = {name: None for name in results.RESULT_SCHEMA.names}
    results.write_results(output, pa.Table.from_pylist(
        [dict(blank, **{"status": "ok", **row}) for row in rows], schema=results.RESULT_SCHEMA))


def test_a_source_redone_keeps_the_rows_of_the_version_that_ran_last(tmp_path):
    """Rows of a release that named no version are the OUTPUT's first model's; a source another
    version redid keeps that version's rows (its frame keys may differ: a cine read or not),
    unless the redo could not read the source again; a redo cut off is redone next run."""
    output = str(tmp_path)
    claimed(output, JOB)
    write_rows(output, [{"key": "a", "source_uri": "s/a"}, {"key": "b", "source_uri": "s/b"},
                        {"key": "c#1", "source_uri": "s/c", "frame": 1},
                        {"key": "c#2", "source_uri": "s/c", "frame": 2}])  # no model_version
    second = dict(JOB, model="models:/thyroid/2", weights="2" * 16)
    claimed(output, second)
    write_rows(output, [{"key": "c", "source_uri": "s/c", "status": "error",
                         "error": "cannot read: gone", "model_version": "thyroid/2"},
                        {"key": "a", "source_uri": "s/a", "model_version": "thyroid/2"}])
    write_rows(output, [{"key": "d", "source_uri": "s/d", "model_version": "thyroid/2"}])
    assert claim.compact_results(output) == 2
    made = {r["key"]: r["model_version"] for r in results.read_results(output).to_pylist()}
    assert made == {"a": "thyroid/2", "b": None, "c#1": None, "c#2": None, "d": "thyroid/2"}

    work = claim.plan_work(output, "thyroid/2", redo_older=True)
    assert sorted(work.redo.to_pylist(), key=str) == [{"key": "b", "source_uri": "s/b"},
                                                       {"key": "c", "source_uri": "s/c"}]
    assert work.done == {"s/a", "s/d"}
    assert claim.plan_work(output, "thyroid/2", redo_older=False).redo.num_rows == 0
    # a block that noted its sources and never committed: they are redone whatever the flags
    results.write_redoing(output, ["d"], pa.table({"key": ["d"], "source_uri": ["s/d"]}))
    work = claim.plan_work(output, "thyroid/2", redo_older=False)
    assert work.redo.to_pylist() == [{"key": "d", "source_uri": "s/d"}]
    assert "s/d" not in work.done
    claim.settle(work)
    assert claim.plan_work(output, "thyroid/2", redo_older=False).redo.num_rows == 0


def replace_weights(folder) -> None:
    """A new version deployed where the model was: one bias nudged, other weights (and so
    another version), the same masks all but certainly."""
    import torch

    weights = folder / "weights.pt"
    state = torch.load(weights)
    name = next(n for n in state if n.endswith("bias"))
    state[name] = state[name] + 1e-6
    torch.save(state, weights)


def results_files(output) -> dict[str, bytes]:
    return {uri: storage.read_bytes(uri)
            for uri in storage.list_files(storage.join(str(output), results.RESULTS))}


def seg_version(output, key: str) -> tuple[str, str]:
    seg = pydicom.dcmread(output / results.DICOM_SEG / f"{key}.seg.dcm")
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    return algorithm.AlgorithmVersion, seg.SeriesDescription


@pytest.mark.timeout(600)
def test_the_night_after_a_new_version_appends_and_redo_older_redoes_once(
        phantom_dataset, trained_run, ray_local, tmp_path, capsys):
    """A hospital that deploys a model by replacing the folder the nightly job names."""
    raw, _ = phantom_dataset
    deployed = tmp_path / "deployed"
    shutil.copytree(f"{trained_run[0]}/model", deployed)
    first = model.read_info(str(deployed)).weights_sha256[:16]
    archive, out = tmp_path / "archive", tmp_path / "out"
    stems = sorted(p.name for p in (Path(raw) / "images").iterdir())[:6]
    archive.mkdir()
    for name in stems[:4]:
        shutil.copy(Path(raw) / "images" / name, archive / name)
    frames = [f.image[..., 0] for f in phantom.generate(2, seed=31, height=120, width=160)]
    (archive / "cine.dcm").write_bytes(make_dicom(frames))
    night = ["infer", str(deployed), str(archive), str(out), "--labels", f"{raw}/masks",
             "--dicom-seg", "--batch-size", "4", "--block-size", "4"]

    assert cli.main(night) == 0
    night_one = results_files(out)
    assert seg_version(out, "cine") == (first, f"raythyroid nodule, model {first}")
    for name in stems[4:]:  # the next night's new instances
        shutil.copy(Path(raw) / "images" / name, archive / name)
    replace_weights(deployed)
    second = model.read_info(str(deployed)).weights_sha256[:16]
    capsys.readouterr()

    # new weights in the folder are refused as they were: one line, exit 2, nothing written
    assert cli.main(night) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds the results of another job (weights" in err
    assert "--new-version goes on with it" in err
    assert results_files(out) == night_one

    # said to be a new version: the new instances only, the earlier rows untouched
    assert cli.main([*night, "--new-version"]) == 0
    assert f"5 already done, 2 to process with model version {second}" in capsys.readouterr().out
    after = results_files(out)
    assert {uri: after[uri] for uri in night_one} == night_one  # byte for byte
    made = {r["key"]: r["model_version"] for r in results.read_results(str(out)).to_pylist()}
    assert made == {**{Path(n).stem: first for n in stems[:4]},
                    "cine#1": first, "cine#2": first,
                    **{Path(n).stem: second for n in stems[4:]}}
    saved = json.loads((out / "metrics.json").read_text())
    assert {label: scores["images"] for label, scores in saved["by_version"].items()} == {
        first: 4, second: 2}
    assert saved["images"] == 6
    page = (out / "report" / "index.html").read_text()
    by_version = page.split('id="by-version"')[1].split("</div>")[0]
    assert by_version.index(first) < by_version.index(second)

    # --redo-older: every source the first version made, once, by the second
    assert cli.main([*night, "--redo-older"]) == 0
    assert "2 already done, 5 to process" in capsys.readouterr().out
    rows = results.read_results(str(out)).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(made)  # each key once
    assert {r["model_version"] for r in rows} == {second}
    saved = json.loads((out / "metrics.json").read_text())
    assert list(saved["by_version"]) == [second] and saved["images"] == 6
    assert seg_version(out, "cine")[0] == second
    assert not storage.list_files(str(out / results.REDOING))
    assert cli.main([*night, "--redo-older"]) == 0  # nothing older left
    assert "7 already done, 0 to process" in capsys.readouterr().out


def test_a_redo_of_the_same_block_keeps_the_older_rows_it_could_not_read_again(tmp_path):
    """A redo builds the same blocks as the night it redoes (the same input and block size):
    its results file must not take the older version's place, or a source the redo can no
    longer read (an archive's retention) loses the rows that could."""
    output = str(tmp_path)
    claimed(output, JOB)
    older = [{"key": "a", "source_uri": "s/a", "model_version": "thyroid/1"},
             {"key": "b", "source_uri": "s/b", "model_version": "thyroid/1"}]
    write_rows(output, older)
    claimed(output, dict(JOB, model="models:/thyroid/2", weights="2" * 16))
    write_rows(output, [{"key": "a", "source_uri": "s/a", "model_version": "thyroid/2"},
                        {"key": "b", "source_uri": "s/b", "status": "error",
                         "error": "cannot read: gone", "model_version": "thyroid/2"}])
    assert claim.compact_results(output) == 2
    kept = {r["key"]: (r["model_version"], r["status"])
            for r in results.read_results(output).to_pylist()}
    assert kept == {"a": ("thyroid/2", "ok"), "b": ("thyroid/1", "ok")}
