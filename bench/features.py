#!/usr/bin/env python3
"""Cost of features by tensor kind (agent/detect/features): microseconds per request.

    .venv/bin/python bench/features.py --out bench-results/features.json

For each kind, on data shaped as users send it (bundled scikit-learn data where it fits), the time of
the kind's ``transform`` and of ``transform`` + ``MomentFeatures.transform`` (through
agent/detect/drift/blocks.py), per request, at batch 1 (every request its own batch) and in
micro-batches of 64: the median over ``--blocks`` blocks of ``--requests`` requests each.
CPU only; a shared machine gives noisy figures, so compare kinds in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from agent.detect.drift.blocks import fit_moments, moment_rows
from agent.detect.features import (
    CategoricalFeatures,
    ClassifierOutput,
    EmbeddingFeatures,
    ImageFeatures,
    NumericFeatures,
    TextFeatures,
    ValueOutput,
)


def cases(rng: np.random.Generator) -> dict[str, tuple[object, np.ndarray]]:
    cancer = load_breast_cancer().data
    digits = load_digits().images
    words = sorted(ENGLISH_STOP_WORDS)
    text = np.array([" ".join(rng.choice(words, size=int(rng.integers(6, 40)))).encode() for _ in range(2000)],
                    dtype=object)
    labels = np.array([[b"abcdefgh"[i % 8:i % 8 + 1], str(i % 50).encode()] for i in rng.integers(0, 400, 2000)],
                      dtype=object)
    colour = rng.integers(0, 256, size=(256, 224, 224, 3)).astype(np.uint8)
    p = rng.dirichlet(np.ones(10), size=2000)
    return {
        "numeric_30_columns": (NumericFeatures(), cancer),
        "categorical_2_columns": (CategoricalFeatures(), labels),
        "image_8x8_gray": (ImageFeatures(), digits),
        "image_224x224_rgb_uint8": (ImageFeatures(), colour),
        "text_6_to_40_words": (TextFeatures(), text),
        "classifier_10_classes": (ClassifierOutput(), p),
        "regression": (ValueOutput(), rng.normal(size=2000)),
        "embedding_768": (EmbeddingFeatures(), rng.normal(size=(2000, 768)).astype(np.float32)),
    }


def per_request(fn, data: np.ndarray, batch: int, requests: int, blocks: int) -> float:
    """Median over blocks of the seconds per request, ``requests`` requests per block in batches of ``batch``."""
    times = []
    starts = np.arange(0, len(data) - batch + 1, batch)
    for b in range(blocks):
        t0 = time.perf_counter()
        for i in range(requests // batch):
            s = starts[(b * 7 + i) % len(starts)]
            fn(data[s:s + batch])
        times.append((time.perf_counter() - t0) / ((requests // batch) * batch))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--blocks", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    for name, (features, data) in cases(rng).items():
        features.fit(data)
        moments = fit_moments(features.transform(data))
        requests = args.requests if np.size(data[0]) < 10_000 else max(64, args.requests // 10)
        row = {"moment_features": len(moments.names)}
        for batch in (1, 64):
            row[f"transform_us_batch_{batch}"] = 1e6 * per_request(features.transform, data, batch, requests,
                                                                  args.blocks)
            row[f"with_moments_us_batch_{batch}"] = 1e6 * per_request(
                lambda x, f=features, m=moments: moment_rows(m, f.transform(x)), data, batch, requests, args.blocks)
        results[name] = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
        print(name, results[name], flush=True)
    out = {"what": "microseconds per request of features by tensor kind (median of blocks)",
           "requests_per_block": args.requests, "blocks": args.blocks, "machine": platform.machine(),
           "python": platform.python_version(), "numpy": np.__version__, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
