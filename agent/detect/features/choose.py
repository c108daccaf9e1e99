"""Choosing each tensor's feature kind from the model's metadata, and the features of a whole model.

:func:`choose_kind` takes what ``ModelMetadataResponse.TensorMetadata`` says (name, datatype, shape;
the first axis is the batch, ``-1`` a dimension of any size) and an optional override
(:class:`agent.config.tensors.TensorOverride` or a plain dict of its fields). The rules, first match wins:

==========  ============================================  ===============================================
role        metadata                                      kind
==========  ============================================  ===============================================
any         an override with ``kind``                     that kind (``ignore``: no features)
input       BYTES                                         ``text`` (``categorical`` only by override)
input       BOOL                                          ``categorical``
input       numeric, rank 4                               ``image`` (layout guessed, or the override's)
input       numeric, rank 3                               ``image`` ``[N, H, W]``, one channel
input       numeric, rank 1, or rank 2 with F <= 64       ``numeric`` (INT too: ``categorical`` by override)
input       FP*, rank 2, F > 64 or unknown (-1)           ``embedding``
input       INT*, rank 2, F unknown (-1)                  ``ignore`` (token ids need the model's tokenizer)
input       INT*, rank 2, F > 64                          ``embedding``
output      BYTES, BOOL or INT*, rank 1 or ``[N, 1]``     ``categorical`` (predicted labels)
output      FP*, rank 1 or ``[N, 1]``                     ``regression`` (``score`` by override)
output      FP*, rank 2, K >= 2 or unknown                ``classifier`` (probabilities or logits: at fit)
any         an empty shape (unknown rank)                 decided at fit from the reference's shape
any         anything else                                 ``ignore``
==========  ============================================  ===============================================

:class:`ModelFeatures` holds one kind's features per tensor, fits them on reference tensors (by role)
and gives one merged :class:`~agent.detect.features.block.FeatureBlock` per role and batch, names
prefixed by the tensor name: the ``inputs`` and ``outputs`` parts of a model's drift tests.

>>> import numpy as np
>>> specs = choose_kinds(inputs=[("x", "FP32", [-1, 4]), ("note", "BYTES", [-1])],
...                      outputs=[("proba", "FP32", [-1, 3])], overrides={"note": {"kind": "categorical"}})
>>> [(s.role, s.name, s.kind) for s in specs]
[('input', 'x', 'numeric'), ('input', 'note', 'categorical'), ('output', 'proba', 'classifier')]
>>> rng = np.random.default_rng(0)
>>> model = ModelFeatures(specs).fit("input", {"x": rng.normal(size=(50, 4)),
...                                            "note": np.array([b"a", b"b"] * 25, dtype=object)})
>>> block = model.transform("input", {"x": rng.normal(size=(2, 4)), "note": np.array([b"a", b"z"], dtype=object)})
>>> block.continuous_names[:2], block.shares["note.category=<unseen>"].tolist()
(['x.col_0', 'x.col_1'], [0.0, 1.0])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Self

import numpy as np

from agent.config.tensors import TensorOverride
from agent.detect.features.block import (
    FeatureBlock,
    TensorFeatures,
    TensorShapeError,
    features_from_state,
    merge_blocks,
)
from agent.detect.features.categorical import CategoricalFeatures
from agent.detect.features.embedding import EmbeddingFeatures
from agent.detect.features.image import ImageFeatures, guess_layout
from agent.detect.features.outputs import ClassifierOutput, ValueOutput
from agent.detect.features.tabular import NumericFeatures
from agent.detect.features.text import TextFeatures

WIDE = 64           # more columns than this: an embedding, not a table
STATE_KIND = "sidewatch-model-features"
FORMAT_VERSION = 1
ROLES = ("input", "output")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's kind and options (the override's, plus what metadata fixed) and why it was chosen."""

    name: str
    role: str
    datatype: str
    shape: tuple[int, ...]
    kind: str | None            # None: decided at fit from the reference's shape
    options: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "datatype": self.datatype, "shape": list(self.shape),
                "kind": self.kind, "options": dict(self.options), "reason": self.reason}


def _override(value: Any) -> TensorOverride:
    if value is None:
        return TensorOverride()
    return value if isinstance(value, TensorOverride) else TensorOverride.model_validate(value)


def choose_kind(name: str, datatype: str, shape: Iterable[int], role: str = "input",
                override: TensorOverride | Mapping[str, Any] | None = None) -> TensorSpec:
    """The kind of one tensor by the rules of the module docstring.

    >>> choose_kind("img", "UINT8", [-1, 224, 224, 3]).options
    {'layout': 'NHWC'}
    >>> choose_kind("y", "FP64", [-1, 1], role="output").kind, choose_kind("e", "FP32", [-1, 768]).kind
    ('regression', 'embedding')
    """
    if role not in ROLES:
        raise ValueError(f"sidewatch: role must be one of {ROLES}, got {role!r}")
    over = _override(override)
    options = over.options()
    shape = tuple(int(d) for d in shape)
    rank = len(shape)
    numeric = datatype.startswith(("FP", "INT", "UINT", "BF"))
    floating = datatype.startswith(("FP", "BF"))
    width = shape[1] if rank >= 2 else 1

    def spec(kind: str | None, reason: str) -> TensorSpec:
        if kind == "image" and "layout" not in options and rank == 4:
            options["layout"] = guess_layout(shape)
        return TensorSpec(name, role, datatype, shape, kind, options, reason)

    if over.kind is not None:
        return spec(over.kind, "override")
    if rank == 0:
        return spec(None, "no shape in the metadata: decided from the reference")
    if role == "input":
        if datatype == "BYTES":
            return spec("text", "BYTES input") if rank <= 2 and width in (1, -1) else spec("ignore", "BYTES of rank > 1")
        if datatype == "BOOL":
            return spec("categorical", "BOOL input") if rank <= 2 and 0 < width <= 16 else spec("ignore", "wide BOOL")
        if not numeric:
            return spec("ignore", f"datatype {datatype}")
        if rank == 4:
            return spec("image", "numeric input of rank 4")
        if rank == 3:
            return spec("image", "numeric input of rank 3: [N, H, W]")
        if rank == 1 or (rank == 2 and 0 < width <= WIDE):
            return spec("numeric", f"numeric input of {width} column(s)")
        if rank == 2 and floating:
            return spec("embedding", f"float input of {width if width > 0 else 'any number of'} columns")
        if rank == 2 and width > WIDE:
            return spec("embedding", f"integer input of {width} columns")
        return spec("ignore", "integer input of any width (token ids?) or rank > 4")
    if datatype in ("BYTES", "BOOL") or (numeric and not floating):
        if rank == 1 or (rank == 2 and width == 1):
            return spec("categorical", f"{datatype} output: predicted labels")
        return spec("ignore", f"{datatype} output of shape {list(shape)}")
    if floating and (rank == 1 or (rank == 2 and width == 1)):
        return spec("regression", "one float per row")
    if floating and rank == 2:
        return spec("classifier", "float output of K classes")
    return spec("ignore", f"{datatype} output of shape {list(shape)}")


def _fields(tensor: Any) -> tuple[str, str, list[int]]:
    if isinstance(tensor, Mapping):
        return str(tensor["name"]), str(tensor["datatype"]), list(tensor.get("shape", []))
    if isinstance(tensor, tuple | list):
        name, datatype, shape = tensor
        return str(name), str(datatype), list(shape)
    return str(tensor.name), str(tensor.datatype), list(tensor.shape)


def choose_kinds(inputs: Iterable[Any] = (), outputs: Iterable[Any] = (),
                 overrides: Mapping[str, Any] | None = None) -> list[TensorSpec]:
    """Specs of every input then every output. A tensor is ``(name, datatype, shape)``, a mapping with
    those keys, or a ``TensorMetadata`` message; ``overrides`` is keyed by tensor name (an override
    named like both an input and an output applies to both)."""
    overrides = overrides or {}
    specs = []
    for role, tensors in (("input", inputs), ("output", outputs)):
        for tensor in tensors:
            name, datatype, shape = _fields(tensor)
            specs.append(choose_kind(name, datatype, shape, role, overrides.get(name)))
    return specs


def make_features(kind: str, options: Mapping[str, Any] | None = None) -> TensorFeatures | None:
    """Unfitted features of a kind with an override's options (None for ``ignore``)."""
    o = dict(options or {})
    if kind == "ignore":
        return None
    if kind == "numeric":
        return NumericFeatures(columns=o.get("columns"))
    if kind == "categorical":
        return CategoricalFeatures(top_k=o.get("top_k", 20), columns=o.get("columns"))
    if kind == "image":
        return ImageFeatures(grid=o.get("grid", 7), layout=o.get("layout"))
    if kind == "text":
        return TextFeatures(max_chars=o.get("max_chars", 10_000))
    if kind == "classifier":
        return ClassifierOutput(output=o.get("output"), top_k=o.get("top_k", 20))
    if kind == "regression":
        return ValueOutput()
    if kind == "score":
        return ValueOutput(score=True, threshold=o.get("threshold", 0.5))
    if kind == "embedding":
        return EmbeddingFeatures(k=o.get("projections", 16))
    raise ValueError(f"sidewatch: unknown feature kind {kind!r}")


class ModelFeatures:
    """The features of every watched tensor of one model (module docstring).

    ``fit(role, tensors)`` fits the tensors of one role (``input`` or ``output``) on reference arrays
    ``{name: array}`` (a tensor of that role missing from them is left out and its spec becomes
    ``ignore``: ``skipped`` says why); ``transform(role, tensors)`` gives one merged block. A watched
    tensor missing from a live batch makes every row of the batch invalid; one of the wrong shape raises
    :class:`~agent.detect.features.block.TensorShapeError` (count it, skip the batch).
    """

    def __init__(self, specs: Iterable[TensorSpec]) -> None:
        self.specs = list(specs)
        self.features: dict[str, dict[str, TensorFeatures]] = {role: {} for role in ROLES}
        self.skipped: dict[str, str] = {}

    def fit(self, role: str, tensors: Mapping[str, Any]) -> Self:
        fitted: dict[str, TensorFeatures] = {}
        for i, spec in enumerate(self.specs):
            if spec.role != role:
                continue
            if spec.name not in tensors:
                self.skipped[spec.name] = "not in the reference"
                continue
            kind = spec.kind
            if kind is None:
                shape = (-1, *np.shape(tensors[spec.name])[1:])
                chosen = choose_kind(spec.name, spec.datatype, shape, role, TensorOverride(**spec.options))
                self.specs[i] = spec = TensorSpec(spec.name, role, spec.datatype, spec.shape, chosen.kind,
                                                  chosen.options, chosen.reason + " (from the reference's shape)")
                kind = spec.kind
            features = make_features(kind, spec.options)
            if features is not None:
                fitted[spec.name] = features.fit(tensors[spec.name])
        if not fitted:
            raise ValueError(f"sidewatch: no {role} tensor to watch")
        self.features[role] = fitted
        return self

    def transform(self, role: str, tensors: Mapping[str, Any]) -> FeatureBlock:
        fitted = self.features[role]
        if not fitted:
            raise ValueError(f"sidewatch: no {role} features fitted")
        present = {name: f.transform(tensors[name]) for name, f in fitted.items() if name in tensors}
        if len(present) < len(fitted):
            n = next((b.n_rows for b in present.values()), 0)
            absent = {name: _absent(f, n) for name, f in fitted.items() if name not in tensors}
            present = {name: present.get(name, absent.get(name)) for name in fitted}
        return merge_blocks(present)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": STATE_KIND, "format_version": FORMAT_VERSION, "specs": [s.as_dict() for s in self.specs],
                "skipped": dict(self.skipped),
                "features": {role: {name: f.state_dict() for name, f in fitted.items()}
                             for role, fitted in self.features.items()}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ModelFeatures:
        if state.get("kind") != STATE_KIND or state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"sidewatch: not a {STATE_KIND} state of format {FORMAT_VERSION}")
        specs = [TensorSpec(s["name"], s["role"], s["datatype"], tuple(s["shape"]), s["kind"], dict(s["options"]),
                            s.get("reason", "")) for s in state["specs"]]
        model = cls(specs)
        model.skipped = dict(state.get("skipped", {}))
        model.features = {role: {name: features_from_state(f) for name, f in state["features"].get(role, {}).items()}
                          for role in ROLES}
        return model


def _absent(features: TensorFeatures, n: int) -> FeatureBlock:
    """The block of a tensor missing from a batch of ``n`` rows: its features' names, every row invalid."""
    try:
        dtype = object if isinstance(features, TextFeatures) else np.float64
        template = features.transform(np.zeros((0,) + _template_shape(features), dtype=dtype))
    except (TensorShapeError, ValueError):
        return FeatureBlock(valid=np.zeros(n, dtype=bool))
    block = template.select(np.zeros(0, dtype=np.int64))
    nan = np.full(n, np.nan)
    return FeatureBlock(valid=np.zeros(n, dtype=bool),
                        continuous=None if block.continuous is None else np.full((n, block.continuous.shape[1]), np.nan),
                        continuous_names=block.continuous_names, scalars={k: nan.copy() for k in block.scalars},
                        classes=None if block.classes is None else np.full(n, -1), n_classes=block.n_classes,
                        class_names=block.class_names, shares={k: nan.copy() for k in block.shares},
                        share_groups=block.share_groups)


def _template_shape(features: TensorFeatures) -> tuple[int, ...]:
    if isinstance(features, NumericFeatures):
        return (len(features.columns),)
    if isinstance(features, CategoricalFeatures):
        return (len(features.columns),)
    if isinstance(features, ImageFeatures):
        return (features.channels, 1, 1) if features.layout == "NCHW" else (1, 1, features.channels)
    if isinstance(features, ClassifierOutput):
        return (features.n_outputs,)
    if isinstance(features, EmbeddingFeatures):
        return (features.dim,)
    return ()
