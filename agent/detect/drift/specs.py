"""Where the tensor kinds of a version with a live baseline come from: its ModelMetadata, else its traffic.

A version whose baseline is learned from traffic needs a kind per tensor (agent/detect/features/choose.py)
before it keeps any row. The model server knows its tensors better than one request shows them: a
dimension it declares dynamic (-1) looks fixed in any one request (token ids ``INT64 [-1, -1]`` are not
eight numeric columns because the first request had eight), and a tensor it does not declare is not
the model's. So the kinds come from the upstream's ``ModelMetadata(name, version)``, with the config's
overrides, and the traffic's tensors are the fallback.

The question is asked once per collection, off the hot path: the tap thread hands it to
:class:`MetadataLookup`'s worker threads and drops the version's copies (counted as skipped,
``awaiting_metadata``) until the answer is there, which takes one round trip to the upstream, and at most
the lookup's ``give_up_seconds``. Then :func:`choose_specs` decides, and the choice is counted in
``sidewatch_drift_specs_total{source, reason}`` and logged once:

==========  ===========  ========================================================================
source      reason       when
==========  ===========  ========================================================================
metadata    answered     the metadata names at least one tensor that the traffic carries
traffic     no_lookup    sidewatch was built without a lookup (tests, tools)
traffic     unavailable  the call failed, passed its deadline, or gave no answer
traffic     unusable     the metadata names no tensor (within the bounds below) that the traffic carries
==========  ===========  ========================================================================

With kinds from the metadata, a tensor in the traffic but not in the metadata is not watched (the log line
names it); a tensor in the metadata but missing from a request is absent as any watched tensor may be
(agent/detect/features/choose.py: its rows are invalid for that batch). The metadata is the upstream's
word, bounded as a request's tensors are: at most ``MAX_TENSORS`` tensors per role, names of at most
``MAX_NAME`` characters (longer ones are left out, as they would become label values), datatypes of at
most ``MAX_DATATYPE`` characters and shapes of rank at most ``MAX_RANK`` (the kinds ignore higher ranks).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from agent.dataplane.tap import TappedInference
from agent.detect.features import TensorSpec, choose_kinds

MAX_TENSORS = 16
MAX_NAME = 64
MAX_DATATYPE = 16
MAX_RANK = 8
SOURCES = ("metadata", "traffic")
REASONS = ("answered", "no_lookup", "unavailable", "unusable")

# metadata(model, version) -> a ModelMetadataResponse (or None: no answer); it may raise (no answer either).
Metadata = Callable[[str, str], Any]
Tensor = tuple[str, str, list[int]]


def traffic_tensors(tensors: Iterable[Any]) -> list[Tensor]:
    """A request's (or response's) tensors as metadata, the batch dimension dynamic."""
    return [(t.name, t.datatype, [-1, *list(t.shape)[1:]]) for t in list(tensors)[:MAX_TENSORS]
            if len(t.name) <= MAX_NAME]


def metadata_tensors(tensors: Iterable[Any]) -> list[Tensor]:
    """A ModelMetadataResponse's tensors within the bounds of the module docstring; a negative dimension is
    dynamic (-1)."""
    kept = []
    for t in list(tensors)[:MAX_TENSORS]:
        if not t.name or len(t.name) > MAX_NAME or len(t.datatype) > MAX_DATATYPE or len(t.shape) > MAX_RANK:
            continue
        kept.append((t.name, t.datatype, [int(d) if d >= 0 else -1 for d in t.shape]))
    return kept


class Question:
    """One ModelMetadata question in flight; ``ready()`` once answered or given up on."""

    def __init__(self, future: Future, give_up_seconds: float) -> None:
        self._future = future
        self._give_up_at = time.monotonic() + give_up_seconds

    def ready(self) -> bool:
        return self._future.done() or time.monotonic() >= self._give_up_at

    def answer(self) -> tuple[Any, str | None]:
        """(the response or None, why there is none)."""
        if not self._future.done():
            self._future.cancel()
            return None, "no answer in time"
        if self._future.cancelled():
            return None, "the question was cancelled (shutting down)"
        return self._future.result()


class MetadataLookup:
    """Asks ``metadata(model, version)`` on worker threads of its own, so that the tap thread never waits
    for the upstream. ``give_up_seconds`` bounds how long a question may stay unanswered (the call's own
    deadline plus the time it may wait for a worker)."""

    def __init__(self, metadata: Metadata, give_up_seconds: float, workers: int = 2) -> None:
        self._metadata = metadata
        self.give_up_seconds = give_up_seconds
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sidewatch-metadata")

    def _ask(self, model: str, version: str) -> tuple[Any, str | None]:
        try:
            response = self._metadata(model, version)
        except Exception as err:  # noqa: BLE001 - whatever the lookup raises, the traffic decides instead
            return None, str(err)[:300] or type(err).__name__
        return (response, None) if response is not None else (None, "no metadata")

    def ask(self, model: str, version: str) -> Question:
        return Question(self._pool.submit(self._ask, model, version), self.give_up_seconds)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class ChosenSpecs:
    """The specs of one version, where they came from (``source``, ``reason``: module docstring), and
    for the log line: ``detail`` (why not the metadata) and ``ignored`` (traffic tensors not watched)."""

    specs: list[TensorSpec]
    source: str
    reason: str
    detail: str = ""
    ignored: list[str] = field(default_factory=list)


def choose_specs(inference: TappedInference, overrides: Mapping[str, Any],
                 answer: tuple[Any, str | None] | None) -> ChosenSpecs:
    """The specs of a version from its metadata ``answer`` (None: not asked), else from ``inference``'s
    tensors (a copy with its response)."""
    inputs, outputs = inference.request.inputs, inference.response.outputs
    if answer is None:
        reason, detail = "no_lookup", ""
    else:
        response, failure = answer
        if response is None:
            reason, detail = "unavailable", failure or "no metadata"
        else:
            declared_in, declared_out = metadata_tensors(response.inputs), metadata_tensors(response.outputs)
            seen_in, seen_out = {t.name for t in inputs}, {t.name for t in outputs}
            if any(t[0] in seen_in for t in declared_in) or any(t[0] in seen_out for t in declared_out):
                ignored = sorted((seen_in - {t[0] for t in declared_in}) | (seen_out - {t[0] for t in declared_out}))
                return ChosenSpecs(choose_kinds(declared_in, declared_out, overrides), "metadata", "answered",
                                   ignored=[name[:MAX_NAME] for name in ignored[:MAX_TENSORS]])
            reason = "unusable"
            detail = ("the metadata names no tensor" if not declared_in and not declared_out
                      else "no tensor of the metadata is in the traffic")
    specs = choose_kinds(traffic_tensors(inputs), traffic_tensors(outputs), overrides)
    return ChosenSpecs(specs, "traffic", reason, detail)
