"""distill: a one-pass student learnt from a phantom teacher over frames nobody labelled, the
teacher's labels committed exactly once across a SIGTERM, bad unlabelled inputs as error rows
(one distillation shows all three); cross-validation that never teaches a fold its own frames;
and the pieces the student's loss is made of."""
import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from raythyroid import augment, distill, imaging, losses, phantom, storage, training

from helpers import assert_clean_terminal, assert_stopped, run_cli, start_cli


def unlabelled_folder(root: Path, count: int, seed: int) -> Path:
    """Phantom frames without their masks, as an archive holds them, plus inputs that cannot
    be taught: an empty file, a truncated PNG, bytes that are no image, and a DICOM report."""
    phantom.write_folders(str(root), count, seed=seed, height=180, width=280)
    for mask in (root / "masks").iterdir():
        mask.unlink()
    (root / "masks").rmdir()
    images = root / "images"
    (images / "empty.png").write_bytes(b"")
    whole = (images / sorted(p.name for p in images.iterdir() if p.suffix == ".png")[0])
    (images / "truncated.png").write_bytes(whole.read_bytes()[:300])
    (images / "notes.jpg").write_bytes(b"not an image at all")
    import pydicom

    report = Path(pydicom.__file__).parent / "data" / "test_files" / "test-SR.dcm"
    (images / "report.dcm").write_bytes(report.read_bytes())
    return root


def masks_of(model_uri: str, frames: np.ndarray) -> np.ndarray:
    """A model's masks of prepared frames with the inference its model.json chose."""
    import torch

    from raythyroid import model, postprocess

    net, info = model.load(model_uri)
    prob = model.nodule_probability(net, torch.from_numpy(frames), torch.device("cpu"),
                                    flip_tta=info.inference.tta, zoom=info.inference.tta_zoom)
    post = info.inference.post
    return np.stack([postprocess.clean_mask(p, post) > 0 for p in prob.numpy()])


@pytest.mark.timeout(900)
def test_student_learns_the_teachers_masks_and_a_sigterm_while_teaching_loses_nothing(
        phantom_dataset, trained_run, tmp_path):
    """SIGTERM while the phantom teacher labels the labelled split and a folder of frames
    without masks: exit 143 with one line. The same command again labels only what no part
    holds, so every source is taught exactly once, then trains a base-8 student on the
    teacher's soft targets alone (--soft-weight 1: no label enters its loss), which draws the
    teacher's masks on phantoms neither of them saw. Bad unlabelled inputs are error or skipped
    rows with their reason, and the job goes on. (One distillation for both: each costs a
    teaching pass and a training run.)"""
    _, prepared = phantom_dataset
    teacher_run, _ = trained_run
    teacher = storage.join(teacher_run, "model")
    # 80 good frames: with the labelled split, three blocks of sources, so the SIGTERM after
    # the first part leaves some to label
    archive = unlabelled_folder(tmp_path / "archive", 80, seed=21)
    sources = len(list((archive / "images").iterdir()))
    run = tmp_path / "student"
    taught = run / distill.TAUGHT
    args = ["distill", teacher, prepared, str(run), "--unlabelled", str(archive),
            "--epochs", "8", "--batch-size", "8", "--base", "8", "--soft-weight", "1",
            "--workers", "1"]
    first = start_cli(*args)
    deadline = time.time() + 300
    while not (taught.exists() and len(list(taught.glob("part-*.parquet"))) >= 2):
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.1)
    first.send_signal(signal.SIGTERM)
    out, err = assert_stopped(first, signal.SIGTERM, "distill", time.time())
    assert_clean_terminal(out + err)
    before = set(distill.read_taught(str(taught), ["source"]).column("source").to_pylist())
    labelled = json.loads((Path(prepared) / "manifest.json").read_text())["counts"]["train"]
    assert 0 < len(before) < labelled + sources and not (run / "model").exists()
    committed = {p: p.stat().st_mtime_ns for p in taught.glob("part-*.parquet")}

    second = run_cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{len(before)} already labelled, {labelled + sources - len(before)} to label" \
        in second.stdout, second.stdout
    # what the first run committed is not taught again
    assert {p: p.stat().st_mtime_ns for p in committed} == committed
    rows = distill.read_taught(str(taught), ["source", "key", "labelled", "status", "error"]
                               ).to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys))  # no frame taught twice
    assert len({r["source"] for r in rows if not r["source"].startswith("data:")}) == sources
    assert sum(r["labelled"] for r in rows) == labelled
    assert sum(not r["labelled"] and r["status"] == "ok" for r in rows) == 80
    reasons = {r["key"].rsplit("/", 1)[-1]: (r["status"], r["error"])
               for r in rows if not r["labelled"] and r["status"] != "ok"}
    assert set(reasons) == {"empty", "truncated", "notes", "report"}, reasons
    assert reasons["report"][0] == "skipped" and "not an image" in reasons["report"][1]
    assert all(status == "error" and reason and "\n" not in reason
               for name, (status, reason) in reasons.items() if name != "report")

    assert (run / "metrics.json").exists()
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["architecture"]["base"] == 8 and meta["tta"] is False
    assert meta["distillation"]["teacher"] == storage.normalize(teacher)
    assert meta["distillation"]["unlabelled"] == [storage.normalize(str(archive))]

    # frames neither model saw, prepared as infer prepares them: the student's masks (its own
    # inference, one pass) against the teacher's (its own, TTA included), pooled
    fresh = phantom.generate(16, seed=77, height=180, width=280)
    prep = imaging.PrepConfig.from_dict(meta["prep"])
    frames = np.stack([imaging.prepare(f.image, prep)[0] for f in fresh])
    teacher_masks, student_masks = (masks_of(uri, frames)
                                    for uri in (teacher, str(run / "model")))
    agreement = np.sum(teacher_masks & student_masks) / np.sum(teacher_masks | student_masks)
    assert agreement >= 0.75, agreement


def test_a_wrong_teacher_or_data_is_one_line(phantom_dataset, tmp_path):
    _, prepared = phantom_dataset
    run = str(tmp_path / "run")
    for args, said in ((["no-such-model", prepared, run], "not a model folder"),
                       (["ddti", str(tmp_path / "missing"), run],
                        "not a finished preprocess output"),
                       (["ddti", prepared, run, "--unlabelled", str(tmp_path / "nowhere")],
                        "input not found")):
        done = run_cli("distill", *args)
        assert done.returncode == 2, done.stderr
        assert said in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_distill_refuses_a_teacher_that_prepares_frames_otherwise(phantom_dataset, tmp_path):
    """The bundled model prepares 256 px frames, the phantom DATA is 128: the student would
    learn from soft targets of frames the teacher never sees that way."""
    _, prepared = phantom_dataset
    done = run_cli("distill", "ddti", prepared, str(tmp_path / "run"))
    assert done.returncode == 2 and "--size 256" in done.stderr, done.stderr


def test_soft_cross_entropy_is_the_teachers_and_tempers_both():
    import torch

    p = torch.tensor([[[0.1, 0.9]]])
    logit = torch.logit(p)
    matching = torch.stack([torch.zeros_like(logit), logit], dim=1)  # softmax gives p itself
    entropy = float(-(p * p.log() + (1 - p) * (1 - p).log()).mean())
    assert float(losses.soft_cross_entropy(matching, p)) == pytest.approx(entropy, rel=1e-4)
    # any other prediction costs more: its minimum is at the teacher's probabilities
    assert float(losses.soft_cross_entropy(matching * 2, p)) > entropy
    # softened by T: the same logits divided by T against sigmoid(logit(p) / T), times T^2
    soft_p = torch.sigmoid(logit / 2)
    tempered = float(-(soft_p * soft_p.log() + (1 - soft_p) * (1 - soft_p).log()).mean()) * 4
    assert float(losses.soft_cross_entropy(matching, p, 2.0)) == pytest.approx(tempered, rel=1e-4)


def test_distilled_loss_takes_labels_only_where_a_frame_has_one():
    import torch

    torch.manual_seed(0)
    logits = torch.randn(4, 2, 8, 8, requires_grad=True)
    target = torch.randint(0, 2, (4, 8, 8))
    soft = torch.rand(4, 8, 8)
    labelled = torch.tensor([True, False, True, False])
    mixed = losses.distilled("dice-ce", logits, target, None, soft, labelled, 0.5, 1.0)
    expected = 0.5 * losses.supervised("dice-ce", logits[labelled], target[labelled], None) + \
        0.5 * losses.soft_cross_entropy(logits, soft)
    assert float(mixed.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    # a batch without a label: the teacher alone, and every output still gets a gradient
    alone = losses.distilled("dice-ce", logits, target, None, soft, torch.zeros(4, dtype=bool),
                             0.5, 1.0)
    assert float(alone.detach()) == pytest.approx(
        0.5 * float(losses.soft_cross_entropy(logits, soft).detach()))
    alone.backward()
    assert logits.grad is not None


def test_soft_targets_are_warped_with_their_frame():
    """The teacher's map moves with the image and mask, and the draws do not change with it:
    with or without soft targets a batch is augmented alike."""
    rng_seed = 3
    images = np.random.default_rng(0).integers(0, 255, (4, 64, 64), dtype=np.uint8)
    masks = np.zeros((4, 64, 64), np.uint8)
    masks[:, 20:40, 10:30] = 1
    soft = (masks * 255).astype(np.uint8)
    cfg = augment.preset("strong")
    plain = augment.augment_batch(images, masks, None, np.random.default_rng(rng_seed), cfg)
    with_soft = augment.augment_batch(images, masks, None, np.random.default_rng(rng_seed), cfg,
                                      soft=soft)
    assert np.array_equal(plain[0], with_soft[0]) and np.array_equal(plain[1], with_soft[1])
    warped_soft, warped_mask = with_soft[3] >= 128, with_soft[1] > 0
    overlap = np.sum(warped_soft & warped_mask) / max(np.sum(warped_soft | warped_mask), 1)
    assert overlap > 0.9 and not np.array_equal(with_soft[3], soft)


def test_held_out_fold_and_unconfident_frames_stay_out_of_the_students_data():
    import pyarrow as pa

    png = imaging.encode_png(np.zeros((16, 16), np.uint8))
    rows = pa.table({
        "key": ["a", "b", "u0/c", "u0/d", "u0/e"],
        "labelled": [True, True, False, False, False],
        "status": ["ok", "ok", "ok", "ok", "error"],
        "confidence": pa.array([1.0, 1.0, 0.8, 0.2, None], pa.float32()),
        "image": [png] * 4 + [None], "mask": [png] * 4 + [None], "soft": [png] * 4 + [None]})
    kept = distill.decode_taught(rows, False, 16, min_confidence=0.5, held_out=frozenset({"b"}))
    assert kept["labelled"].tolist() == [1, 0] and kept["soft"].shape == (2, 16, 16)
    nothing = distill.decode_taught(rows, True, 16, min_confidence=0.9,
                                    held_out=frozenset({"a", "b"}))
    assert nothing["image"].shape == (0, 16, 16) and nothing["weight"].shape == (0, 16, 16)


@pytest.mark.timeout(600)
def test_cross_validation_never_teaches_a_fold_its_own_frames(phantom_dataset, trained_run,
                                                              tmp_path):
    """--folds 2 over a two-member teacher: fold k's teacher (member k) labels no frame of
    fold k, fold k's student validates on exactly fold k's frames, and cv.json pools both
    folds' validation frames."""
    from raythyroid import model, shards, split

    _, prepared = phantom_dataset
    teacher_run, _ = trained_run
    net, info = model.load(storage.join(teacher_run, "model"))
    ensemble = str(tmp_path / "ensemble")
    # without TTA (its zoomed view goes with it): which frames each member labels is the point
    # here, not how well
    model.save_ensemble([net, net], ensemble,
                        {"prep": info.prep.to_dict(), **info.inference.to_json(), "tta": False})
    run = tmp_path / "cv"
    summary = distill.run(ensemble, prepared, str(run),
                          training.TrainConfig(epochs=1, batch_size=8, base=8),
                          distill.DistillOptions(folds=2), log=lambda *_: None)

    manifest = shards.read_manifest(prepared)
    rows = shards.read_rows(prepared, manifest, ["train", "val"], ["key", "case_id"])
    case_fold = split.folds((r["case_id"] for r in rows), 2, 0)
    for k in range(2):
        own = {r["key"] for r in rows if case_fold[r["case_id"]] == k}
        taught = set(distill.read_taught(str(run / f"fold-{k}" / distill.TAUGHT), ["key"])
                     .column("key").to_pylist())
        assert taught == {r["key"] for r in rows} - own
        history = [json.loads(line) for line in
                   (run / f"fold-{k}" / "history.jsonl").read_text().splitlines()]
        assert history[-1]["val_images"] == len(own) and summary["folds"][k]["fold"] == k
    assert summary["last_pooled"]["images"] == len(rows)
    assert json.loads((run / "cv.json").read_text())["k"] == 2


def test_from_teacher_starts_from_the_member_that_never_saw_the_fold(trained_run, tmp_path):
    """--from-teacher: fold k's student starts from member k's weights exactly (a single model
    is its own member 0, and has no member 1)."""
    import torch

    from raythyroid import model
    from raythyroid.errors import UserError

    teacher_run, _ = trained_run
    net, info = model.load(storage.join(teacher_run, "model"))
    other = model.build(net.config)  # a second, different member
    ensemble = str(tmp_path / "ensemble")
    model.save_ensemble([other, net], ensemble, {"prep": info.prep.to_dict(),
                                                 "tta": info.inference.tta})
    start = distill._member_folder(ensemble, 1, str(tmp_path / "fold-1-init"))
    started, _ = model.load(start)
    for name, value in net.state_dict().items():  # fp16 storage: equal to fp16 precision
        assert torch.allclose(started.state_dict()[name].float(), value.half().float())
    single = distill._member_folder(storage.join(teacher_run, "model"), 0,
                                    str(tmp_path / "single"))
    assert model.load(single)[0].state_dict()["head.weight"].equal(
        net.state_dict()["head.weight"])
    with pytest.raises(UserError, match="not a member 1"):
        distill._member_folder(storage.join(teacher_run, "model"), 1, str(tmp_path / "none"))
