"""The imagecodecs decoder plugin for pydicom: JPEG lossless (process 14) and 12-bit JPEG
extended, which pydicom's permissive plugins lack. pylibjpeg-libjpeg would cover both too, but
it is GPL-3.0.
"""
from __future__ import annotations

import numpy as np

_JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
_JPEG_LOSSLESS = ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70")

# pydicom loads plugins by module path: `is_available`, DECODER_DEPENDENCIES and the decode
# function live at module level here.

DECODER_DEPENDENCIES = {uid: ("numpy", "imagecodecs") for uid in (_JPEG_EXTENDED,) + _JPEG_LOSSLESS}


def is_available(uid: str) -> bool:
    try:
        import imagecodecs
    except ImportError:
        return False
    if uid in _JPEG_LOSSLESS:
        return bool(imagecodecs.LJPEG.available or imagecodecs.JPEG8.available)
    return uid == _JPEG_EXTENDED and bool(imagecodecs.JPEG8.available)


def decode_jpeg_frame(src: bytes, runner) -> bytes:
    """One JPEG frame (lossless or 12-bit extended) -> pixel bytes in the stored colour space.

    The codec never converts colour: it returns samples as stored, so pydicom's single YBR ->
    RGB step (driven by the DICOM photometric interpretation) is the only one.
    """
    import imagecodecs

    if runner.transfer_syntax in _JPEG_LOSSLESS:
        try:
            arr = imagecodecs.ljpeg_decode(src)
        except Exception:  # liblj92 takes SV1 and most predictors; libjpeg-turbo takes the rest
            arr = _jpeg8(src, runner)
    else:
        arr = _jpeg8(src, runner)
    dtype = np.uint8 if runner.bits_allocated <= 8 else np.uint16
    return np.ascontiguousarray(arr.astype(dtype, copy=False)).tobytes()


def _jpeg8(src: bytes, runner):
    import imagecodecs

    if runner.samples_per_pixel == 1:
        return imagecodecs.jpeg8_decode(src)
    return imagecodecs.jpeg8_decode(src, colorspace="RGB", outcolorspace="RGB")


def _register_plugins() -> None:
    from pydicom.pixels.decoders import base

    for decoder in (base.JPEGExtended12BitDecoder, base.JPEGLosslessDecoder,
                    base.JPEGLosslessSV1Decoder):
        if "imagecodecs" not in decoder._available and "imagecodecs" not in decoder._unavailable:
            decoder.add_plugin("imagecodecs", (__name__, "decode_jpeg_frame"))


_registered = False


def register() -> None:
    """Add the plugin to pydicom's decoders, once per process."""
    global _registered
    if _registered:
        return
    try:
        _register_plugins()
    except Exception:  # pragma: no cover - an older pydicom: the syntax check reports it per file
        pass
    _registered = True


def decoder(syntax):
    """pydicom's decoder for a transfer syntax, with the plugin added. Registered here, on the
    way to every decode, rather than on import: importing pydicom costs a quarter of a CPU
    second, and most processes that import the readers (every Ray worker that prepares an
    image, every CLI command) never open a DICOM file."""
    from pydicom.pixels import get_decoder

    register()
    return get_decoder(syntax)
