"""The one preprocessing function: every caller's uint8 square is ``to_square_u8``'s."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import EXAMPLES

from tumor_xai.data import Sample, decode_samples
from tumor_xai.decode import load_image
from tumor_xai.preprocess import PreprocessConfig, blank_frame, fit_square, prepare, quantize, to_square_u8


def test_to_square_u8_is_fit_square_then_quantize_and_training_decodes_the_same():
    cfg = PreprocessConfig(input_size=64)
    path = EXAMPLES / "glioma_1.jpg"
    gray = load_image(path).gray[:, 20:]  # not square: padding is part of the path
    square, geometry = to_square_u8(gray, cfg)
    assert square.dtype == np.uint8 and square.shape == (64, 64)
    np.testing.assert_array_equal(square, quantize(fit_square(gray, 64)[0]))
    assert geometry == fit_square(gray, 64)[1]
    decoded = decode_samples([Sample(path, 0)], cfg, workers=1)
    np.testing.assert_array_equal(decoded.images[0], to_square_u8(load_image(path).gray, cfg)[0])
    np.testing.assert_array_equal(decode_samples([Sample(path, 0)], 64, workers=1).images, decoded.images)
    x, _ = prepare(gray, cfg)
    assert x.shape == (1, 1, 64, 64)


def _head(h: int = 120, w: int = 100) -> np.ndarray:
    """A bright ellipse (the head) on a black background."""
    yy, xx = np.mgrid[:h, :w]
    return (((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2 < 1).astype(np.float32) * 0.8


def test_a_thin_bright_frame_is_blanked_and_nothing_else():
    head = _head()
    framed = head.copy()
    framed[0, :] = framed[-2:, :] = framed[:, 0] = 1.0  # a line on top and left, two at the bottom
    out = blank_frame(framed)
    np.testing.assert_array_equal(out, head)
    assert framed[0, 5] == 1.0  # the input is left alone
    assert blank_frame(head) is head  # no frame, no copy


@pytest.mark.parametrize("edge", ["head reaching the edge", "bright band without background inside"])
def test_what_is_not_a_frame_stays(edge):
    gray = _head()
    if edge == "head reaching the edge":
        gray = np.pad(gray[15:-15], ((0, 0), (0, 0)))  # the crop cuts the head at top and bottom
        gray[0, 20:80] = 0.9
    else:
        gray[:6, :] = 1.0  # deeper than the outer 3 %: a bright region, not a frame line
    np.testing.assert_array_equal(blank_frame(gray), gray)


def test_every_path_blanks_the_frame():
    framed = _head(100, 100)
    framed[:, -1] = 1.0
    for cfg in (PreprocessConfig(input_size=50), PreprocessConfig(input_size=50, version=1)):
        np.testing.assert_array_equal(to_square_u8(framed, cfg)[0], to_square_u8(_head(100, 100), cfg)[0])
    # Weights that predate the version field were fitted on unblanked pixels, and say so.
    assert PreprocessConfig.from_dict({"input_size": 60}).version == 1
    assert PreprocessConfig.from_dict(PreprocessConfig().to_dict()) == PreprocessConfig()
