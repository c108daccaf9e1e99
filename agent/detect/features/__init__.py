"""Features computed from decoded tensors, one module per tensor kind: what the drift tests look at.

``core``         the image classifier's features, written once: softmax, entropy, block means
                 (``region_means``, ``input_features``), predicted class/confidence/entropy (``output_features``)
``block``        FeatureBlock (what every kind returns), TensorShapeError, merge_blocks, HashedSet, and the
                 safe readers of client data (``as_numbers``, ``as_items``)
``tabular``      NumericFeatures: numeric columns ``[N, F]``, their missing and out-of-range rates
``categorical``  CategoricalFeatures: shares of the top-k categories, other, and unseen categories
``image``        ImageFeatures: block means per channel on a fixed grid whatever the size, global summaries
``text``         TextFeatures: length, character mix, out-of-vocabulary rate (hashed vocabulary)
``outputs``      ClassifierOutput (probabilities or logits) and ValueOutput (regression, score)
``embedding``    EmbeddingFeatures: a fixed seeded random projection of wide vectors
``choose``       choose_kind / choose_kinds (the kind from ModelMetadata and overrides), ModelFeatures

Every kind: ``fit(reference) -> self``, ``transform(batch) -> FeatureBlock``, ``state_dict()`` and
``from_state()``. ``agent.detect.drift.blocks`` feeds blocks to MomentFeatures. This package imports numpy
and the config layer only.
"""

from agent.detect.features.block import (
    FeatureBlock,
    HashedSet,
    TensorFeatures,
    TensorShapeError,
    features_from_state,
    merge_blocks,
)
from agent.detect.features.categorical import CategoricalFeatures
from agent.detect.features.choose import ModelFeatures, TensorSpec, choose_kind, choose_kinds, make_features
from agent.detect.features.core import (
    OUTPUT_FEATURES,
    REGION_GRID,
    entropy,
    input_features,
    output_features,
    region_means,
    region_names,
    softmax,
)
from agent.detect.features.embedding import EmbeddingFeatures
from agent.detect.features.image import ImageFeatures
from agent.detect.features.outputs import ClassifierOutput, ValueOutput
from agent.detect.features.tabular import NumericFeatures
from agent.detect.features.text import TextFeatures

__all__ = [
    "OUTPUT_FEATURES", "REGION_GRID", "CategoricalFeatures", "ClassifierOutput", "EmbeddingFeatures", "FeatureBlock",
    "HashedSet", "ImageFeatures", "ModelFeatures", "NumericFeatures", "TensorFeatures", "TensorShapeError",
    "TensorSpec", "TextFeatures", "ValueOutput", "choose_kind", "choose_kinds", "entropy", "features_from_state",
    "input_features", "make_features", "merge_blocks", "output_features", "region_means", "region_names", "softmax",
]
