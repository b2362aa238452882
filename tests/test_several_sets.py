"""Several prepared sets trained on as one (public data and a hospital's frames): each keeps
its own split by case, train and cv read the union, and cv deals each set's cases into the
folds among themselves, so no case crosses splits or folds."""
import json
import re
import shutil
import zlib
from collections import Counter
from pathlib import Path

import pytest

from raythyroid import model, shards, split, storage, training

from test_cli import assert_one_line_error, in_process


def split_rows(data: shards.PreparedSet, name: str) -> list[dict]:
    return shards.read_rows(data.uri, data.manifest, name, ["key", "case_id"])


def test_train_reads_each_sets_splits_together_and_no_case_crosses_them(
        phantom_dataset, hospital_set):
    data = shards.read_prepared([phantom_dataset[1], hospital_set[1]])
    public, hospital = data.sets
    # the ids collide across the sets: only the set tells two patients apart
    assert {r["case_id"] for r in split_rows(public, "train")} & \
        {r["case_id"] for s in ("train", "val", "test") for r in split_rows(hospital, s)}
    for name in ("train", "val", "test"):
        expected = split_rows(public, name) + split_rows(hospital, name)
        assert data.count(name) == len(expected) > 0
        loaded = training.load_split(data, name, full=name != "train")
        # the decoded rows are exactly both sets' rows of this split (a row's `part` is the
        # hash of its key), each once
        assert Counter(loaded.to_pandas()["part"]) == Counter(
            zlib.crc32(r["key"].encode()) for r in expected)
    for prepared in data.sets:  # within a set, a case is in one split
        cases = [{r["case_id"] for r in split_rows(prepared, name)}
                 for name in ("train", "val", "test")]
        assert not (cases[0] & cases[1] or cases[0] & cases[2] or cases[1] & cases[2])
    assert data.provenance == {"sets": [s.provenance for s in data.sets],
                               "counts": {n: data.count(n) for n in ("test", "train", "val")}}
    # one set is read, recorded and named as before
    alone = shards.read_prepared(phantom_dataset[1])
    assert alone.provenance == public.provenance and alone.param == public.uri


def test_cv_deals_each_sets_cases_into_the_folds_among_themselves(phantom_dataset,
                                                                   hospital_set):
    data = shards.read_prepared([phantom_dataset[1], hospital_set[1]])
    dealt = training.deal_folds(data, 3, seed=1)
    case_folds = []
    for prepared, key_fold in zip(data.sets, dealt.by_set):
        rows = split_rows(prepared, ["train", "val"])
        assert set(key_fold) == {r["key"] for r in rows}
        fold_of_case = {}
        for r in rows:  # every frame of a case in the case's one fold
            assert fold_of_case.setdefault(r["case_id"], key_fold[r["key"]]) == key_fold[r["key"]]
        case_folds.append(fold_of_case)
        assert set(fold_of_case.values()) == {0, 1, 2}  # each fold has its share of each set
    # a case id both sets use is two cases, and the deal goes on across sets: the folds'
    # sizes in cases differ by at most one overall
    assert dealt.cases == sum(len(c) for c in case_folds) > len(set().union(*case_folds))
    sizes = Counter(f for folds in case_folds for f in folds.values())
    assert max(sizes.values()) - min(sizes.values()) <= 1
    # one set is dealt as before, so existing cv ensembles and distill --folds still agree
    assert case_folds[0] == split.folds(case_folds[0], 3, seed=1)
    alone = training.deal_folds(shards.read_prepared(phantom_dataset[1]), 3, seed=1)
    assert alone.by_set == dealt.by_set[:1]


def test_sets_that_cannot_train_together_are_refused_in_one_line(phantom_dataset, hospital_set,
                                                                 tmp_path):
    from raythyroid import preprocess
    from raythyroid.imaging import PrepConfig

    public, hospital = phantom_dataset[1], hospital_set[1]
    other_size = str(tmp_path / "other-size")
    preprocess.run(hospital_set[0], other_size, config=PrepConfig(size=64), log=lambda *_: None)
    copy = str(tmp_path / "copy")  # the same frames under another name
    shutil.copytree(public, copy)
    # other frames of the same patients: DICOM sets' case ids are hashed patients, the same
    # patient in every set (where "1" in two folder sets names two)
    same_patients = [as_dicom_cases(data, str(tmp_path / f"patients-{i}"))
                     for i, data in enumerate((public, hospital))]
    run = str(tmp_path / "run")
    for command in ("train", "cv"):
        for args, words in (([public, other_size, run], "size 64 (not 128)"),
                            ([public, public, run], "given twice"),
                            ([hospital, copy, public, run], "identical image"),
                            ([*same_patients, run], "same patient"),
                            ([public, hospital], "is a preprocess output")):
            assert_one_line_error(in_process(command, *args), words)
    assert not storage.exists(run)


def as_dicom_cases(prepared: str, folder: str) -> str:
    """A copy of a prepared set whose case ids are hashed patients, as DICOM sets' are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(prepared, folder)
    for shard in Path(folder).rglob("*.parquet"):
        table = pq.read_table(shard)
        if "case_id" in table.column_names:
            ids = [f"{split.PATIENT_CASE_PREFIX}{c}" for c in table.column("case_id").to_pylist()]
            table = table.set_column(table.column_names.index("case_id"), "case_id",
                                     pa.array(ids, pa.string()))
            pq.write_table(table, shard)
    return folder


def test_data_in_a_job_config_may_be_a_list():
    from raythyroid import jobspec
    from raythyroid.errors import UserError

    config = {"data": ["s3://b/ddti-256", "s3://b/hospital-256"], "run": "s3://b/runs/joint",
              "epochs": 5}
    assert jobspec.to_argv("train", config) == ["train", "s3://b/ddti-256", "s3://b/hospital-256",
                                                "s3://b/runs/joint", "--epochs", "5"]
    with pytest.raises(UserError, match="relative path"):
        jobspec.refuse_relative_paths({"data": ["s3://b/ddti-256", "hospital-256"]})


def check_trained_on_both(run: str, data: shards.PreparedData, mlflow_server: str) -> None:
    """What a train run over two sets records (test_loop's fine-tune is one: a train run costs
    half a minute here): both sets in model.json, MLflow's parameters and the report, and
    validation and test over both sets' frames."""
    import mlflow

    info = model.read_info(f"{run}/model")
    assert info.data_uris == data.uris and info.data["counts"]["train"] == data.count("train")
    first_epoch = json.loads(storage.read_text(f"{run}/history.jsonl").splitlines()[0])
    assert first_epoch["val_images"] == data.count("val")
    assert json.loads(storage.read_text(f"{run}/metrics.json"))["images"] == data.count("test")
    page = storage.read_text(f"{run}/report/index.html")
    assert " + ".join(data.uris) in page
    # the worst validation frames, each named by its set (its folder's name, or its URI where
    # two sets' folders share a name)
    shown = re.findall(r'data-key="([^"]+)"', page)
    labels = set(data.uris) | {uri.rsplit("/", 1)[-1] for uri in data.uris}
    assert shown and all(any(key.startswith(label + "/") for label in labels) for key in shown)
    logged = mlflow.MlflowClient(mlflow_server).search_runs(
        [mlflow.get_experiment_by_name("raythyroid").experiment_id],
        f"tags.`raythyroid.run` = '{storage.normalize(run)}'")
    assert json.loads(logged[0].data.params["data"]) == data.uris


def test_a_run_resumes_only_over_the_data_it_started_on(tmp_path):
    """cv deals each set's cases in turn, so even the same sets in another order would deal
    the folds a resumed run has not finished otherwise than those it has."""
    from raythyroid.errors import UserError

    run = str(tmp_path / "run")
    training.check_same_data(run, ["s3://b/ddti", "s3://b/hospital"])
    training.check_same_data(run, ["s3://b/ddti", "s3://b/hospital"])  # a rerun resumes
    for other in (["s3://b/hospital", "s3://b/ddti"], ["s3://b/ddti"]):
        with pytest.raises(UserError, match="same DATA, in the same order"):
            training.check_same_data(run, other)
