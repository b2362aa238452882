import json

import numpy as np
import pytest

from raythyroid import metrics, split
from raythyroid.errors import UserError


def test_duplicates_keep_the_first_key_in_natural_order():
    records = [("150_1", "h1"), ("233_2", "h1"), ("1_10", "h2"), ("1_2", "h2"), ("9_1", "h3")]
    assert split.find_duplicates(records) == {"233_2": "150_1", "1_10": "1_2"}


def test_split_by_case_is_exact_deterministic_and_seeded():
    rows = [(f"{case}_{frame}", str(case), None) for case in range(200) for frame in range(1, 4)]
    first = split.assign(rows, (0.7, 0.2, 0.1), seed=0)
    assert first == split.assign(list(reversed(rows)), (0.7, 0.2, 0.1), seed=0)
    case_splits = {}
    for key, case, _ in rows:
        case_splits.setdefault(case, set()).add(first[key])
    assert all(len(s) == 1 for s in case_splits.values())
    by_split = [sum(1 for s in case_splits.values() if s == {name}) for name in split.SPLITS]
    assert by_split == [140, 40, 20]
    assert first != split.assign(rows, (0.7, 0.2, 0.1), seed=1)


def test_small_sets_still_fill_every_split_and_fixed_splits_bind_cases():
    rows = [(str(i), str(i), None) for i in range(4)]
    assert sorted(split.assign(rows).values()) == ["test", "train", "train", "val"]
    rows = [("a", "a", "test"), ("b", "b", None), ("c", "c", None), ("d", "d", None)]
    result = split.assign(rows)
    assert result["a"] == "test"
    assert sorted(result[k] for k in "bcd") == ["train", "train", "val"]


@pytest.mark.parametrize("text", ["0.7,0.2", "0.5,0.5,0.5", "a,b,c", "0,0.5,0.5"])
def test_bad_split_fractions(text):
    with pytest.raises(UserError):
        split.parse_fractions(text)


def paper_scores(hist):
    """The paper's formulas, written out directly on the histogram."""
    diag = np.diag(hist).astype(float)
    iou = diag / (hist.sum(1) + hist.sum(0) - diag)
    precision = diag / hist.sum(0)
    recall = diag / hist.sum(1)
    f1 = 2 * precision * recall / (precision + recall)
    return {"b_iou": iou[0], "n_iou": iou[1], "miou": iou.mean(), "pa": diag.sum() / hist.sum(),
            "precision": precision[1], "recall": recall[1], "f1": f1[1], "f1_macro": f1.mean(),
            "dice": 2 * diag[1] / (hist.sum(0)[1] + hist.sum(1)[1])}


def test_metrics_equal_direct_numpy_on_random_masks():
    rng = np.random.default_rng(42)
    labels = rng.random((20, 64, 64)) < rng.uniform(0.05, 0.4, (20, 1, 1))
    preds = labels ^ (rng.random((20, 64, 64)) < 0.1)
    labels[3] = False  # an image without nodule does not count in the per-image mean
    direct_hist = np.zeros((2, 2), np.int64)
    for label, pred in zip(labels, preds):
        for i in (0, 1):
            for j in (0, 1):
                direct_hist[i, j] += np.sum((label == i) & (pred == j))
    per_image = [metrics.counts(label, pred) for label, pred in zip(labels, preds)]
    result = metrics.summarize(*[[c[k] for c in per_image] for k in ("tp", "fp", "fn", "tn")],
                               errors=2)
    assert result["hist"] == direct_hist.tolist()
    for key, value in paper_scores(direct_hist).items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    with_nodule = [i for i in range(20) if labels[i].any()]
    expected = np.mean([np.sum(labels[i] & preds[i]) / np.sum(labels[i] | preds[i])
                        for i in with_nodule])
    assert result["n_iou_per_image"] == pytest.approx(expected)
    assert result["images"] == 20 and result["errors"] == 2
    assert set(result) == set(metrics.METRIC_KEYS)
    json.dumps(result)  # every value is JSON-ready
    assert "n_IoU" in metrics.table(result)


def test_empty_classes_follow_the_documented_rule():
    nothing = metrics.summarize([0], [0], [0], [100])
    assert nothing["n_iou"] == 1.0 and nothing["precision"] == 1.0 and nothing["recall"] == 1.0
    assert nothing["n_iou_per_image"] is None
    missed = metrics.summarize([0], [0], [10], [90])
    assert missed["n_iou"] == 0.0 and missed["precision"] == 0.0 and missed["recall"] == 0.0
    # no image scored at all is not a perfect score
    none = metrics.summarize([], [], [], [], errors=3)
    assert none["images"] == 0 and none["errors"] == 3
    assert all(none[key] is None for key in metrics.RATIO_KEYS), none
    json.dumps(none)


def test_totals_are_one_record_for_training_infer_and_evaluate():
    """Counting image by image (training's validation), adding two workers' totals through
    their all-reduce vectors, and summing results rows (infer, evaluate) give one answer."""
    rng = np.random.default_rng(3)
    labels = [rng.random((24, 24)) > 0.7 for _ in range(10)]
    labels[4][:] = False  # an image without a nodule
    preds = [rng.random((24, 24)) > 0.6 for _ in range(10)]
    first, second = metrics.Totals(), metrics.Totals()
    rows = []
    for i, (label, pred) in enumerate(zip(labels, preds)):
        rows.append((first if i < 5 else second).add(label, pred))
    reduced = metrics.Totals.from_vector(np.add(first.to_vector(), second.to_vector()))
    from_rows = metrics.summarize(*[[r[k] for r in rows] for k in ("tp", "fp", "fn", "tn")])
    for totals in (reduced, first + second):
        result = totals.metrics()
        assert result.pop("hist") == from_rows["hist"]
        assert result == pytest.approx({k: v for k, v in from_rows.items() if k != "hist"})
    assert reduced.images == 10 and reduced.with_nodule == 9
