"""Feature squeezers in numpy, and the typed spec that names them (``bit_depth:1``, ``median:2``, ...).

Feature squeezing (Xu, Evans and Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep
Neural Networks", NDSS 2018) runs a model on an input and on "squeezed" copies of it: copies with
less colour depth, or smoothed. A benign input gives about the same softmax either way; an
adversarial perturbation, tuned to the exact pixels, mostly does not survive the squeeze. The score
is the largest L1 distance between the softmax on the input and on any squeezed copy
(``agent.detect.adversarial.graph`` computes it in one ONNX graph).

The functions here are the reference implementation: plain numpy on float arrays whose last two
axes are height and width (``[N, C, H, W]``, images in [0, 1]). The fused ONNX graph must give the
same numbers, and the tests hold it to that.

>>> import numpy as np
>>> squeezers = parse_squeezers("bit_depth:1,median:2")
>>> [str(s) for s in squeezers]
['bit_depth:1', 'median:2']
>>> squeezers[0](np.array([0.2, 0.5, 0.51, 0.9], dtype=np.float32)).tolist()
[0.0, 0.0, 1.0, 1.0]
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

MAX_BITS = 16
MEDIAN_SIZES = range(2, 10)


class SqueezerSpecError(ValueError):
    """A squeezer spec that does not parse, or names values out of range."""


# --- the squeezers, as functions ----------------------------------------------------------------


def reduce_bit_depth(x: np.ndarray, bits: int) -> np.ndarray:
    """Quantise values in [0, 1] to ``2**bits`` levels: ``round(x * (2**bits - 1)) / (2**bits - 1)``.

    np.round rounds half to even, as ONNX ``Round`` does, so the fused graph gives the same bits.
    The arithmetic stays in float32 (the constant is a float32) for the same reason. Values are
    not clipped: the paper's squeezer does not clip, and the model is fed [0, 1] inputs anyway.
    """
    x = np.asarray(x, dtype=np.float32)
    levels = np.float32(2**bits - 1)
    return np.round(x * levels) / levels


def median_window(size: int) -> tuple[int, int]:
    """Rows (or columns) of a ``size`` window before and after the pixel: ``(size // 2, size - 1 - size // 2)``.

    This is scipy.ndimage's placement (origin 0): the window's centre index is ``size // 2``.
    For odd sizes the window is centred; for even sizes it leans back, so a 2 x 2 window covers
    offsets -1 and 0 in each direction: the pixel, its upper and left neighbours and the upper-left one.
    """
    return size // 2, size - 1 - size // 2


def median_smooth(x: np.ndarray, size: int) -> np.ndarray:
    """Median over a ``size`` x ``size`` window around each pixel, per image and per channel.

    Same semantics as ``scipy.ndimage.median_filter(x, size=(1, ..., 1, size, size), mode='reflect')``
    (Xu et al.'s code used it; scipy is not needed here):

    - the window is placed as in :func:`median_window` (for 2 x 2: offsets [-1, 0]);
    - outside the image the values are mirrored with the edge pixel repeated (scipy's 'reflect',
      numpy's 'symmetric': ``c b a | a b c | c b a``). Sizes 2 and 3 pad by one pixel, where this is
      simply the edge pixel repeated;
    - for an even number of values (``size * size`` even) the median is the upper middle one:
      with the window's values sorted ascending, the one at index ``size * size // 2``
      (scipy's rank filter at rank ``size * size // 2``), never an average of the two middle ones.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"sidewatch: median smoothing needs [..., H, W] arrays, got shape {x.shape}")
    before, after = median_window(size)
    pad = [(0, 0)] * (x.ndim - 2) + [(before, after), (before, after)]
    padded = np.pad(x, pad, mode="symmetric")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(-2, -1))
    windows = windows.reshape(*x.shape, size * size)
    rank = size * size // 2
    return np.partition(windows, rank, axis=-1)[..., rank]


def nl_means(x: np.ndarray, search: int, patch: int, strength: float) -> np.ndarray:
    """Non-local means denoising (Buades, Coll and Morel 2005), the paper's squeezer for colour images.

    ``x`` is ``[N, C, H, W]`` in [0, 1]. Each pixel becomes the weighted mean of the pixels in the
    ``search`` x ``search`` window around it; a pixel ``q`` weighs ``exp(-d2 / h**2)``, where ``d2`` is
    the mean, over the ``patch`` x ``patch`` patch and over the channels, of the squared differences
    between the patch around ``q`` and the patch around the pixel, and ``h = strength / 255``
    (strength is given in 8-bit grey levels, as in Xu et al.'s ``11-3-4``: search 11, patch 3, h 4).
    Outside the image, values are mirrored without repeating the edge (numpy's 'reflect', OpenCV's
    default border), so ``search // 2 + patch // 2`` must be smaller than H and W.

    Xu et al. called OpenCV's fastNlMeansDenoisingColored, which also converts to CIELAB and uses
    integer look-up tables; this is the plain algorithm on the given channels, so it is close to,
    not bit-identical with, OpenCV. Cost: ``search**2`` passes over the batch.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"sidewatch: non-local means needs [N, C, H, W] arrays, got shape {x.shape}")
    _, _, height, width = x.shape
    s, p = search // 2, patch // 2
    if s + p >= min(height, width):
        raise ValueError(f"sidewatch: nl_means:{search}-{patch}-... needs images larger than "
                         f"{s + p} pixels, got {height} x {width}")
    inv_h2 = np.float32((255.0 / strength) ** 2)
    margin = s + p
    padded = np.pad(x, [(0, 0), (0, 0), (margin, margin), (margin, margin)], mode="reflect")
    # The image with a margin of p: every patch centred in the image lies inside it.
    centre = padded[:, :, s:s + height + 2 * p, s:s + width + 2 * p]
    numerator = np.zeros_like(x)
    denominator = np.zeros((x.shape[0], 1, height, width), dtype=np.float32)
    for dy in range(2 * s + 1):
        for dx in range(2 * s + 1):
            shifted = padded[:, :, dy:dy + height + 2 * p, dx:dx + width + 2 * p]
            squared = ((shifted - centre) ** 2).mean(axis=1, keepdims=True)
            d2 = np.lib.stride_tricks.sliding_window_view(squared, (patch, patch), axis=(-2, -1)).mean(axis=(-2, -1))
            weight = np.exp(-d2 * inv_h2)
            numerator += weight * shifted[:, :, p:p + height, p:p + width]
            denominator += weight
    return numerator / denominator


# --- the typed spec -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BitDepth:
    """Bit-depth reduction to ``bits`` bits; spec ``bit_depth:BITS``."""

    bits: int
    kind: ClassVar[str] = "bit_depth"

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= MAX_BITS:
            raise SqueezerSpecError(f"sidewatch: bit_depth needs 1 to {MAX_BITS} bits, got {self.bits}")

    def __str__(self) -> str:
        return f"bit_depth:{self.bits}"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return reduce_bit_depth(x, self.bits)


@dataclass(frozen=True)
class Median:
    """Median smoothing over a ``size`` x ``size`` window; spec ``median:SIZE``."""

    size: int
    kind: ClassVar[str] = "median"

    def __post_init__(self) -> None:
        if self.size not in MEDIAN_SIZES:
            raise SqueezerSpecError(
                f"sidewatch: median needs a window size from {MEDIAN_SIZES.start} to {MEDIAN_SIZES.stop - 1}, "
                f"got {self.size}")

    def __str__(self) -> str:
        return f"median:{self.size}"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return median_smooth(x, self.size)


@dataclass(frozen=True)
class NonLocalMeans:
    """Non-local means with a search window, a patch size and a strength h; spec ``nl_means:SEARCH-PATCH-H``."""

    search: int
    patch: int
    strength: float
    kind: ClassVar[str] = "nl_means"

    def __post_init__(self) -> None:
        # Odd windows have a centre pixel; OpenCV asks for odd sizes too.
        if self.search < 3 or self.search % 2 == 0:
            raise SqueezerSpecError(f"sidewatch: nl_means search window must be odd and >= 3, got {self.search}")
        if self.patch < 1 or self.patch % 2 == 0:
            raise SqueezerSpecError(f"sidewatch: nl_means patch size must be odd and >= 1, got {self.patch}")
        if not self.strength > 0:
            raise SqueezerSpecError(f"sidewatch: nl_means strength h must be > 0, got {self.strength}")

    def __str__(self) -> str:
        return f"nl_means:{self.search}-{self.patch}-{self.strength:g}"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return nl_means(x, self.search, self.patch, self.strength)


Squeezer = BitDepth | Median | NonLocalMeans

_SPEC_HELP = ("expected bit_depth:BITS (e.g. bit_depth:1), median:SIZE (e.g. median:2) "
              "or nl_means:SEARCH-PATCH-H (e.g. nl_means:11-3-4)")
_INT = r"\d+"
_NUMBER = r"\d+(?:\.\d*)?|\.\d+"


def parse_squeezer(text: str | Squeezer) -> Squeezer:
    """One squeezer from its spec string (a squeezer object is returned as it is)."""
    if isinstance(text, (BitDepth, Median, NonLocalMeans)):
        return text
    spec = str(text).strip()
    kind, sep, args = spec.partition(":")
    kind, args = kind.strip().lower(), args.strip()
    if not sep or not args:
        raise SqueezerSpecError(f"sidewatch: bad squeezer {spec!r}: {_SPEC_HELP}")
    if kind == BitDepth.kind and re.fullmatch(_INT, args):
        return BitDepth(int(args))
    if kind == Median.kind and re.fullmatch(_INT, args):
        return Median(int(args))
    if kind == NonLocalMeans.kind:
        match = re.fullmatch(rf"({_INT})-({_INT})-({_NUMBER})", args)
        if match:
            return NonLocalMeans(int(match[1]), int(match[2]), float(match[3]))
    if kind not in (BitDepth.kind, Median.kind, NonLocalMeans.kind):
        raise SqueezerSpecError(f"sidewatch: unknown squeezer {kind!r} in {spec!r}: {_SPEC_HELP}")
    raise SqueezerSpecError(f"sidewatch: bad arguments {args!r} for squeezer {kind!r}: {_SPEC_HELP}")


def parse_squeezers(specs: str | Iterable[str | Squeezer]) -> tuple[Squeezer, ...]:
    """Squeezers from ``"bit_depth:1,median:2"`` or a list of specs; at least one, none twice."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    squeezers = tuple(parse_squeezer(item) for item in items if not (isinstance(item, str) and not item.strip()))
    if not squeezers:
        raise SqueezerSpecError(f"sidewatch: no squeezer given: {_SPEC_HELP}")
    seen = set()
    for squeezer in squeezers:
        if squeezer in seen:
            raise SqueezerSpecError(f"sidewatch: squeezer {squeezer} is listed twice")
        seen.add(squeezer)
    return squeezers


def format_squeezers(squeezers: Iterable[Squeezer]) -> str:
    """The spec string that :func:`parse_squeezers` reads back: ``"bit_depth:1,median:2"``."""
    return ",".join(str(s) for s in squeezers)
