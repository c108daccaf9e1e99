"""Feeding feature blocks (agent/detect/features: one per tensor kind) to :class:`MomentFeatures`.

>>> import numpy as np
>>> from agent.detect.features import FeatureBlock
>>> rng = np.random.default_rng(0)
>>> block = FeatureBlock(valid=np.ones(100, bool), continuous=rng.normal(size=(100, 2)),
...                      continuous_names=["a", "b"], shares={"missing": np.zeros(100)})
>>> moments = fit_moments(block, projections=1)
>>> moments.names, moments.groups[-1], moment_rows(moments, block.select(slice(0, 3))).shape
(['a', 'b', 'proj0_sq', 'missing'], 'share:missing', (3, 4))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.detect.drift.moments import MomentFeatures
from agent.detect.features.block import FeatureBlock


def fit_moments(block: FeatureBlock, **params: Any) -> MomentFeatures:
    """A :class:`MomentFeatures` (``params``: its constructor's, ``n_classes`` excepted: classes come as
    shares) fitted on the block's valid rows."""
    return MomentFeatures(**params).fit(**block.moment_inputs(fitting=True))


def moment_rows(moments: MomentFeatures, block: FeatureBlock) -> np.ndarray:
    """``moments.transform`` of the block: ``[n, F]`` moment features, NaN where the block's rows are
    invalid (a :class:`~agent.detect.drift.moments.MomentTest` skips those rows and counts them)."""
    rows = moments.transform(**block.moment_inputs())
    rows[~block.valid] = np.nan
    return rows
