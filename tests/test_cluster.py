"""The jobs as users run them: submitted through the Ray Jobs API to a multi-node Ray cluster
(cluster/local-cluster.sh), reading and writing a real S3 endpoint. The pipeline itself runs
once, in the cluster_pipeline fixture (cluster_jobs.run_pipeline)."""
import json

import pytest

from raythyroid import infer, model, shards, storage, train

from cluster_jobs import BATCH_SIZE, EMA, EPOCHS, FRAMES, WORKERS


@pytest.mark.timeout(1500)
def test_preprocess_train_infer_through_the_jobs_api_on_three_nodes(cluster_pipeline):
    pipeline = cluster_pipeline
    manifest = json.loads(storage.read_text(storage.join(pipeline.prepared, "manifest.json")))
    assert manifest["rows"] == FRAMES

    assert f"epoch {EPOCHS}/{EPOCHS}" in pipeline.logs["train"]
    assert storage.exists(storage.join(pipeline.run, "model", "model.json"))
    assert set(json.loads(storage.read_text(storage.join(pipeline.run, "metrics.json")))) \
        >= {"n_iou"}

    rows = infer.read_results(pipeline.predictions).to_pylist()
    assert len(rows) == FRAMES and all(r["status"] == "ok" for r in rows)
    assert storage.exists(storage.join(pipeline.predictions, "_SUCCESS"))
    assert storage.exists(storage.join(pipeline.predictions, "metrics.json"))

    # the work ran on more than one node: Ray's state API saw the training workers and the
    # Predictor actors each spread over distinct nodes, and every result row names the node
    # of a Predictor. (Which Predictor gets each block is Ray Data's choice: on 60 small frames
    # one actor can take them all, so the rows alone cannot show the spread.)
    train_nodes = {a["node_id"] for a in pipeline.actors if a["class_name"] == "RayTrainWorker"}
    predictor_nodes = {a["node_id"] for a in pipeline.actors
                       if "Predictor" in a["class_name"] and a["node_id"]}
    assert len(train_nodes) >= 2 and len(predictor_nodes) >= 2
    assert {r["node_id"] for r in rows} <= predictor_nodes


@pytest.mark.timeout(1500)
def test_training_worker_killed_mid_epoch_on_the_cluster(cluster_pipeline, ray_local):
    """A training worker of the pipeline's train job was SIGKILLed after two checkpoints: Ray
    Train restarted the group from the last checkpoint, every epoch ran once, and the weight
    average went on where it was. What ships is the average at the best epoch, without the
    deep-supervision heads, with its own validation score."""
    import io

    import torch

    pipeline = cluster_pipeline
    assert pipeline.killed_training_worker
    rows = [json.loads(line)
            for line in storage.read_text(f"{pipeline.run}/history.jsonl").splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    resumed = [r for r in rows if "resumed_from_epoch" in r]
    assert len(resumed) == 1 and resumed[0]["resumed_from_epoch"] >= 1
    assert resumed[0]["epoch"] == resumed[0]["resumed_from_epoch"] + 1

    # one average update per optimizer step, and it went on from the checkpoint: each worker
    # takes full batches of an equal shard every epoch, so a restarted average falls short
    manifest = shards.read_manifest(pipeline.prepared)
    steps_per_epoch = manifest["counts"]["train"] // WORKERS // BATCH_SIZE
    saved = [torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu",
                        weights_only=False)
             for uri in storage.list_files(f"{pipeline.run}/checkpoints")
             if uri.endswith("/" + train.STATE_FILE)]
    assert {s["ema"]["steps"] / s["epoch"] for s in saved if s["epoch"]} == {steps_per_epoch}
    last = max(saved, key=lambda s: s["epoch"])
    assert last["epoch"] == EPOCHS

    shipped_net, meta = model.load(storage.join(pipeline.run, "model"))
    assert meta["architecture"]["deep_supervision"] == 0
    assert meta["training"]["config"]["ema"] == EMA
    shipped = shipped_net.state_dict()
    assert not any(k.startswith("aux.") for k in shipped)
    assert any(not torch.equal(shipped[k], last["model"][k]) for k in shipped
               if shipped[k].dtype.is_floating_point)
    best_averaged = last["best"]["model"]  # the average at the best epoch
    assert all(torch.equal(shipped[k], best_averaged[k]) for k in shipped)

    # the validation score kept with the model is the shipped (averaged) weights' own
    val = train.load_split(pipeline.prepared, manifest, "val", full=True)
    bf16 = rows[0]["precision"] == "bf16"
    rescored = train.evaluate(shipped_net, val, 0, 1, torch.device("cpu"), bf16, 16)
    assert rescored["n_iou"] == pytest.approx(meta["training"]["best_val"]["n_iou"], abs=2e-3)

    # an average restored from a checkpoint is the saved one, step count included
    restored = train.WeightAverage(model.build(model.UNetConfig(deep_supervision=2)), EMA,
                                   last["ema"])
    assert restored.steps == last["ema"]["steps"]
    assert all(torch.equal(v, last["ema"]["weights"][k])
               for k, v in restored.model.state_dict().items())
