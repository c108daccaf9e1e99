"""Features by tensor kind (agent/detect/features) on real data shipped in installed packages.

For each kind: a held-out split of the same data leaves every feature's mean where the reference has it
(no MomentTest rejection at a tiny alpha), and a change of the kind users meet is rejected on the right
feature. Then bad input: unreadable rows are invalid (never a crash, never a moved mean), whole tensors
of the wrong shape raise TensorShapeError, and a reference with garbage rows mixed in fits exactly as one
without them. Data: scikit-learn's bundled sets (breast cancer, diabetes, digits), river's SolarFlare
(categorical), sentences built from scikit-learn's English stop-word list. No downloads.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
from sklearn.linear_model import LogisticRegression, Ridge

from agent.config.base import ConfigError
from agent.config.tensors import parse_tensor_overrides
from agent.detect.drift.blocks import fit_moments, moment_rows
from agent.detect.features import (
    CategoricalFeatures,
    ClassifierOutput,
    EmbeddingFeatures,
    ImageFeatures,
    ModelFeatures,
    NumericFeatures,
    TensorShapeError,
    TextFeatures,
    ValueOutput,
    choose_kind,
    choose_kinds,
    features_from_state,
)
from tests.support.moment_checks import rejected_features

pytestmark = pytest.mark.unit


def look(reference_block, live_block, min_effect=0.2):
    return rejected_features(reference_block, live_block, min_effect)


def longer(x, n=1500, seed=9):
    """A longer window of drifted traffic: ``n`` rows drawn from ``x`` (a held-out split is a few hundred rows,
    too few for a test at alpha 1e-7 to see a moderate change; benign splits are tested as they are)."""
    return x[np.random.default_rng(seed).integers(0, len(x), size=n)]


def split(n, seed=0, share=0.6):
    order = np.random.default_rng(seed).permutation(n)
    cut = int(share * n)
    return order[:cut], order[cut:]


def round_trip(features, batch):
    again = features_from_state(json.loads(json.dumps(features.state_dict())))
    a, b = features.transform(batch), again.transform(batch)
    assert np.array_equal(a.valid, b.valid)
    for x, y in ((a.continuous, b.continuous), (a.classes, b.classes)):
        assert (x is None and y is None) or np.array_equal(x, y, equal_nan=True)
    for d, e in ((a.scalars, b.scalars), (a.shares, b.shares)):
        assert list(d) == list(e) and all(np.array_equal(d[k], e[k], equal_nan=True) for k in d)
    return again


# --- numeric tabular --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cancer():
    data = load_breast_cancer()
    ref, live = split(len(data.data))
    return data.data[ref], data.data[live], [str(n).replace(" ", "_") for n in data.feature_names]


def test_numeric_benign_unit_change_and_missing(cancer):
    ref, live, names = cancer
    tab = NumericFeatures(columns=names).fit(ref)
    reference = tab.transform(ref)
    assert look(reference, tab.transform(live)) == ()
    rescaled = live.copy()
    rescaled[:, names.index("mean_area")] *= 1000        # a unit change of one column
    rejected = look(reference, tab.transform(longer(rescaled)))
    assert "mean_area" in rejected and "out_of_range" in rejected
    holes = live.copy()
    holes[np.random.default_rng(1).random(len(holes)) < 0.2, names.index("worst_texture")] = np.nan
    assert "missing" in look(reference, tab.transform(longer(holes)))
    assert not np.isnan(tab.transform(holes).continuous).any()     # NaN imputed, never in a mean
    round_trip(tab, holes[:5])


def test_numeric_bad_rows_are_invalid_and_ignored_by_fit(cancer):
    ref, _, _ = cancer
    garbage = np.array([["abc"] * 30, [b"\xff"] * 30, [None, "1e999999x"] + [1.0] * 28], dtype=object)
    mixed = np.concatenate([ref.astype(object), garbage])
    clean = NumericFeatures().fit(ref).state_dict()
    assert NumericFeatures().fit(mixed).state_dict() == clean
    block = NumericFeatures().fit(ref).transform(np.concatenate([ref[:2].astype(object), garbage]))
    assert block.valid.tolist() == [True, True, False, False, False]
    assert np.isnan(block.continuous[2:]).all() and np.isnan(block.shares["missing"][2:]).all()
    numbers_as_text = np.array([[str(v) for v in row] for row in ref[:3]], dtype=object)
    assert np.allclose(NumericFeatures().fit(ref).transform(numbers_as_text).continuous,
                       NumericFeatures().fit(ref).transform(ref[:3]).continuous)
    with pytest.raises(TensorShapeError):
        NumericFeatures().fit(ref).transform(ref[:, :5])
    with pytest.raises(TensorShapeError):
        NumericFeatures().fit(ref).transform(np.zeros((2, 30, 1)))
    assert NumericFeatures().fit(ref).transform(np.zeros((0, 30))).n_rows == 0


# --- categorical --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flares():
    from river import datasets
    keys = ["zurich-class", "largest-spot-size", "spot-distribution"]
    rows = np.array([[x[k].encode() for k in keys] for x, _ in datasets.SolarFlare()], dtype=object)
    ref, live = split(len(rows), seed=2)
    return rows[ref], rows[live], ["zurich", "spot_size", "distribution"]


def test_categorical_benign_new_category_and_mix(flares):
    ref, live, names = flares
    old = ref[ref[:, 0] != b"F"]                           # the reference never saw zurich class F
    cat = CategoricalFeatures(top_k=4, columns=names).fit(old)
    reference = cat.transform(old)
    assert look(reference, cat.transform(live[live[:, 0] != b"F"])) == ()
    assert "zurich=<unseen>" in look(reference, cat.transform(longer(live)))
    assert "zurich=H" in look(reference, cat.transform(longer(live[live[:, 0] != b"H"])))     # a class mix change
    assert len(cat.feature_names) == 3 * (4 + 2)                                     # bounded per column
    round_trip(cat, live[:20])


def test_categorical_bad_rows_and_garbage_in_fit(flares):
    ref, _, _ = flares
    garbage = np.array([[1.5, b"S", b"O"], [object(), b"S", b"O"], [b"H", 2.25, b"X"]], dtype=object)
    assert CategoricalFeatures().fit(np.concatenate([ref, garbage])).state_dict() == \
        CategoricalFeatures().fit(ref).state_dict()
    block = CategoricalFeatures().fit(ref).transform(garbage)
    assert block.valid.tolist() == [False, False, False]
    huge = CategoricalFeatures().fit(np.array([b"x" * 10_000, b"y"] * 10, dtype=object))
    assert all(len(k) <= 64 for k in huge.top[0])
    with pytest.raises(TensorShapeError):
        CategoricalFeatures().fit(ref).transform(ref[:, :2])


# --- images -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    ref, live = split(len(data.images))
    return data.images[ref], data.images[live], data.target[ref], data.target[live]


def test_image_benign_darker_and_rotated(digits):
    ref, live, _, _ = digits
    img = ImageFeatures().fit(ref)                       # [N, 8, 8]: a 7 x 7 grid that does not divide 8
    assert img.layout == "NCHW" and img.channels == 1
    reference = img.transform(ref)
    assert look(reference, img.transform(live)) == ()
    assert "brightness" in look(reference, img.transform(longer(live) * 0.6))
    assert look(reference, img.transform(longer(np.rot90(live, 1, axes=(1, 2)))))
    round_trip(img, live[:4])


def test_colour_images_of_any_size_and_layout(digits):
    ref, live, _, _ = digits
    tint = np.array([1.0, 0.7, 0.4])

    def colour(images, size=30):                         # NHWC, upscaled to a size the grid does not divide
        big = np.kron(images, np.ones((4, 4)))[:, :size, :size]
        return big[..., None] * tint

    img = ImageFeatures().fit(colour(ref))
    assert (img.layout, img.channels, len(img.feature_names)) == ("NHWC", 3, 3 * 49 + 3 + 2)
    reference = img.transform(colour(ref))
    assert look(reference, img.transform(colour(live))) == ()
    bluer = colour(longer(live, 600)) * np.array([0.8, 1.0, 1.6])
    rejected = look(reference, img.transform(bluer))
    assert "c2_mean" in rejected and "c0_mean" in rejected
    nchw = ImageFeatures(layout="NCHW").fit(colour(ref).transpose(0, 3, 1, 2))
    assert np.allclose(nchw.transform(colour(live[:3]).transpose(0, 3, 1, 2)).continuous,
                       img.transform(colour(live[:3])).continuous)
    assert img.transform(colour(live[:2], size=5)).continuous.shape == (2, 152)   # smaller than the grid


def test_image_bad_input(digits):
    ref, live, _, _ = digits
    img = ImageFeatures().fit(ref)
    bad = live[:3].copy()
    bad[1, 2, 2] = np.nan
    block = img.transform(bad)
    assert block.valid.tolist() == [True, False, True] and np.isnan(block.continuous[1]).all()
    with pytest.raises(TensorShapeError):
        img.transform(np.zeros((2, 3, 8, 8)))            # three channels where one was fitted
    with pytest.raises(TensorShapeError):
        img.transform(np.zeros((2, 64)))
    with_nan = np.concatenate([ref, np.full((5, 8, 8), np.nan)])
    assert ImageFeatures().fit(with_nan).state_dict() == ImageFeatures().fit(ref).state_dict()


# --- text ---------------------------------------------------------------------------------------

WORDS = sorted(ENGLISH_STOP_WORDS)
CYRILLIC = str.maketrans("abcdefghijklmnopqrstuvwxyz", "абцдефгхийклмнопqрстуввхyз")


def sentences(n, seed, words=(6, 30)):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(*words))
        text = " ".join(rng.choice(WORDS, size=k)).capitalize() + rng.choice([".", "!", "?"])
        if rng.random() < 0.3:
            text += f" {int(rng.integers(1, 2000))} items."
        out.append(text.encode())
    return np.array(out, dtype=object)


def test_text_benign_shorter_and_foreign():
    ref = sentences(1500, 0)
    text = TextFeatures().fit(ref)
    reference = text.transform(ref)
    assert look(reference, text.transform(sentences(600, 1))) == ()
    assert "log_length" in look(reference, text.transform(sentences(600, 2, words=(2, 5))))
    foreign = np.array([s.decode().translate(CYRILLIC).encode() for s in sentences(600, 3)], dtype=object)
    rejected = look(reference, text.transform(foreign))
    assert {"non_ascii", "oov", "letters"} <= set(rejected)
    assert text.vocabulary.fill < 0.01
    round_trip(text, foreign[:5])


def test_text_bad_input_bounded_and_ignored_by_fit():
    ref = sentences(200, 0)
    garbage = np.array([b"\xff\xfe\xfd", 12, None, [b"a", b"b"]], dtype=object)
    assert TextFeatures().fit(np.concatenate([ref, garbage])).state_dict() == TextFeatures().fit(ref).state_dict()
    text = TextFeatures().fit(ref)
    assert text.transform(garbage).valid.tolist() == [False] * 4
    long = text.transform(np.array([b"word " * 1_000_000, "é" * 20_000], dtype=object))
    assert long.valid.all() and long.scalars["length"].tolist() == [10_000.0, 10_000.0]
    with pytest.raises(TensorShapeError):
        text.transform(np.zeros((3, 1)))                 # numbers where text is expected: the whole tensor
    with pytest.raises(TensorShapeError):
        text.transform(np.array([[b"a", b"b"]], dtype=object))


# --- outputs ------------------------------------------------------------------------------------

def test_classifier_outputs_benign_and_class_mix(digits):
    ref, live, y_ref, y_live = digits
    model = LogisticRegression(max_iter=2000).fit(ref.reshape(len(ref), -1), y_ref)
    probabilities = ClassifierOutput().fit(model.predict_proba(ref.reshape(len(ref), -1)))
    logits = ClassifierOutput().fit(model.decision_function(ref.reshape(len(ref), -1)))
    assert (probabilities.output, logits.output) == ("probabilities", "logits")
    reference = probabilities.transform(model.predict_proba(ref.reshape(len(ref), -1)))
    flat = live.reshape(len(live), -1)
    assert look(reference, probabilities.transform(model.predict_proba(flat))) == ()
    few = flat[y_live < 5]                                # a class-mix change: half the classes vanish
    assert "class_9" in look(reference, probabilities.transform(model.predict_proba(longer(few))))
    with pytest.raises(TensorShapeError):
        probabilities.transform(np.ones((2, 3)))
    bad = probabilities.transform(np.array([[np.nan] * 10, [2.0] + [0.0] * 9]))
    assert bad.valid.tolist() == [False, False]
    round_trip(logits, model.decision_function(flat[:5]))


def test_classifier_with_many_classes_keeps_top_k():
    p = np.random.default_rng(0).dirichlet(np.ones(500) * 0.1, size=2000)
    clf = ClassifierOutput(top_k=20).fit(p)
    block = clf.transform(p[:10])
    assert block.n_classes == 21 and block.class_names[-1] == "class_other"


def test_regression_output_benign_and_segment_shift():
    data = load_diabetes()
    ref, live = split(len(data.data))
    model = Ridge().fit(data.data[ref], data.target[ref])
    value = ValueOutput().fit(model.predict(data.data[ref]))
    reference = value.transform(model.predict(data.data[ref])[:, None])
    assert look(reference, value.transform(model.predict(data.data[live]))) == ()
    bmi = data.data[live][:, 2]
    heavier = data.data[live][bmi > np.median(bmi)]       # a segment-mix change: heavier patients only
    assert "value" in look(reference, value.transform(model.predict(longer(heavier))))
    assert value.transform(np.array([np.inf, 1.0, np.nan])).valid.tolist() == [False, True, False]
    score = ValueOutput(score=True).fit(np.linspace(0, 1, 50))
    assert score.transform(np.array([0.2, 0.7])).shares["positive"].tolist() == [0.0, 1.0]


# --- embeddings ---------------------------------------------------------------------------------

def test_embedding_benign_and_rotated(digits):
    ref, live, _, _ = digits
    weights = np.random.default_rng(5).normal(size=(64, 128)) / 8

    def embed(images):
        return np.tanh(images.reshape(len(images), -1) @ weights / 4)

    emb = EmbeddingFeatures(k=16).fit(embed(ref))
    reference = emb.transform(embed(ref))
    assert look(reference, emb.transform(embed(live))) == ()
    assert look(reference, emb.transform(embed(longer(np.rot90(live, 1, axes=(1, 2))))))
    with pytest.raises(TensorShapeError):
        emb.transform(np.ones((2, 64)))
    round_trip(emb, embed(live[:3]))


# --- choosing kinds, several tensors, config ----------------------------------------------------

@pytest.mark.parametrize("role, datatype, shape, kind", [
    ("input", "FP32", [-1, 30], "numeric"), ("input", "INT64", [-1, 4], "numeric"), ("input", "FP64", [-1], "numeric"),
    ("input", "FP32", [-1, 768], "embedding"), ("input", "FP32", [-1, -1], "embedding"),
    ("input", "INT64", [-1, -1], "ignore"), ("input", "BYTES", [-1], "text"), ("input", "BYTES", [-1, 1], "text"),
    ("input", "BOOL", [-1, 3], "categorical"), ("input", "UINT8", [-1, 224, 224, 3], "image"),
    ("input", "FP32", [-1, 3, 32, 32], "image"), ("input", "FP32", [-1, 28, 28], "image"),
    ("input", "FP32", [-1, 2, 3, 4, 5], "ignore"), ("input", "FP32", [], None),
    ("output", "FP32", [-1, 10], "classifier"), ("output", "FP32", [-1, 1], "regression"),
    ("output", "FP64", [-1], "regression"), ("output", "INT64", [-1], "categorical"),
    ("output", "BYTES", [-1, 1], "categorical"), ("output", "FP32", [-1, 5, 5], "ignore"),
])
def test_kind_rules(role, datatype, shape, kind):
    assert choose_kind("t", datatype, shape, role).kind == kind


def test_overrides_and_their_schema():
    spec = choose_kind("pixels", "FP32", [-1, 3, 32, 32], override={"layout": "NHWC"})
    assert (spec.kind, spec.options) == ("image", {"layout": "NHWC"})
    spec = choose_kind("codes", "INT64", [-1, 2], override={"kind": "categorical", "columns": ["a", "b"]})
    assert (spec.kind, spec.options["columns"]) == ("categorical", ["a", "b"])
    assert choose_kind("y", "FP32", [-1, 1], "output", {"kind": "score", "threshold": 0.3}).kind == "score"
    for bad, message in [({"x": {"kind": "tabular"}}, "tensors.x.kind"), ({"x": {"colums": ["a"]}}, "colums"),
                         ({"x": {"kind": "text", "top_k": 3}}, "top_k applies"),
                         ({"x": {"columns": ["a" * 65]}}, "tensors.x.columns.0")]:
        with pytest.raises(ConfigError, match=message):
            parse_tensor_overrides(bad)


def test_model_with_several_inputs_and_outputs(cancer, flares):
    ref, live, names = cancer
    cats = flares[0][:len(ref)]
    specs = choose_kinds(
        inputs=[{"name": "numbers", "datatype": "FP64", "shape": [-1, 30]},
                {"name": "flare", "datatype": "BYTES", "shape": [-1, 3]}],
        outputs=[("proba", "FP32", [-1, 2]), ("risk", "FP32", [-1])],
        overrides={"flare": {"kind": "categorical", "columns": ["zurich", "size", "dist"]},
                   "numbers": {"columns": names}})
    model = ModelFeatures(specs).fit("input", {"numbers": ref, "flare": cats})
    p = np.clip(ref[:, :1] / ref[:, :1].max(), 0, 1)
    model.fit("output", {"proba": np.hstack([p, 1 - p]), "risk": p[:, 0]})
    block = model.transform("input", {"numbers": live[:4], "flare": flares[1][:4]})
    assert block.continuous_names[0] == "numbers.mean_radius" and "flare.zurich=<unseen>" in block.shares
    assert block.share_groups["flare.zurich=H"] == "flare.zurich" and block.valid.all()
    without = model.transform("input", {"numbers": live[:4]})       # a tensor missing from the request
    assert without.n_rows == 4 and not without.valid.any() and list(without.shares) == list(block.shares)
    out = model.transform("output", {"proba": np.array([[0.2, 0.8]]), "risk": np.array([0.2])})
    assert sorted(out.shares) == ["proba.class_0", "proba.class_1"] and "risk.value" in out.scalars
    again = ModelFeatures.from_state(json.loads(json.dumps(model.state_dict())))
    assert np.array_equal(again.transform("input", {"numbers": live[:4], "flare": flares[1][:4]}).continuous,
                          block.continuous)
    moments = fit_moments(model.transform("input", {"numbers": ref, "flare": cats}))
    assert "share:flare.zurich" in moments.groups and "share:numbers.missing" in moments.groups
    with pytest.raises(TensorShapeError):
        model.transform("input", {"numbers": live[:4], "flare": flares[1][:3]})


def test_invalid_rows_never_reach_the_test(cancer):
    ref, live, _ = cancer
    tab = NumericFeatures().fit(ref)
    moments = fit_moments(tab.transform(ref))
    test = moments.make_test(0.2)
    batch = np.concatenate([live[:10].astype(object), np.array([["x"] * 30] * 5, dtype=object)])
    test.update(moment_rows(moments, tab.transform(batch)), at=0.0)
    assert (test.n, test.n_skipped) == (10, 5)
