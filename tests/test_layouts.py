import json

import cv2
import pytest

from raythyroid import imaging, layouts
from raythyroid.errors import UserError


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_folders_pairs_by_stem_and_reports_what_cannot_pair(tmp_path):
    for name in ["12_1", "12_2", "7_1", "lonely_image"]:
        touch(tmp_path / "images" / f"{name}.jpg")
    touch(tmp_path / "images" / "12_1.png")  # same key as 12_1.jpg
    for name in ["12_1", "12_2", "7_1", "lonely_mask"]:
        touch(tmp_path / "masks" / f"{name}.png")
    layout, pairs, problems = layouts.scan(str(tmp_path))
    assert layout == "folders"
    assert [(p.key, p.case_id) for p in pairs] == [("12_1", "12"), ("12_2", "12"), ("7_1", "7")]
    reasons = {(p.key, p.reason.split(":")[0]) for p in problems}
    assert reasons == {("12_1", "duplicate key"), ("lonely_image", "no mask for image"),
                       ("lonely_mask", "mask without image")}


def test_ddti_outlines_match_published_masks(ddti):
    layout, pairs, problems = layouts.scan(str(ddti), "ddti")
    assert len(pairs) == 300
    # the sample keeps a subset of frames, so some outlines have no image: reported, not lost
    assert all(p.reason.startswith("outline for frame") for p in problems)
    for pair in pairs:
        published = cv2.imread(str(ddti / "masks" / f"{pair.key}.png"), 0) > 0
        filled = imaging.fill_polygons(json.loads(pair.mask_polygons), *published.shape)
        iou = (filled & published).sum() / (filled | published).sum()
        assert iou >= 0.98, f"{pair.key}: IoU {iou:.3f}"
        assert pair.case_id == pair.key.split("_")[0]


def test_ddti_layout_on_a_native_tree(tmp_path):
    xml = ("<case><number>5</number><mark><image>1</image><svg>"
           + json.dumps([{"points": [{"x": 1, "y": 1}, {"x": 9, "y": 1}, {"x": 9, "y": 9}]},
                         {"points": [{"x": 20, "y": 20}, {"x": 30, "y": 20}, {"x": 30, "y": 30}]}])
           + "</svg></mark><mark><image>2</image><svg>[]</svg></mark></case>")
    touch(tmp_path / "5.xml", xml.encode())
    touch(tmp_path / "5_1.jpg")
    touch(tmp_path / "5_2.jpg")
    touch(tmp_path / "5_3.jpg")
    touch(tmp_path / "broken.xml", b"<case><mark>")
    layout, pairs, problems = layouts.scan(str(tmp_path))
    assert layout == "ddti"
    assert [p.key for p in pairs] == ["5_1", "5_2"]
    assert len(json.loads(pairs[0].mask_polygons)) == 2  # every polygon of the mark
    assert json.loads(pairs[1].mask_polygons) == []  # a frame without nodule is still data
    reasons = sorted(p.reason for p in problems)
    assert reasons[0].startswith("no outline in 5.xml for frame 3")
    assert reasons[1].startswith("unreadable DDTI XML")


def test_tn3k_keeps_its_test_set(tmp_path):
    for part in ("trainval", "test"):
        for i in range(3):
            touch(tmp_path / f"{part}-image" / f"{i:04d}.jpg")
            touch(tmp_path / f"{part}-mask" / f"{i:04d}.jpg")
    layout, pairs, problems = layouts.scan(str(tmp_path))
    assert layout == "tn3k" and not problems
    assert {p.key: p.split for p in pairs} == {
        "trainval/0000": None, "trainval/0001": None, "trainval/0002": None,
        "test/0000": "test", "test/0001": "test", "test/0002": "test"}
    assert all(p.case_id == p.key for p in pairs)


def test_tnscui_follows_train_csv(tmp_path):
    for i in (1, 2, 3):
        touch(tmp_path / "image" / f"{i}.PNG")
        touch(tmp_path / "mask" / f"{i}.PNG")
    (tmp_path / "train.csv").write_text("ID,CATE\n1.PNG,0\n2.PNG,1\n9.PNG,1\n")
    layout, pairs, problems = layouts.scan(str(tmp_path))
    assert layout == "tnscui"
    assert [p.key for p in pairs] == ["1", "2"]
    assert [(p.key, p.reason) for p in problems] == [("9", "listed in train.csv but no image")]


def test_unknown_layout_is_a_user_error(tmp_path):
    touch(tmp_path / "random.txt")
    with pytest.raises(UserError, match="cannot tell the layout"):
        layouts.scan(str(tmp_path))
    with pytest.raises(UserError, match="unknown layout"):
        layouts.scan(str(tmp_path), "coco")
