"""The one preprocessing function: every caller's uint8 square is ``to_square_u8``'s."""

from __future__ import annotations

import numpy as np
from conftest import EXAMPLES

from tumor_xai.data import Sample, decode_samples
from tumor_xai.decode import load_image
from tumor_xai.preprocess import PreprocessConfig, fit_square, prepare, quantize, to_square_u8


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
