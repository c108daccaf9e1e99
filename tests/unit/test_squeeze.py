"""The numpy squeezers against hand-computed arrays, and the squeezer spec."""

import numpy as np
import pytest

from agent.detect.adversarial.squeeze import (
    BitDepth,
    Median,
    NonLocalMeans,
    SqueezerSpecError,
    format_squeezers,
    median_smooth,
    median_window,
    nl_means,
    parse_squeezer,
    parse_squeezers,
    reduce_bit_depth,
)

RAMP_3 = np.arange(1, 10, dtype=np.float32).reshape(3, 3)
RAMP_4 = np.arange(1, 17, dtype=np.float32).reshape(4, 4)


def as_batch(image):
    return np.asarray(image, dtype=np.float32)[None, None]


# --- bit depth --------------------------------------------------------------------------------------


def test_bit_depth_by_hand_and_half_to_even():
    x = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 0.4999, 0.5001], dtype=np.float32)
    # 1 bit: round(x) with halves to even, so 0.5 -> 0.
    assert reduce_bit_depth(x, 1).tolist() == [0, 0, 0, 1, 1, 0, 1]
    # 2 bits: x * 3 = 0, 0.75, 1.5, 2.25, 3 -> 0, 1, 2 (1.5 to even), 2, 3; then / 3.
    got = reduce_bit_depth(x[:5], 2)
    np.testing.assert_array_equal(got, np.array([0, 1, 2, 2, 3], dtype=np.float32) / np.float32(3))
    assert got.dtype == np.float32


def test_bit_depth_keeps_8_bit_images():
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    np.testing.assert_array_equal(reduce_bit_depth(levels, 8), levels)


# --- median ---------------------------------------------------------------------------------------


def test_median_window_placement():
    assert median_window(2) == (1, 0)   # offsets -1 and 0
    assert median_window(3) == (1, 1)
    assert median_window(4) == (2, 1)


def test_median_2x2_on_3x3_by_hand():
    # Window = the pixel, its upper, left and upper-left neighbours (edge pixels repeated outside);
    # the median of 4 is the upper middle value (sorted index 2).
    expected = [[1, 2, 3],
                [4, 4, 5],
                [7, 7, 8]]
    np.testing.assert_array_equal(median_smooth(as_batch(RAMP_3), 2)[0, 0], expected)


def test_median_3x3_on_3x3_by_hand():
    # Edge replication: the corner (0, 0) sees 1,1,1,1,2,2,4,4,5 -> 2.
    expected = [[2, 3, 3],
                [4, 5, 6],
                [7, 7, 8]]
    np.testing.assert_array_equal(median_smooth(as_batch(RAMP_3), 3)[0, 0], expected)


def test_median_2x2_on_4x4_by_hand():
    # Inside, the window's values sort as upper-left < upper < left < pixel (rows step by 4), so the
    # upper middle is the left neighbour; the first row and column stay (they see themselves twice).
    # A lower-middle median would give the upper neighbour, an average something in between.
    expected = [[1, 2, 3, 4],
                [5, 5, 6, 7],
                [9, 9, 10, 11],
                [13, 13, 14, 15]]
    np.testing.assert_array_equal(median_smooth(as_batch(RAMP_4), 2)[0, 0], expected)


def test_median_3x3_on_4x4_by_hand():
    # A linear ramp is its own 3x3 median inside; at the edges the repeated pixels pull it.
    expected = [[2, 3, 4, 4],
                [5, 6, 7, 8],
                [9, 10, 11, 12],
                [13, 13, 14, 15]]
    np.testing.assert_array_equal(median_smooth(as_batch(RAMP_4), 3)[0, 0], expected)


def test_median_removes_an_isolated_speck_per_channel():
    x = np.zeros((2, 3, 5, 5), dtype=np.float32)
    x[1, 2, 2, 2] = 1.0
    x[0, 0] = 0.5
    out = median_smooth(x, 2)
    assert out[1, 2].max() == 0.0
    np.testing.assert_array_equal(out[0, 0], x[0, 0])   # channels do not mix
    assert out.shape == x.shape and out.dtype == np.float32


def test_median_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(3)
    x = rng.random((2, 2, 9, 7)).astype(np.float32)
    ties = rng.integers(0, 3, (2, 2, 9, 7)).astype(np.float32)
    for size in range(2, 7):
        for data in (x, ties):
            expected = ndimage.median_filter(data, size=(1, 1, size, size), mode="reflect")
            np.testing.assert_array_equal(median_smooth(data, size), expected)


# --- non-local means ------------------------------------------------------------------------------


def naive_nl_means(x, search, patch, strength):
    """The definition, pixel by pixel, on one [C, H, W] image."""
    c, height, width = x.shape
    s, p = search // 2, patch // 2
    padded = np.pad(x.astype(np.float64), [(0, 0), (s + p, s + p), (s + p, s + p)], mode="reflect")
    h2 = (strength / 255.0) ** 2
    out = np.zeros_like(x, dtype=np.float64)

    def patch_at(y, x_):  # patch centred on image pixel (y, x_) in padded coordinates
        return padded[:, y + s:y + s + 2 * p + 1, x_ + s:x_ + s + 2 * p + 1]

    for i in range(height):
        for j in range(width):
            total, weights = np.zeros(c), 0.0
            for dy in range(-s, s + 1):
                for dx in range(-s, s + 1):
                    d2 = ((patch_at(i + dy, j + dx) - patch_at(i, j)) ** 2).mean()
                    w = np.exp(-d2 / h2)
                    total += w * padded[:, i + dy + s + p, j + dx + s + p]
                    weights += w
            out[:, i, j] = total / weights
    return out


def test_nl_means_matches_the_definition():
    rng = np.random.default_rng(5)
    x = rng.random((2, 3, 6, 7)).astype(np.float32) * 0.1 + 0.4
    got = nl_means(x, 5, 3, 10.0)
    for n in range(2):
        np.testing.assert_allclose(got[n], naive_nl_means(x[n], 5, 3, 10.0), rtol=0, atol=1e-5)


def test_nl_means_keeps_flat_images_and_smooths_noise():
    flat = np.full((1, 3, 8, 8), 0.3, dtype=np.float32)
    np.testing.assert_allclose(nl_means(flat, 5, 3, 4.0), flat, atol=1e-6)
    rng = np.random.default_rng(0)
    noisy = flat + rng.normal(0, 0.01, flat.shape).astype(np.float32)
    assert np.abs(nl_means(noisy, 5, 3, 8.0) - 0.3).mean() < 0.5 * np.abs(noisy - 0.3).mean()


def test_nl_means_refuses_images_smaller_than_its_windows():
    with pytest.raises(ValueError, match="sidewatch:"):
        nl_means(np.zeros((1, 3, 5, 5), np.float32), 11, 3, 4.0)


# --- the spec -------------------------------------------------------------------------------------


def test_parse_and_format_round_trip():
    squeezers = parse_squeezers(" bit_depth:1, median:2 ,nl_means:11-3-4")
    assert squeezers == (BitDepth(1), Median(2), NonLocalMeans(11, 3, 4.0))
    assert format_squeezers(squeezers) == "bit_depth:1,median:2,nl_means:11-3-4"
    assert parse_squeezers(format_squeezers(squeezers)) == squeezers
    assert parse_squeezers(["median:3", Median(2)]) == (Median(3), Median(2))
    assert parse_squeezer("nl_means:13-3-2.5") == NonLocalMeans(13, 3, 2.5)


@pytest.mark.parametrize("spec, message", [
    ("blur:3", "unknown squeezer 'blur'"),
    ("median", "bad squeezer 'median'"),
    ("median:two", "bad arguments 'two' for squeezer 'median'"),
    ("median:1", "window size from 2 to 9"),
    ("bit_depth:0", "1 to 16 bits"),
    ("bit_depth:1.5", "bad arguments"),
    ("nl_means:11-3", "bad arguments"),
    ("nl_means:10-3-4", "odd and >= 3"),
    ("nl_means:11-2-4", "odd and >= 1"),
    ("nl_means:11-3-0", "must be > 0"),
    ("", "no squeezer given"),
    ("median:2,median:2", "listed twice"),
])
def test_bad_specs_are_refused_clearly(spec, message):
    with pytest.raises(SqueezerSpecError, match=message) as caught:
        parse_squeezers(spec)
    assert str(caught.value).startswith("sidewatch:")
