"""The check the feature-kind and scenario tests share: which features a MomentTest rejects when live rows
are compared with a reference, as one look of independent rows."""

from __future__ import annotations

import numpy as np

from agent.detect.drift.blocks import fit_moments, moment_rows
from agent.detect.features import FeatureBlock

ALPHA = 1e-7


def rejected_features(reference_block: FeatureBlock, live_block: FeatureBlock, min_effect: float = 0.2,
                      alpha: float = ALPHA) -> tuple[str, ...]:
    """The features the MomentTest rejects at ``alpha``: the live rows spread over 60 slots of 3 s (a
    3-minute look), each slot a cluster, as the rows are independent draws."""
    moments = fit_moments(reference_block, projections=4)
    test = moments.make_test(min_effect, cluster_rows=1)
    rows = moment_rows(moments, live_block)
    for i, chunk in enumerate(np.array_split(rows, 60)):
        test.update(chunk, at=3.0 * i)
    result = test.look(alpha)
    assert result.tested
    return result.rejected
