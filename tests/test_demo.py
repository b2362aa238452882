"""The demo end to end, shortened: phantoms -> preprocess -> train -> infer -> report."""
import pytest

from raythyroid import demo, storage


@pytest.mark.timeout(900)
def test_demo_runs_to_the_end_and_writes_the_report(ray_local, tmp_path):
    lines = []
    result = demo.run(str(tmp_path / "demo"), frames=60, train_minutes=0.6, log=lines.append)
    text = "\n".join(str(line) for line in lines)
    assert "n_IoU" in text and "demo: done" in text
    assert set(result["metrics"]) >= {"n_iou", "n_iou_per_image", "hist"}
    assert result["metrics"]["images"] > 0
    for name in ("overlays.png", "curves.png"):
        data = storage.read_bytes(f"{result['report']}/{name}")
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert len(result["history"]) >= 2
