import cv2
import numpy as np
import torch
import torch.nn as nn

from raythyroid import model, postprocess


class Brightness(nn.Module):
    """A network whose nodule is wherever the frame is bright: its probabilities sit exactly
    where the frame's bright pixels are, so any shift or mirroring in a TTA view shows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), (x - 128) / 8], dim=1)


def _masks_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_the_zoomed_out_view_lands_back_on_the_frame():
    frame = np.zeros((2, 256, 256), np.uint8)
    cv2.ellipse(frame[0], (70, 90), (40, 22), 30, 0, 360, 255, -1)  # off centre, not mirrored
    cv2.rectangle(frame[1], (150, 20), (230, 60), 255, -1)
    images, cpu, net = torch.from_numpy(frame), torch.device("cpu"), Brightness()
    plain = model.nodule_probability(net, images, cpu).numpy()
    zoomed = model.zoomed_out_probability(net, images, cpu, model.TTA_ZOOM, flip_tta=True).numpy()
    for own, back in zip(plain >= 0.5, zoomed >= 0.5):
        assert own.sum() > 1000 and _masks_iou(own, back) > 0.97  # 3 px off: < 0.93
    both = model.nodule_probability(net, images, cpu, flip_tta=True, zoom=model.TTA_ZOOM).numpy()
    assert np.allclose(both, (plain + zoomed) / 2, atol=1e-5)  # this net is mirror-symmetric
    wide = torch.from_numpy(np.ascontiguousarray(frame[0][:192, :]))[None]  # height != width
    own = model.nodule_probability(net, wide, cpu).numpy()[0] >= 0.5
    back = model.zoomed_out_probability(net, wide, cpu, model.TTA_ZOOM).numpy()[0] >= 0.5
    assert back.shape == (192, 256) and _masks_iou(own, back) > 0.97


def test_the_inference_is_what_the_model_chose_and_older_files_read_as_they_meant():
    def read(meta: dict) -> model.Inference:
        return model.Inference.from_json(meta)

    assert read({"tta": True, "tta_zoom": 0.8}).tta_zoom == 0.8
    assert read({"tta": False, "tta_zoom": 0.8}).tta_zoom == 0.0  # the zoom is part of TTA
    assert read({"tta": True}).tta_zoom == 0.0  # a model.json from before the zoomed view
    # from before post-processing was chosen: the threshold alone, the rest as defaults
    older = read({"threshold": 0.6})
    assert older.post == postprocess.PostConfig(threshold=0.6) and not older.tta
    chosen = read({"tta": True, "tta_zoom": 0.8, "threshold": 0.7,
                   "postprocess": {"keep_largest": 2}})
    assert read(chosen.to_json()) == chosen  # what model.json keeps reads back the same
    assert model.describe_tta(True, 0.8) == "flip + zoom 0.8"
