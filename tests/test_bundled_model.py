"""The model shipped inside the package: `raythyroid infer ddti` right after installation."""
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from raythyroid import imaging, model, postprocess, split

from helpers import run_cli

HELD_OUT_FRAMES = 4


def held_out_frames(ddti) -> list:
    """DDTI frames of the cases the bundled model never trained on: its rebuild script
    (release/ship_ddti.sh) cross-validates on the train and val splits of the default split."""
    images = sorted((ddti / "images").glob("*.jpg"))
    splits = split.assign((p.stem, p.stem.split("_")[0], None) for p in images)
    return [p for p in images if splits[p.stem] == "test"][:HELD_OUT_FRAMES]


def test_the_bundled_model_is_listed_with_its_card(tmp_path, monkeypatch):
    shipped = model.bundled()
    assert "ddti" in shipped
    info = shipped["ddti"]
    assert info.ensemble and info.members == 5
    folder = Path(model.resolve("ddti"))
    written = json.loads((folder / model.MODEL_JSON).read_text())
    assert folder.parent == Path(model.BUNDLED)  # a name, not a path: the package's model
    # a folder of that name holding no model (the user's own data) does not shadow it
    (tmp_path / "ddti" / "images").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert model.resolve("ddti") == str(folder)
    assert model.resolve("./ddti") == "./ddti"  # a path, when written as one
    listed = run_cli("models")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("ddti: ") and info.card["headline"] in listed.stdout
    # and the network --fast runs, with its own headline
    assert f"--fast: {written['fast']['card']['headline']}" in listed.stdout
    assert sum((folder / name).stat().st_size
               for name in written["members"] + [written["fast"]["weights"]]) < 40e6
    card = (folder / model.CARD).read_text()
    assert "5-fold" in card and "research use" in card.lower()


@pytest.mark.timeout(600)
def test_infer_ddti_segments_held_out_frames(ray_local, ddti, tmp_path):
    frames = held_out_frames(ddti)
    assert len(frames) == HELD_OUT_FRAMES
    listing = tmp_path / "frames.txt"
    listing.write_text("".join(f"{p}\n" for p in frames))
    outputs = {}
    # one forward batch of the frames there are (the Predictor pads every batch to its size:
    # at the default 16, four frames would cost the ensemble's 20 passes over 16)
    batch = ["--batch-size", str(HELD_OUT_FRAMES)]
    for name, extra in (("ensemble", []), ("fast", ["--fast"])):
        out = tmp_path / name
        done = run_cli("infer", "ddti", str(listing), str(out), "--labels", str(ddti / "masks"),
                       *batch, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[name] = out
    for frame in frames:
        image = cv2.imread(str(frame), cv2.IMREAD_GRAYSCALE)
        masks = {name: cv2.imread(str(out / "masks" / f"{frame.stem}.png"),
                                  cv2.IMREAD_GRAYSCALE) > 0 for name, out in outputs.items()}
        for mask in masks.values():
            assert mask.shape == image.shape  # the original frame's geometry
            assert mask.any(), frame.stem  # every DDTI frame shows a nodule
        # the one-pass network finds the same nodule as the whole ensemble
        both = masks["ensemble"] & masks["fast"]
        assert both.sum() / (masks["ensemble"] | masks["fast"]).sum() > 0.5, frame.stem
    # (two frames: each costs the ensemble twice over, 40 passes, in this process)
    assert _masks_follow_the_chosen_tta(frames[:2], outputs["ensemble"])
    # --fast runs the network distilled from the ensemble that ships beside it (model.json's
    # `fast`), not the first member: its masks, and the job's record of the weights that ran
    folder = Path(model.resolve("ddti"))
    student, student_info = model.load(str(folder), fast=True)
    first, first_info = model.load(str(folder), first_member_only=True)
    shipped = json.loads((folder / model.MODEL_JSON).read_text())["fast"]
    assert student_info.weights_sha256 == hashlib.sha256(
        (folder / shipped["weights"]).read_bytes()).hexdigest() != first_info.weights_sha256
    assert student_info.inference.post.threshold == shipped["threshold"]
    job = json.loads((outputs["fast"] / "_JOB.json").read_text())
    assert job["weights"] == student_info.weights_sha256[:16]
    assert (_misses(frames[:2], outputs["fast"], student, student_info, zoom=None)
            < _misses(frames[:2], outputs["fast"], first, first_info, zoom=None))
    metrics = json.loads((outputs["ensemble"] / "metrics.json").read_text())
    # a floor for plausibility, not the model's accuracy (CV and the model card measure that)
    assert metrics["images"] == HELD_OUT_FRAMES and metrics["n_iou"] > 0.3
    # the job remembers which weights ran: a rerun with the other flag cannot mix them
    again = run_cli("infer", "ddti", str(listing), str(outputs["fast"]),
                    "--labels", str(ddti / "masks"), *batch)
    assert again.returncode == 2 and "holds the results of another job" in again.stderr


def test_the_shipped_build_is_a_baseline_later_builds_compare_against(tmp_path):
    """model.json keeps each fold's figures (release/ship_card.py), so release/cv_compare.py judges
    a candidate against the shipped build without its workdir: the figures agree with the
    card's own cross-validation summary; a candidate's folds pair with the shipped ones, each
    change is the candidate's figure less the shipped one, and a candidate whose folds hold
    other frames is refused."""
    import copy
    import json
    import statistics
    import subprocess
    import sys

    card = model.bundled()["ddti"].card
    folds = card["folds"]
    assert [f["fold"] for f in folds] == list(range(5))
    assert len(card["test_members"]) == 5
    last = [f["last"]["n_iou"] for f in folds]
    # the per-fold figures are the ones the summary was made of (4 decimals kept)
    assert abs(statistics.fmean(last) - card["cv"]["last_n_iou_mean"]) < 1e-4
    assert abs(statistics.pstdev(last) - card["cv"]["last_n_iou_std"]) < 1e-4
    root = Path(__file__).resolve().parents[1]
    shipped = json.loads((Path(model.resolve("ddti")) / model.MODEL_JSON).read_text())
    shifts = [0.0125, -0.02, 0.0, 0.0031, -0.0007]
    candidate = copy.deepcopy(shipped)
    for fold, shift in zip(candidate["card"]["folds"], shifts):
        fold["last"]["n_iou"] += shift
    other_frames = copy.deepcopy(shipped)
    other_frames["card"]["folds"][2]["val_images"] += 1

    def compare(meta: dict, name: str) -> subprocess.CompletedProcess:
        folder = tmp_path / name
        folder.mkdir()
        (folder / model.MODEL_JSON).write_text(json.dumps(meta))
        return subprocess.run([sys.executable, str(root / "release" / "cv_compare.py"), "ddti",
                               str(folder), "--names", "shipped", name],
                              capture_output=True, text=True, timeout=120)

    compared = compare(candidate, "candidate")
    assert compared.returncode == 0, compared.stderr
    rows = [line for line in compared.stdout.splitlines() if line.startswith("| ")]
    changes = [row.split("|")[5].strip() for row in rows if row.split("|")[1].strip().isdigit()]
    assert changes == [f"{s:+.4f}" for s in shifts]
    assert any("ensemble of the 5" in row for row in rows)  # the test split's table too
    refused = compare(other_frames, "other-frames")
    assert refused.returncode != 0 and "do not pair" in refused.stderr


def test_fast_runs_the_network_a_model_ships_for_it_else_the_first_member(tmp_path):
    """--fast's view of a model folder (modelinfo.one_pass): where the model ships a one-pass
    network (model.json's `fast`), its weights, post-processing, architecture and card, with
    the model's preparation; else an ensemble's first member with the ensemble's
    post-processing, as before. Never TTA, never the other members."""
    import hashlib

    from raythyroid import modelinfo

    ensemble = {"prep": {"size": 128}, "classes": ["background", "nodule"], "threshold": 0.5,
                "tta": True, "tta_zoom": 0.8, "postprocess": {"keep_largest": 2},
                "members": ["member-0.pt", "member-1.pt"], "card": {"headline": "ensemble"},
                "architecture": {"base": 16}, "format": modelinfo.MODEL_FORMAT}
    student = {"weights": "fast.pt", "architecture": {"base": 8}, "threshold": 0.4,
               "postprocess": {"keep_largest": 1}, "card": {"headline": "student"}}
    for name, meta in (("plain", ensemble), ("shipped", dict(ensemble, fast=student))):
        folder = tmp_path / name
        folder.mkdir()
        (folder / modelinfo.MODEL_JSON).write_text(json.dumps(meta))
        for weights in ("member-0.pt", "member-1.pt", "fast.pt"):
            (folder / weights).write_bytes(weights.encode())
    first = modelinfo.read_info(str(tmp_path / "plain"), fast=True)
    assert first.weights_sha256 == hashlib.sha256(b"member-0.pt").hexdigest()
    assert (first.inference.post.threshold, first.inference.post.keep_largest) == (0.5, 2)
    assert not first.inference.tta and first.members == 1 and first.architecture.base == 16
    assert first.card["headline"] == "ensemble"
    shipped = modelinfo.read_info(str(tmp_path / "shipped"), fast=True)
    assert shipped.weights_sha256 == hashlib.sha256(b"fast.pt").hexdigest()
    assert (shipped.inference.post.threshold, shipped.inference.post.keep_largest) == (0.4, 1)
    assert not shipped.inference.tta and shipped.members == 1 and shipped.architecture.base == 8
    assert shipped.card["headline"] == "student" and shipped.prep.size == 128
    # without --fast the ensemble is the ensemble; --init's first member is still member 0
    whole = modelinfo.read_info(str(tmp_path / "shipped"))
    assert whole.members == 2 and whole.inference.tta and whole.fast == student
    assert modelinfo.read_folder(str(tmp_path / "shipped"), first_member_only=True
                                 )[0].weights_sha256 == first.weights_sha256


def test_the_card_and_model_json_render_from_the_recorded_figures(tmp_path):
    """CARD.md and model.json are what release/ship_card.py renders from the figures recorded
    beside them (card-figures.json), byte for byte: a figure changes in the record and both
    are rendered again, never edited by hand."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    folder = Path(model.resolve("ddti"))
    figures = json.loads((folder / "card-figures.json").read_text())
    # the record describes the weights that ship
    written = json.loads((folder / model.MODEL_JSON).read_text())
    assert figures["member_bytes"] == sum((folder / n).stat().st_size
                                          for n in written["members"])
    student = (folder / written["fast"]["weights"]).read_bytes()
    assert figures["student"]["bytes"] == len(student)
    assert all(student != (folder / n).read_bytes() for n in written["members"])
    shutil.copy(folder / "card-figures.json", tmp_path)
    done = subprocess.run([sys.executable, str(root / "release" / "ship_card.py"), "--render",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    differ = [name for name in (model.CARD, model.MODEL_JSON)
              if (tmp_path / name).read_bytes() != (folder / name).read_bytes()]
    assert not differ, (f"{differ} not what release/ship_card.py renders from card-figures.json: "
                        f"python release/ship_card.py --render raythyroid/models/ddti")


def _masks_follow_the_chosen_tta(frames: list, out: Path) -> bool:
    """infer's masks are the ensemble's with the TTA its model.json chose (the zoomed-out view
    included): they match a direct computation with it better than one without it."""
    net, info = model.load(model.resolve("ddti"))
    assert info.inference.tta and info.inference.tta_zoom > 0
    return (_misses(frames, out, net, info, zoom=info.inference.tta_zoom)
            < _misses(frames, out, net, info, zoom=0.0))


def _misses(frames: list, out: Path, net, info, zoom: float | None) -> int:
    """Pixels where infer's masks in OUT differ from `net`'s own, computed directly with
    `info`'s preparation and post-processing: with the mirror image and a zoomed-out view of
    `zoom` (0: the mirror alone), or one pass (None)."""
    import torch

    cpu = torch.device("cpu")
    misses = 0
    for frame in frames:
        decoded = imaging.open_frames(frame.read_bytes(), 10 ** 8).frame(0)  # as infer reads it
        image, geometry = imaging.prepare(decoded, info.prep)
        made = cv2.imread(str(out / "masks" / f"{frame.stem}.png"), cv2.IMREAD_GRAYSCALE) > 0
        prob = model.nodule_probability(net, torch.from_numpy(image[None]), cpu,
                                        model.resolve_bf16("auto", cpu), zoom is not None,
                                        zoom or 0.0)
        mask = postprocess.clean_mask(geometry.restore(prob[0].numpy().astype(np.float16)),
                                      info.inference.post)
        misses += int((mask != made).sum())
    return misses
