"""Black-box query detection alone (agent/detect/queries/): the fingerprints, each client's bounded history, and the
watch the data planes call, with no gRPC around them."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.config import ConfigError, load_config
from agent.demo.data import load_images
from agent.detect.queries.clients import ClientHistory, ClientTable, Limits
from agent.detect.queries.fingerprint import Fingerprinter, shared
from agent.detect.queries.watch import QueryWatch, bound_identity
from agent.metrics import BoundedModels, QueryMetrics
from agent.protocol import codec, oip_pb2

MODEL = "mnist_cnn"
DEFAULTS = load_config().detection.queries


@pytest.fixture(scope="module")
def images():
    return load_images()[0]


def _perturbed(image: np.ndarray, count: int, scale: float = 0.02, seed: int = 7) -> np.ndarray:
    """A black-box attack's queries around one point: small random perturbations of it."""
    noise = np.random.default_rng(seed).normal(0, scale, (count, *image.shape))
    return np.clip(image[None] + noise, 0, 1).astype(np.float32)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _request(rows: np.ndarray, model: str = MODEL) -> bytes:
    message = oip_pb2.ModelInferRequest(model_name=model, model_version="1")
    codec.add_input(message, "input", rows)
    return message.SerializeToString()


def _watch(mode: str = "enforce", clock=None, **settings):
    config = load_config(overrides={"detection.queries.mode": mode,
                                    **{f"detection.queries.{key}": value for key, value in settings.items()}})
    registry = CollectorRegistry()
    watch = QueryWatch(config.detection.queries, QueryMetrics(registry), BoundedModels(8, [(MODEL, "")]),
                       clock=clock or Clock(), seed=1)
    return watch, registry


def _value(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# --- fingerprints -------------------------------------------------------------------------------------------------

def test_fingerprints_keep_a_perturbed_image_close_and_other_images_apart(images):
    fingerprinter = Fingerprinter(DEFAULTS.window, DEFAULTS.hashes, seed=1)
    fingerprint = fingerprinter(images[0], DEFAULTS.quantization_step)
    assert fingerprint.dtype == np.uint16 and len(fingerprint) == DEFAULTS.hashes
    assert np.all(np.diff(fingerprint.astype(int)) > 0) and 0 not in fingerprint
    perturbed = [shared(fingerprint, fingerprinter(row, DEFAULTS.quantization_step))
                 for row in _perturbed(images[0], 20)]
    others = [shared(fingerprint, fingerprinter(row, DEFAULTS.quantization_step)) for row in images[1:200]]
    # Noise on every pixel moves some across a step: most perturbed copies are near-duplicates, not all.
    assert np.mean(np.array(perturbed) >= DEFAULTS.match_threshold) >= 0.8
    assert max(others) < DEFAULTS.match_threshold


def _reference_fingerprint(fingerprinter: Fingerprinter, row: np.ndarray, step: float) -> np.ndarray:
    """The fingerprint as the module docstring says it, one window at a time in Python integers."""
    mask = (1 << 64) - 1
    quantised = [int(np.floor(value / step + 0.5)) for value in row.astype(np.float64).ravel()]
    window = min(fingerprinter.window, len(quantised))
    hashes = set()
    for start in range(len(quantised) - window + 1):
        values = quantised[start:start + window]
        if len(set(values)) == 1:
            continue
        value = 0
        for item in values:
            value = (value * fingerprinter._multiplier + item) & mask
        value ^= int(fingerprinter._key)
        value ^= value >> 30
        value = (value * 0xBF58476D1CE4E5B9) & mask
        value ^= value >> 27
        value = (value * 0x94D049BB133111EB) & mask
        hashes.add(value ^ (value >> 31))
    kept = sorted(hashes)[-fingerprinter.hashes:]
    return np.array(sorted({(value & 0xFFFF) or 1 for value in kept}), np.uint16)


def test_the_fingerprints_are_the_largest_hashes_of_the_windows_one_row_or_a_batch(images):
    fingerprinter = Fingerprinter(DEFAULTS.window, DEFAULTS.hashes, seed=3)
    rows = np.concatenate([images[:6].reshape(6, -1), _perturbed(images[0], 2).reshape(2, -1),
                           np.random.default_rng(1).normal(0, 1, (2, 784))])
    batch = fingerprinter.rows(rows, 0.2)
    for row, fingerprint in zip(rows, batch):
        assert np.array_equal(fingerprint, _reference_fingerprint(fingerprinter, row, 0.2))
        assert np.array_equal(fingerprint, fingerprinter(row, 0.2))


def test_the_hash_key_is_secret_per_process_and_fixed_by_a_seed(images):
    a, b = Fingerprinter(50, 50, seed=1), Fingerprinter(50, 50, seed=1)
    assert np.array_equal(a(images[0], 0.2), b(images[0], 0.2))
    assert shared(Fingerprinter(50, 50)(images[0], 0.2), Fingerprinter(50, 50)(images[0], 0.2)) < 10


def test_odd_rows_get_a_fingerprint_and_never_raise():
    fingerprinter = Fingerprinter(50, 50, seed=1)
    assert fingerprinter(np.zeros(784, np.float32), 0.2).size == 0  # a blank input: no window says anything
    assert fingerprinter(np.array([], np.float32), 0.2).size == 0
    short = fingerprinter(np.array([0.0, 1.0, 0.5]), 0.2)  # shorter than a window: one window
    assert short.size == 1
    odd = np.array([np.nan, np.inf, -np.inf, 1e300, 3.0] * 40)
    assert fingerprinter(odd, 0.2).size > 0
    pixels = np.random.default_rng(0).integers(0, 256, 784, dtype=np.uint8)
    assert fingerprinter(pixels, 51).size == 50


# --- one client's history -------------------------------------------------------------------------------------------

LIMITS = Limits(fingerprints_per_client=8, hashes=4, match_threshold=3, history=6, near_duplicates_to_flag=3)


def _fingerprint(*hashes: int) -> np.ndarray:
    return np.array(sorted(hashes), np.uint16)


def test_exact_repeats_count_for_nothing_however_many():
    history = ClientHistory(LIMITS)
    history.observe(_fingerprint(1, 2, 3, 4), digest=11)
    for _ in range(100):  # retries of the same input
        seen = history.observe(_fingerprint(1, 2, 3, 4), digest=11)
        assert seen.repeat and not seen.near_duplicate and not seen.flagged
    assert history.near_duplicates == 0


def test_near_duplicates_flag_the_client_and_the_count_starts_again():
    history = ClientHistory(LIMITS)
    history.observe(_fingerprint(1, 2, 3, 4), digest=1)
    seen = [history.observe(_fingerprint(1, 2, 3, 100 + n), digest=100 + n) for n in range(6)]
    assert [s.near_duplicate for s in seen] == [True] * 6
    assert [s.flagged for s in seen] == [False, False, True, False, False, True]
    # Unrelated rows in between dilute: 3 near-duplicates are needed among the last 6 rows.
    history = ClientHistory(LIMITS)
    history.observe(_fingerprint(1, 2, 3, 4), digest=1)
    flags = []
    for n in range(12):
        flags.append(history.observe(_fingerprint(1, 2, 3, 200 + n), digest=200 + n).flagged)
        for m in range(3):
            history.observe(_fingerprint(1000 + 10 * n + m, 2000 + 10 * n + m, 3000 + n, 4000 + m),
                            digest=1000 + 10 * n + m)
    assert not any(flags)


def test_the_ring_holds_at_most_its_rows_and_grows_to_them():
    history = ClientHistory(LIMITS)
    assert history.nbytes() == 4 * (LIMITS.hashes * 2 + 8)  # a new client holds 4 rows
    for n in range(50):
        history.observe(_fingerprint(4 * n + 1, 4 * n + 2, 4 * n + 3, 4 * n + 4), digest=n)
    assert history.nbytes() == LIMITS.fingerprints_per_client * (LIMITS.hashes * 2 + 8)
    # The oldest rows are gone: a near-duplicate of row 0 is not one any more, of row 49 it is.
    assert not history.observe(_fingerprint(1, 2, 3, 999), digest=1000).near_duplicate
    assert history.observe(_fingerprint(197, 198, 199, 999), digest=1001).near_duplicate


# --- the table of clients --------------------------------------------------------------------------------------------

def test_the_table_drops_the_least_recently_seen_beyond_its_bound_and_idle_ones():
    clock = Clock()
    table = ClientTable(LIMITS, max_clients=3, idle_seconds=60, clock=clock)
    for name in "abc":
        table.get(name)
    table.get("a")  # a is seen again: b is the least recently seen
    table.get("d")
    assert ("b" not in table) and len(table) == 3 and table.evicted == 1
    clock.now += 30
    table.get("d")
    clock.now += 31  # a and c idle for 61 s, d for 31 s
    table.get("e")
    assert sorted(key for key in "abcde" if key in table) == ["d", "e"]
    assert table.evicted == 1  # the idle ones expired; they were not evicted for room


# --- the watch -------------------------------------------------------------------------------------------------------

def test_enforce_refuses_a_near_duplicate_client_for_block_seconds(images):
    clock = Clock()
    watch, registry = _watch("enforce", clock)
    refusals = [watch.check(MODEL, "peer:10.0.0.9", _request(row[None])) for row in _perturbed(images[1], 30)]
    first = next(index for index, refusal in enumerate(refusals) if refusal is not None)
    # The first row matches nothing; 10 near-duplicates flag the client (some noisy copies are not near-duplicates).
    assert DEFAULTS.near_duplicates_to_flag <= first < 20
    assert refusals[first].startswith("sidewatch: client refused for 600 s")
    assert all(refusal is not None for refusal in refusals[first:])
    clock.now += 599
    assert "for 1 s" in watch.check(MODEL, "peer:10.0.0.9", _request(images[5:6]))  # any input, while blocked
    assert watch.check(MODEL, "peer:10.0.0.8", _request(images[5:6])) is None  # another client
    clock.now += 2
    assert watch.check(MODEL, "peer:10.0.0.9", _request(images[6:7])) is None  # the block is over
    assert _value(registry, "sidewatch_query_flags_total", model=MODEL) == 1
    assert _value(registry, "sidewatch_query_refused_total", model=MODEL) == 30 - first + 1
    # No series has a client's identity for a label.
    labels = {name for metric in registry.collect() for sample in metric.samples for name in sample.labels}
    assert labels <= {"model", "reason", "le"}


def test_flag_mode_counts_and_refuses_nothing(images):
    watch, registry = _watch("flag")
    assert all(watch.check(MODEL, "peer:10.0.0.9", _request(row[None])) is None for row in _perturbed(images[1], 40))
    assert _value(registry, "sidewatch_query_flags_total", model=MODEL) == 3  # at rows 11, 21 and 31
    assert _value(registry, "sidewatch_query_refused_total", model=MODEL) == 0


def test_many_clients_asking_for_the_same_popular_image_are_not_an_attack(images):
    # Each client has its own copy of the popular image (re-encoded: near-duplicates of each other's), and asks
    # for it again now and then (repeats). Across clients they are 200 near-duplicates: state is per client.
    watch, registry = _watch("enforce")
    copies = _perturbed(images[0], 200, scale=0.01)
    for round_ in range(5):
        for client in range(200):
            assert watch.check(MODEL, f"peer:10.1.0.{client}", _request(copies[client][None])) is None
            assert watch.check(MODEL, f"peer:10.1.0.{client}", _request(images[100 + 5 * client + round_][None])) is None
    assert _value(registry, "sidewatch_query_flags_total", model=MODEL) == 0
    assert _value(registry, "sidewatch_query_repeats_total", model=MODEL) == 4 * 200  # each client's popular repeats
    # The same 200 copies from one client are an attack.
    one, registry = _watch("enforce")
    assert any(one.check(MODEL, "peer:10.1.0.1", _request(copy[None])) is not None for copy in copies)


def test_one_request_of_near_duplicate_rows_is_a_batch_of_queries(images):
    watch, registry = _watch("enforce", max_rows_per_request=16)
    refusal = watch.check(MODEL, "peer:10.0.0.9", _request(_perturbed(images[1], 40)))
    assert refusal is not None
    assert _value(registry, "sidewatch_query_rows_total", model=MODEL) == 16
    assert _value(registry, "sidewatch_query_skipped_total", model=MODEL, reason="rows_over_limit") == 24


def test_requests_that_cannot_be_fingerprinted_go_on_counted(images):
    watch, registry = _watch("enforce")
    assert watch.check(MODEL, "peer:a", b"\xff\x00 not a request") is None
    text = oip_pb2.ModelInferRequest(model_name=MODEL)
    codec.add_input(text, "text", np.array([b"hello"], dtype=object))
    assert watch.check(MODEL, "peer:a", text.SerializeToString()) is None
    assert _value(registry, "sidewatch_query_skipped_total", model=MODEL, reason="undecodable") == 1
    assert _value(registry, "sidewatch_query_skipped_total", model=MODEL, reason="no_numeric_input") == 1
    # A model whose mode is off is not looked at; an unknown model is labelled _other.
    off, _ = _watch("off")
    assert not off.watches(MODEL) and off.check(MODEL, "peer:a", b"junk") is None
    watch.check("unknown", "peer:a", _request(images[:1], model="unknown"))
    assert _value(registry, "sidewatch_query_rows_total", model="_other") == 1


def test_the_table_and_identities_are_bounded(images):
    watch, registry = _watch("enforce", max_clients=10)
    for client in range(25):
        watch.check(MODEL, f"metadata:{client}" + "x" * 1000 * (client % 2), _request(images[client:client + 1]))
    assert len(watch.clients) == 10
    assert _value(registry, "sidewatch_query_clients") == 10
    assert _value(registry, "sidewatch_query_clients_evicted_total") == 15
    assert bound_identity("y" * 129).startswith("sha256:") and bound_identity("y" * 128) == "y" * 128


# --- configuration ---------------------------------------------------------------------------------------------------

def test_the_configuration_checks_its_thresholds_against_its_bounds():
    for override, message in [({"detection.queries.match_threshold": 60}, "match_threshold must be at most hashes"),
                              ({"detection.queries.near_duplicates_to_flag": 60}, "at most history"),
                              ({"detection.queries.block_seconds": 4000}, "client_idle_seconds must be at least"),
                              ({"detection.queries.identity": "cookie"}, "detection.queries.identity"),
                              ({"models.m.query_mode": "block"}, "models.m.query_mode")]:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=override)
    config = load_config(overrides={"models.m.query_mode": "enforce", "models.n.adversarial_mode": "flag"})
    assert config.query_modes() == {"m": "enforce"} and config.detection.queries.mode == "off"
