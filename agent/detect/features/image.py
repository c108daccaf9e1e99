"""Images ``[N, C, H, W]``, ``[N, H, W, C]`` or ``[N, H, W]`` of any size and channel count.

Continuous features, all in the pixels' own units:

``region_<r>_<c>`` (``c<k>_region_...`` per channel when ``C > 1``)  block means on a fixed ``grid`` x
    ``grid`` grid whatever H and W (:func:`~agent.detect.features.core.region_means`: rows and columns cut
    at ``(i * H) // grid``, today's 7 x 7 blocks of 4 x 4 pixels for 28 x 28; an image smaller than the
    grid repeats rows or columns), so a live image of another size still gives comparable features;
``c<k>_mean`` (when ``C > 1``)  each channel's mean;
``brightness``  the mean over every pixel and channel;
``contrast``    the standard deviation over every pixel and channel.

The layout is fixed at fit: ``layout`` (``NCHW`` or ``NHWC``) if given, else guessed from the
reference's shape: a rank-4 batch whose last axis has 1, 3 or 4 entries and whose second has more is
NHWC, otherwise NCHW; rank 3 is ``[N, H, W]``, one channel. A batch with another rank or channel
count raises :class:`~agent.detect.features.block.TensorShapeError`; a row with NaN, Inf or an element
that is not a number is invalid.

>>> import numpy as np
>>> ref = np.random.default_rng(0).uniform(size=(20, 32, 48, 3))      # NHWC colour images
>>> img = ImageFeatures().fit(ref)
>>> img.layout, img.channels, len(img.feature_names)
('NHWC', 3, 152)
>>> block = img.transform(np.zeros((2, 10, 10, 3)))                   # another size: same features
>>> block.continuous.shape, block.continuous_names[-2:]
((2, 152), ['brightness', 'contrast'])
"""

from __future__ import annotations

from typing import Any, Mapping, Self

import numpy as np

from agent.detect.features.block import FeatureBlock, TensorFeatures, TensorShapeError, as_numbers
from agent.detect.features.core import REGION_GRID, region_means, region_names

MAX_CHANNELS = 16
LAYOUTS = ("NCHW", "NHWC")


def guess_layout(shape: tuple[int, ...]) -> str:
    """``NHWC`` if the last axis looks like channels (1, 3 or 4) and the second does not, else ``NCHW``.

    >>> guess_layout((-1, 224, 224, 3)), guess_layout((-1, 3, 224, 224)), guess_layout((-1, 28, 28))
    ('NHWC', 'NCHW', 'NCHW')
    """
    if len(shape) == 4 and shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        return "NHWC"
    return "NCHW"


class ImageFeatures(TensorFeatures):
    """Block means per channel and global summaries of images (module docstring)."""

    kind = "image"

    def __init__(self, grid: int = REGION_GRID, layout: str | None = None, channels: int | None = None) -> None:
        if not 1 <= grid <= 32:
            raise ValueError("sidewatch: image grid must be 1 to 32")
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"sidewatch: image layout must be one of {LAYOUTS}, got {layout!r}")
        self.grid = int(grid)
        self.layout = layout
        self.channels = channels

    def params(self) -> dict[str, Any]:
        return {"grid": self.grid, "layout": self.layout, "channels": self.channels}

    def _nchw(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        values, ok = as_numbers(x)
        if values.ndim == 3:
            values = values[:, None]
        elif values.ndim == 4:
            layout = self.layout or guess_layout(values.shape)
            if layout == "NHWC":
                values = values.transpose(0, 3, 1, 2)
        else:
            raise TensorShapeError(f"sidewatch: image features need [N, C, H, W], [N, H, W, C] or [N, H, W], "
                                   f"got shape {values.shape}")
        c, h, w = values.shape[1:]
        if not 1 <= c <= MAX_CHANNELS or h < 1 or w < 1:
            raise TensorShapeError(f"sidewatch: images need 1 to {MAX_CHANNELS} channels and H, W >= 1, got "
                                   f"{c} channels of {h} x {w}")
        if self.channels is not None and c != self.channels:
            raise TensorShapeError(f"sidewatch: image features fitted on {self.channels} channels, got {c}")
        ok = ok & np.isfinite(values).reshape(len(values), -1).all(axis=1)
        return values, ok

    @property
    def feature_names(self) -> list[str]:
        c = self.channels or 1
        names = region_names(c, self.grid)
        names += [f"c{k}_mean" for k in range(c)] if c > 1 else []
        return names + ["brightness", "contrast"]

    def fit(self, reference: Any) -> Self:
        if self.layout is None:
            shape = np.shape(reference)
            self.layout = guess_layout(tuple(shape)) if len(shape) == 4 else "NCHW"
        self.channels = None
        values, ok = self._nchw(reference)
        self._enough(ok)
        self.channels = int(values.shape[1])
        self.fitted = True
        return self

    def transform(self, batch: Any) -> FeatureBlock:
        self._check_fitted()
        values, ok = self._nchw(batch)
        n, c = values.shape[:2]
        clean = np.where(ok[:, None, None, None], values, 0.0)
        blocks = region_means(clean, self.grid)[0]
        flat = clean.reshape(n, c, -1)
        parts = [blocks]
        if c > 1:
            parts.append(flat.mean(axis=2))
        parts += [flat.reshape(n, -1).mean(axis=1)[:, None], flat.reshape(n, -1).std(axis=1)[:, None]]
        features = np.concatenate(parts, axis=1)
        features[~ok] = np.nan
        return FeatureBlock(valid=ok, continuous=features, continuous_names=self.feature_names)

    def fitted_state(self) -> dict[str, Any]:
        return {}

    def load_fitted(self, state: Mapping[str, Any]) -> None:
        if self.channels is None or self.layout is None:
            raise ValueError("sidewatch: image feature state needs its layout and channels")
