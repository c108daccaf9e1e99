"""Fit the scikit-learn pipelines that tests/support/sklearn_models.py serves through MLServer.

Run as a script by MLServer's own Python (so the pickles match the scikit-learn that loads them):
``python sklearn_train.py DATA.npz OUT_DIR`` writes ``OUT_DIR/<model>.joblib`` for each model. The data
(the reference splits of tests/support/scenarios.py) comes in the .npz. Only numpy, scikit-learn and joblib
are imported, so the unit tests can fit the same pipelines in-process.
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler


def fit_flare(numeric: np.ndarray, categorical: np.ndarray, labels: np.ndarray):
    """Numeric columns first, then the categorical ones (strings), in one object array: the runtime builds it
    from the two input tensors. Imputer and handle_unknown as a platform team would ship it: NaN and new
    categories are served, not refused."""
    n_numeric = numeric.shape[1]
    columns = ColumnTransformer([
        ("numeric", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), list(range(n_numeric))),
        ("categorical", OneHotEncoder(handle_unknown="ignore"),
         list(range(n_numeric, n_numeric + categorical.shape[1]))),
    ])
    x = np.hstack([numeric.astype(object), categorical.astype(str).astype(object)])
    return make_pipeline(columns, LogisticRegression(max_iter=1000)).fit(x, labels)


def fit_diabetes(features: np.ndarray, target: np.ndarray):
    return make_pipeline(SimpleImputer(strategy="median"), Ridge(alpha=0.1)).fit(features, target)


def fit_topics(texts: np.ndarray, labels: np.ndarray):
    vectorizer = HashingVectorizer(n_features=2**12, alternate_sign=False, norm="l2")
    return make_pipeline(vectorizer, LogisticRegression(max_iter=1000)).fit([str(t) for t in texts], labels)


def fit_all(data) -> dict:
    return {
        "flare": fit_flare(data["flare_numeric"], data["flare_categorical"], data["flare_labels"]),
        "diabetes": fit_diabetes(data["diabetes_features"], data["diabetes_target"]),
        "topics": fit_topics(data["topics_text"], data["topics_labels"]),
        # A canary built with its feature columns in the wrong order: served the same requests, it answers
        # otherwise (tests/support/sklearn_models.py serves it as version 3 of "ridge").
        "ridge_swapped": fit_diabetes(data["diabetes_features"][:, ::-1], data["diabetes_target"]),
    }


if __name__ == "__main__":
    import pathlib

    import joblib

    with np.load(sys.argv[1], allow_pickle=False) as data:
        models = fit_all(dict(data))
    for name, model in models.items():
        joblib.dump(model, pathlib.Path(sys.argv[2]) / f"{name}.joblib")
