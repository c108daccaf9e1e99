"""Traffic for the scikit-learn models of tests/support/sklearn_models.py: the reference split each model was
trained on (the traffic a baseline is learned from), a held-out split of the same source (benign traffic),
the drift scenarios of issue 12 and bad inputs. Everything is deterministic (seeded) and built from data
shipped in installed packages, no downloads:

* ``flare``: river's SolarFlare (1066 solar active regions; bundled with river). Inputs ``numeric`` FP32
  [N, 6] (activity, evolution, previous_24h, hist_complex, hist_complex_this_pass, area: small integer codes
  in the source) and ``categorical`` BYTES [N, 3] (zurich class, largest spot size, spot distribution).
  Label: at least one C-class flare in the next 24 h. Zurich class F (43 rows) is kept out of both splits:
  it is the new category.
* ``diabetes``: scikit-learn's load_diabetes. Input ``features`` FP32 [N, 10], target disease progression.
* ``topics``: sentences of scikit-learn's English stop words with words of one of three topics (sport, food,
  computing; the word lists are below). Input ``text`` BYTES [N, 1], label the topic.

Drift scenarios (``drift(model, name, n, seed)`` -> request tensors): a column rescaled x1000 (a unit
change), NaN appearing in a column, a new category, a segment or class mix change, a regression input segment
shift, shorter text, text in another alphabet. Bad inputs (``bad_requests(model)`` -> serialized
ModelInferRequest bytes, since a ragged BYTES tensor or a mismatched shape is not a numpy array): strings
where numbers go, ragged BYTES, NaN and Inf, wrong shapes, a missing input.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

MODELS = ("flare", "diabetes", "topics")
REFERENCE_SHARE = 0.6

FLARE_NUMERIC = ["activity", "evolution", "previous_24h", "hist_complex", "hist_complex_this_pass", "area"]
FLARE_CATEGORICAL = ["zurich", "spot_size", "distribution"]
DIABETES_COLUMNS = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
TOPIC_WORDS = {
    "sport": "match goal team player coach league score season referee stadium striker keeper tennis racket "
             "marathon sprint medal trophy fans penalty".split(),
    "food": "recipe kitchen flour butter garlic onion pepper salad bread cheese soup oven baking dinner lunch "
            "spicy sauce pasta noodle dessert".split(),
    "computing": "server network kernel compiler database cache memory processor laptop software bug deploy "
                 "python cluster storage query browser router firmware keyboard".split(),
}
TOPICS = list(TOPIC_WORDS)
# Latin letters to Cyrillic ones (a transliteration, as tests/unit/test_feature_kinds.py does): other-alphabet text.
CYRILLIC = str.maketrans("abcdefghijklmnopqrstuvwxyz", "абцдефгхийклмнопqрстуввхyз")


@dataclass(frozen=True)
class Split:
    """One model's data: request tensors (name -> array, rows first) and the training labels of the reference."""

    reference: dict[str, np.ndarray]
    held_out: dict[str, np.ndarray]
    labels: np.ndarray


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut = int(REFERENCE_SHARE * n)
    return np.sort(order[:cut]), np.sort(order[cut:])


@functools.cache
def _flare_rows() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from river import datasets

    numeric_keys = ["activity", "evolution", "previous-24h-flare-activity", "hist-complex",
                    "hist-complex-this-pass", "area"]
    categorical_keys = ["zurich-class", "largest-spot-size", "spot-distribution"]
    rows = list(datasets.SolarFlare())
    numeric = np.array([[x[k] for k in numeric_keys] for x, _ in rows], dtype=np.float32)
    categorical = np.array([[x[k].encode() for k in categorical_keys] for x, _ in rows], dtype=object)
    labels = np.array([int(y["c-class-flares"] > 0) for _, y in rows])
    return numeric, categorical, labels


@functools.cache
def flare() -> Split:
    numeric, categorical, labels = _flare_rows()
    known = np.flatnonzero(categorical[:, 0] != b"F")
    ref, live = _split(len(known), seed=2)
    ref, live = known[ref], known[live]
    return Split({"numeric": numeric[ref], "categorical": categorical[ref]},
                 {"numeric": numeric[live], "categorical": categorical[live]}, labels[ref])


@functools.cache
def diabetes() -> Split:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    ref, live = _split(len(data.data), seed=0)
    x = data.data.astype(np.float32)
    return Split({"features": x[ref]}, {"features": x[live]}, data.target[ref])


def sentences(n: int, seed: int, words: tuple[int, int] = (6, 25),
              topics: tuple[str, ...] = tuple(TOPICS)) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sentences (BYTES [n, 1]) and their topic indices: stop words with about 40% topic words."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    stop = sorted(ENGLISH_STOP_WORDS)
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        topic = topics[int(rng.integers(len(topics)))]
        k = int(rng.integers(*words))
        chosen = [rng.choice(TOPIC_WORDS[topic]) if rng.random() < 0.4 else rng.choice(stop) for _ in range(k)]
        text = " ".join(chosen).capitalize() + str(rng.choice([".", "!", "?"]))
        if rng.random() < 0.2:
            text += f" {int(rng.integers(1, 500))} times."
        texts.append(text.encode())
        labels.append(TOPICS.index(topic))
    return np.array(texts, dtype=object)[:, None], np.array(labels)


@functools.cache
def topics() -> Split:
    ref, labels = sentences(1200, seed=0)
    live, _ = sentences(800, seed=1)
    return Split({"text": ref}, {"text": live}, labels)


SPLITS: dict[str, Callable[[], Split]] = {"flare": flare, "diabetes": diabetes, "topics": topics}


def reference(model: str) -> dict[str, np.ndarray]:
    """The traffic the model was trained on: what a baseline learned from traffic would see first."""
    return SPLITS[model]().reference


def benign(model: str) -> dict[str, np.ndarray]:
    """Held-out rows of the same source: benign live traffic."""
    return SPLITS[model]().held_out


def rows(tensors: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {name: array[index] for name, array in tensors.items()}


def resample(tensors: dict[str, np.ndarray], n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` rows drawn with replacement: a longer window of traffic than a held-out split holds."""
    size = len(next(iter(tensors.values())))
    return rows(tensors, np.random.default_rng(seed).integers(0, size, size=n))


def batches(tensors: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Requests of ``size`` rows (the last one shorter) in order."""
    total = len(next(iter(tensors.values())))
    for start in range(0, total, size):
        yield {name: array[start:start + size] for name, array in tensors.items()}


# --- drift scenarios: each (n, seed) -> request tensors of n rows -------------------------------------

def _with_column(tensors, name, column, change):
    out = {k: v.copy() for k, v in tensors.items()}
    out[name][:, column] = change(out[name][:, column])
    return out


def _holes(share: float, seed: int):
    def change(column):
        column = column.copy()
        column[np.random.default_rng(seed + 1).random(len(column)) < share] = np.nan
        return column
    return change


def _flare_new_category(n, seed):
    numeric, categorical, _ = _flare_rows()
    f = np.flatnonzero(categorical[:, 0] == b"F")
    held = benign("flare")
    mixed = {"numeric": np.concatenate([held["numeric"], numeric[f]]),
             "categorical": np.concatenate([held["categorical"], categorical[f]])}
    return resample(mixed, n, seed)          # about 10% of rows of zurich class F, never in the reference


def _flare_segment_mix(n, seed):
    held = benign("flare")
    return resample(rows(held, np.flatnonzero(np.isin(held["categorical"][:, 0], [b"D", b"E"]))), n, seed)


def _diabetes_heavier(n, seed):
    held = benign("diabetes")
    bmi = held["features"][:, DIABETES_COLUMNS.index("bmi")]
    return resample(rows(held, np.flatnonzero(bmi > np.median(bmi))), n, seed)


def _topics_shorter(n, seed):
    return {"text": sentences(n, seed + 100, words=(2, 5))[0]}


def _topics_foreign(n, seed):
    texts = sentences(n, seed + 200)[0]
    return {"text": np.array([[t.decode().translate(CYRILLIC).encode()] for t in texts[:, 0]], dtype=object)}


def _topics_class_mix(n, seed):
    return {"text": sentences(n, seed + 300, topics=("computing",))[0]}


DRIFT: dict[str, dict[str, Callable[[int, int], dict[str, np.ndarray]]]] = {
    "flare": {
        "rescaled": lambda n, seed: _with_column(resample(benign("flare"), n, seed), "numeric",
                                                 FLARE_NUMERIC.index("evolution"), lambda c: c * 1000),
        "missing": lambda n, seed: _with_column(resample(benign("flare"), n, seed), "numeric",
                                                FLARE_NUMERIC.index("hist_complex"), _holes(0.2, seed)),
        "new_category": _flare_new_category,
        "segment_mix": _flare_segment_mix,
    },
    "diabetes": {
        "rescaled": lambda n, seed: _with_column(resample(benign("diabetes"), n, seed), "features",
                                                 DIABETES_COLUMNS.index("s5"), lambda c: c * 1000),
        "missing": lambda n, seed: _with_column(resample(benign("diabetes"), n, seed), "features",
                                                DIABETES_COLUMNS.index("bp"), _holes(0.2, seed)),
        "segment_shift": _diabetes_heavier,
    },
    "topics": {
        "shorter": _topics_shorter,
        "foreign": _topics_foreign,
        "class_mix": _topics_class_mix,
    },
}

# What each scenario should move, as tests/unit/test_scenarios.py checks with agent.detect.features: a list of
# (tensor, feature names) per scenario, where the MomentTest must reject at least one of the names. Inputs
# by their request names; outputs "probabilities" (ClassifierOutput) and "value" (ValueOutput).
EXPECTED: dict[str, dict[str, list[tuple[str, set[str]]]]] = {
    "flare": {"rescaled": [("numeric", {"evolution"}), ("numeric", {"out_of_range"})],
              "missing": [("numeric", {"missing"})],
              "new_category": [("categorical", {"zurich=<unseen>"})],
              "segment_mix": [("categorical", {"zurich=H"}), ("probabilities", {"class_1"})]},
    # load_diabetes's columns are centred, so x1000 leaves s5's mean near 0: its spread and range move.
    "diabetes": {"rescaled": [("features", {"out_of_range"}), ("value", {"value_bin0", "value_bin9"})],
                 "missing": [("features", {"missing"})],
                 "segment_shift": [("features", {"bmi"}), ("value", {"value"})]},
    "topics": {"shorter": [("text", {"log_length"})],
               "foreign": [("text", {"non_ascii"}), ("text", {"oov"})],
               "class_mix": [("probabilities", {"class_2"})]},
}


def drift(model: str, scenario: str, n: int = 1500, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` rows of the scenario's traffic for ``model`` (see DRIFT for the names)."""
    return DRIFT[model][scenario](n, seed)


# --- bad inputs ---------------------------------------------------------------------------------------

def _request(model: str, tensors: list[tuple[str, str, list[int], bytes]]) -> bytes:
    """A raw ModelInferRequest whose declared datatypes and shapes need not match its bytes."""
    from agent.protocol import oip_pb2

    request = oip_pb2.ModelInferRequest(model_name=model)
    for name, datatype, shape, raw in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request.SerializeToString()


def _bytes_raw(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _typed(model: str, tensors: dict[str, np.ndarray]) -> bytes:
    from agent.protocol import codec, oip_pb2

    request = oip_pb2.ModelInferRequest(model_name=model)
    for name, array in tensors.items():
        codec.add_input(request, name, array)
    return request.SerializeToString()


def bad_requests(model: str) -> dict[str, bytes]:
    """Serialized ModelInferRequests that a client should not send: name -> bytes."""
    held = benign(model)
    if model == "flare":
        num, cat = held["numeric"][:4], held["categorical"][:4]
        return {
            "strings_for_numbers": _typed(model, {"numeric": np.full((4, 6), b"abc", dtype=object),
                                                  "categorical": cat}),
            "ragged_bytes": _request(model, [("numeric", "FP32", [4, 6], num.tobytes()),
                                             ("categorical", "BYTES", [4, 3], _bytes_raw(list(cat.ravel()[:-2])))]),
            "inf": _typed(model, {"numeric": np.full((4, 6), np.inf, np.float32), "categorical": cat}),
            "wrong_columns": _typed(model, {"numeric": num[:, :4], "categorical": cat}),
            "rows_disagree": _typed(model, {"numeric": num, "categorical": cat[:3]}),
            "missing_input": _typed(model, {"numeric": num}),
        }
    if model == "diabetes":
        x = held["features"][:4]
        return {
            "strings_for_numbers": _typed(model, {"features": np.full((4, 10), b"1,5", dtype=object)}),
            "nan_rows": _typed(model, {"features": np.full((4, 10), np.nan, np.float32)}),
            "inf": _typed(model, {"features": np.full((4, 10), np.inf, np.float32)}),
            "wrong_columns": _typed(model, {"features": x[:, :9]}),
            "shape_disagrees_with_bytes": _request(model, [("features", "FP32", [4, 10], x[:3].tobytes())]),
        }
    if model == "topics":
        texts = list(held["text"][:4, 0])
        return {
            "ragged_bytes": _request(model, [("text", "BYTES", [4, 1], _bytes_raw(texts[:3]))]),
            "truncated_length_prefix": _request(model, [("text", "BYTES", [2, 1], _bytes_raw(texts[:2])[:-3])]),
            "numbers_for_text": _typed(model, {"text": np.ones((4, 1), np.float32)}),
            "invalid_utf8": _typed(model, {"text": np.array([[b"\xff\xfe\xfd"]] * 2, dtype=object)}),
            "wrong_shape": _typed(model, {"text": np.array([texts[:2]] * 2, dtype=object)}),
        }
    raise KeyError(model)
