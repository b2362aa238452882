"""The demo end to end, shortened: phantoms -> preprocess -> train -> infer -> report."""
import pytest

from raythyroid import demo, storage


@pytest.mark.timeout(900)
def test_demo_runs_to_the_end_and_writes_the_report(ray_local, tmp_path):
    lines = []
    # two epochs, not a time limit: the curves need two points however slow the machine is
    result = demo.run(str(tmp_path / "demo"), frames=60, train_minutes=None, epochs=2,
                      log=lines.append)
    text = "\n".join(str(line) for line in lines)
    assert "n_IoU" in text and "demo: done" in text
    assert set(result["metrics"]) >= {"n_iou", "n_iou_per_image", "hist"}
    assert result["metrics"]["images"] > 0
    assert result["reports"]["infer"] in text and result["reports"]["train"] in text
    infer_page = storage.read_text(result["reports"]["infer"])
    assert 'id="review-queue"' in infer_page and "against the labels" in infer_page
    train_page = storage.read_text(result["reports"]["train"])
    assert 'src="curves.png"' in train_page and 'id="worst-validation"' in train_page
    curves = storage.read_bytes(result["reports"]["train"].replace("index.html", "curves.png"))
    assert curves.startswith(b"\x89PNG") and len(curves) > 10_000
    assert [h["epoch"] for h in result["history"]] == [1, 2]
