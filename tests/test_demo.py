"""The demo end to end, shortened: phantoms -> preprocess -> train -> infer -> report."""
import cv2
import numpy as np
import pytest

from raythyroid import demo, figures, storage

# matplotlib's tab: colours the curves are drawn in (RGB)
LOSS, VALIDATION = (214, 39, 40), (44, 160, 44)


def drawn(png: bytes, rgb: tuple[int, int, int]) -> int:
    """Pixels of a PNG in (nearly) this colour: a plotted line's."""
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    return int(np.sum(np.abs(image.astype(int) - rgb).max(axis=2) <= 12))


def test_the_curves_draw_what_the_history_holds():
    """Loss and validation lines where the history has them, none where it has not."""
    both = figures.curves([{"epoch": e, "train_loss": 1 / e, "val_n_iou": 0.2 * e}
                           for e in (1, 2, 3)])
    loss_only = figures.curves([{"epoch": e, "train_loss": 1 / e} for e in (1, 2, 3)])
    assert drawn(both, LOSS) > 200 and drawn(both, VALIDATION) > 200
    assert drawn(loss_only, LOSS) > 200 and drawn(loss_only, VALIDATION) == 0


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
    # the two epochs' loss and validation n_IoU are drawn, not an empty frame
    assert drawn(curves, LOSS) > 200 and drawn(curves, VALIDATION) > 200
    assert [h["epoch"] for h in result["history"]] == [1, 2]
