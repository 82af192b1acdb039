"""update/quantized.py: rows in 8 and 4 bits against numpy, through their bytes and back."""
import numpy as np
import pytest

from lm1b_hvd.update import quantized


def numpy_quantized(rows, bits):
    """The reference: a scale a row (its largest magnitude over the largest level), rounded half
    to even, clipped; what the wire gives back."""
    flat = rows.reshape(len(rows), -1).astype(np.float32)
    scales = (np.abs(flat).max(axis=1) / quantized.LEVELS[bits]).astype(np.float32)
    levels = np.clip(np.round(flat / np.where(scales > 0, scales, 1)[:, None]), -quantized.LEVELS[bits],
                     quantized.LEVELS[bits])
    return levels.astype(np.int8), scales, levels.astype(np.float32) * scales[:, None]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("width", [1, 5, 6])
def test_rows_travel_as_bytes_and_come_back_as_numpy_says(bits, width):
    rng = np.random.default_rng(bits * 10 + width)
    rows = rng.normal(0, 1e-3, (7, width)).astype(np.float32) * rng.uniform(0.01, 100, (7, 1)).astype(np.float32)
    rows[3] = 0.0  # a row that did not change: scale 0, levels 0
    levels, scales = quantized.quantize(rows, bits)
    expected_levels, expected_scales, expected = numpy_quantized(rows, bits)
    np.testing.assert_array_equal(levels.numpy(), expected_levels)
    np.testing.assert_array_equal(scales.numpy(), expected_scales)
    blob = quantized.to_bytes(levels, scales, bits)
    assert blob.dtype.name == "uint8" and blob.shape[0] == 7 * quantized.row_bytes(width, bits)
    back = quantized.dequantize(*quantized.from_bytes(blob, 7, width, bits))
    np.testing.assert_array_equal(back.numpy(), expected)
    # Each value within half a step of its row's scale; the largest of a row kept (to float rounding).
    assert (np.abs(back.numpy() - rows) <= expected_scales[:, None] / 2 + 1e-12).all()
    np.testing.assert_allclose(np.abs(back.numpy()).max(axis=1), np.abs(rows).max(axis=1), rtol=1e-6)
