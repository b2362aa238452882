import numpy as np

from raythyroid import phantom


def test_phantoms_are_deterministic_per_seed():
    a = list(phantom.generate(6, seed=7))
    b = list(phantom.generate(6, seed=7))
    c = list(phantom.generate(6, seed=8))
    assert [f.key for f in a] == [f.key for f in b]
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
               for x, y in zip(a, b))
    assert not np.array_equal(a[0].image, c[0].image)


def test_phantoms_look_like_scanner_frames():
    frames = list(phantom.generate(30, seed=1, height=240, width=320))
    assert len(frames) == 30
    assert len({f.case_id for f in frames}) < 30  # several frames per case
    for frame in frames:
        mask = frame.mask > 0
        gray = frame.image.mean(axis=2)
        x, y, w, h = frame.scan_box
        assert 0.003 < mask.mean() < 0.4
        inside_scan = np.zeros_like(mask)
        inside_scan[y:y + h, x:x + w] = True
        assert not (mask & ~inside_scan).any()
        tissue = inside_scan & ~mask
        assert gray[mask].mean() < 0.8 * gray[tissue].mean()  # hypoechoic nodule
        assert (gray[~inside_scan] > 200).any()  # burned-in text outside the scan region
    assert any((f.image[:, :, 0] != f.image[:, :, 2]).any() for f in frames)  # some calipers
