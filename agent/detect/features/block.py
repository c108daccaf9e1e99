"""What every tensor kind returns (:class:`FeatureBlock`), the kinds' shared base, and the helpers that
read client data safely and feed blocks to :class:`~agent.detect.drift.moments.MomentFeatures`.

A block holds, per row of a batch, features in the four shapes MomentFeatures tests:

``continuous [n, D]``  columns whose means (and, through squared projections, covariances) are tested;
``scalars {name: [n]}`` values whose distribution is tested through reference-decile bins;
``classes [n]``         one class id per row (``n_classes`` classes, ``class_names``), tested as class shares;
``shares {name: [n]}``  values in [0, 1] whose means are rates (missing values, a category's share,
                        unseen categories), tested with a binomial scale, grouped by ``share_groups``.

``valid [n]`` says which rows could be read. An invalid row has NaN in every feature (class ``-1``):
MomentFeatures makes its moment row NaN, and :class:`~agent.detect.drift.moments.MomentTest` skips it,
so bad input is counted (``(~valid).sum()``) but never moves a mean. :meth:`FeatureBlock.moment_inputs`
gives the keyword arguments of ``MomentFeatures.fit`` / ``transform`` (``fit_moments`` and ``moment_rows``
in :mod:`agent.detect.drift.blocks` do both in one call); :func:`merge_blocks` joins the blocks of a model's
tensors, names prefixed by the tensor's name. This package imports numpy and the config layer only.

>>> import numpy as np
>>> a = FeatureBlock(valid=np.array([True, False]), continuous=np.array([[1.0], [np.nan]]),
...                  continuous_names=["x"], shares={"missing": np.array([0.0, np.nan])})
>>> b = FeatureBlock(valid=np.array([True, True]), classes=np.array([1, 0]), n_classes=2)
>>> merged = merge_blocks({"age": a, "out": b})
>>> merged.continuous_names, sorted(merged.shares), merged.valid.tolist()
(['age.x'], ['age.missing', 'out.class_0', 'out.class_1'], [True, False])
>>> merged.share_groups["out.class_1"], merged.n_rows
('out.class_mix', 2)
"""

from __future__ import annotations

import base64
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Self

import numpy as np

FORMAT_VERSION = 1
# Bounds on what a client controls.
MAX_NUMBER_CHARS = 64          # a number sent as a string is parsed only if at most this long
MAX_NAME_CHARS = 64            # tensor, column and category names in feature names
MAX_ROWS_PARSED = 1 << 20      # elements parsed one by one (strings where numbers are expected)
_NAME_RE = re.compile(r"[^0-9A-Za-z_.:=<>+-]")


class TensorShapeError(ValueError):
    """A whole tensor cannot be read as its kind: wrong rank, wrong number of columns or channels, an
    unsupported datatype. Rows that are merely bad (NaN, a string where a number is expected,
    undecodable text) never raise: they come back with ``valid=False``."""


def clean_name(name: Any, limit: int = MAX_NAME_CHARS) -> str:
    """A bounded, printable feature-name part: characters outside ``[0-9A-Za-z_.:=<>+-]`` become ``_``.

    >>> clean_name("weight (kg)"), clean_name("x" * 100)[-3:], len(clean_name("x" * 100))
    ('weight__kg_', 'xxx', 64)
    """
    return _NAME_RE.sub("_", str(name))[:limit]


@dataclass(eq=False)
class FeatureBlock:
    """Features of one batch (module docstring). Arrays have one entry per row; ``n_rows`` is ``len(valid)``."""

    valid: np.ndarray
    continuous: np.ndarray | None = None
    continuous_names: list[str] = field(default_factory=list)
    scalars: dict[str, np.ndarray] = field(default_factory=dict)
    classes: np.ndarray | None = None
    n_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    shares: dict[str, np.ndarray] = field(default_factory=dict)
    share_groups: dict[str, str] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return int(len(self.valid))

    @property
    def n_invalid(self) -> int:
        return int((~self.valid).sum())

    def class_label(self, k: int) -> str:
        return self.class_names[k] if k < len(self.class_names) else f"class_{k}"

    def class_shares(self) -> dict[str, np.ndarray]:
        """``classes`` as one-hot shares ``{class name: [n]}`` (NaN for invalid rows)."""
        if self.classes is None or not self.n_classes:
            return {}
        c = np.asarray(self.classes)
        out = {}
        for k in range(self.n_classes):
            share = (c == k).astype(np.float64)
            share[~self.valid] = np.nan
            out[self.class_label(k)] = share
        return out

    def select(self, rows: np.ndarray) -> FeatureBlock:
        """The block of the rows ``rows`` (a boolean mask or indices)."""
        return FeatureBlock(
            valid=self.valid[rows], continuous=None if self.continuous is None else self.continuous[rows],
            continuous_names=list(self.continuous_names), scalars={k: v[rows] for k, v in self.scalars.items()},
            classes=None if self.classes is None else self.classes[rows], n_classes=self.n_classes,
            class_names=list(self.class_names), shares={k: v[rows] for k, v in self.shares.items()},
            share_groups=dict(self.share_groups))

    def moment_inputs(self, fitting: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``MomentFeatures.transform`` (``fitting=True``: for ``fit``, invalid rows
        left out, names and groups added). Classes become shares named by :attr:`class_names` in the group
        ``class_mix``, so that several blocks with classes can share one MomentFeatures."""
        block = self.select(self.valid) if fitting else self
        shares = dict(block.shares)
        groups = dict(block.share_groups)
        for name, share in block.class_shares().items():
            shares[name] = share
            groups.setdefault(name, "class_mix")
        out: dict[str, Any] = {}
        if block.continuous is not None and block.continuous.shape[1]:
            out["continuous"] = block.continuous
            if fitting:
                out["continuous_names"] = list(block.continuous_names)
        if block.scalars:
            out["scalars"] = dict(block.scalars)
        if shares:
            out["shares"] = shares
            if fitting:
                out["share_groups"] = {name: groups.get(name, name) for name in shares}
        return out


def merge_blocks(blocks: Mapping[str, FeatureBlock]) -> FeatureBlock:
    """One block from the blocks of several tensors of one batch (same rows): every name prefixed by
    ``"<tensor>."``, classes turned into shares (group ``<tensor>.class_mix``), ``valid`` where every
    tensor's row is valid. Raises :class:`TensorShapeError` if the blocks differ in rows."""
    sizes = {name: b.n_rows for name, b in blocks.items()}
    if len(set(sizes.values())) > 1:
        raise TensorShapeError(f"sidewatch: tensors of one batch differ in rows: {sizes}")
    n = next(iter(sizes.values()), 0)
    valid = np.ones(n, dtype=bool)
    continuous, names = [], []
    scalars: dict[str, np.ndarray] = {}
    shares: dict[str, np.ndarray] = {}
    groups: dict[str, str] = {}
    for tensor, b in blocks.items():
        prefix = clean_name(tensor) + "."
        valid &= b.valid
        if b.continuous is not None and b.continuous.shape[1]:
            continuous.append(b.continuous)
            names += [prefix + c for c in b.continuous_names]
        scalars.update({prefix + k: v for k, v in b.scalars.items()})
        for k, v in b.shares.items():
            shares[prefix + k] = v
            groups[prefix + k] = prefix + b.share_groups.get(k, k)
        for k, v in b.class_shares().items():
            shares[prefix + k] = v
            groups[prefix + k] = prefix + "class_mix"
    return FeatureBlock(valid=valid, continuous=np.concatenate(continuous, axis=1) if continuous else None,
                        continuous_names=names, scalars=scalars, shares=shares, share_groups=groups)


# --- the kinds' base ----------------------------------------------------------------------------

KINDS: dict[str, type[TensorFeatures]] = {}


class TensorFeatures:
    """The shape every kind has: parameters in the constructor, ``fit(reference) -> self`` (invalid rows
    ignored; at least ``MIN_ROWS`` valid rows needed), ``transform(batch) -> FeatureBlock``,
    ``state_dict()`` (JSON-safe) and ``from_state(state)`` (exact round trip)."""

    kind: ClassVar[str] = ""
    MIN_ROWS: ClassVar[int] = 10

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            KINDS[cls.kind] = cls

    fitted: bool = False

    def fit(self, reference: Any) -> Self:  # pragma: no cover - every kind has its own
        raise NotImplementedError

    def transform(self, batch: Any) -> FeatureBlock:  # pragma: no cover
        raise NotImplementedError

    def params(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def fitted_state(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def load_fitted(self, state: Mapping[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        if not self.fitted:
            raise ValueError(f"sidewatch: {self.kind} features are not fitted")
        return {"kind": self.kind, "format_version": FORMAT_VERSION, "params": self.params(),
                "fitted": self.fitted_state()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Self:
        if state.get("kind") != cls.kind or state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"sidewatch: not a {cls.kind} feature state of format {FORMAT_VERSION}: "
                             f"kind={state.get('kind')!r}, format_version={state.get('format_version')!r}")
        features = cls(**state["params"])
        features.load_fitted(state["fitted"])
        features.fitted = True
        return features

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise ValueError(f"sidewatch: {self.kind} features are not fitted")

    def _enough(self, valid: np.ndarray) -> None:
        if int(valid.sum()) < self.MIN_ROWS:
            raise ValueError(f"sidewatch: {self.kind} features need at least {self.MIN_ROWS} valid reference "
                             f"rows, got {int(valid.sum())}")


def features_from_state(state: Mapping[str, Any]) -> TensorFeatures:
    """Any kind's features from its :meth:`TensorFeatures.state_dict`."""
    cls = KINDS.get(str(state.get("kind")))
    if cls is None:
        raise ValueError(f"sidewatch: unknown feature kind {state.get('kind')!r}")
    return cls.from_state(state)


def empty_block(n: int) -> FeatureBlock:
    return FeatureBlock(valid=np.zeros(n, dtype=bool))


# --- reading client data ------------------------------------------------------------------------

def _parse_number(value: Any) -> float | None:
    """A float from a number or a short numeric string; None if it is not one."""
    if isinstance(value, (bool, int, float, np.number, np.bool_)):
        return float(value)
    if isinstance(value, bytes | bytearray | str) and len(value) <= MAX_NUMBER_CHARS:
        try:
            return float(value)
        except ValueError:
            return None
    if value is None:
        return math.nan
    return None


def as_numbers(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(values float64, readable [n] bool)`` of a batch whose first axis is rows. Numeric arrays convert
    directly; object or string arrays are parsed element by element (a short numeric string counts, None
    is NaN), and a row with an element that is not a number is unreadable (its values NaN). Raises
    :class:`TensorShapeError` for a scalar, a complex array, or too many elements to parse one by one.

    >>> values, ok = as_numbers(np.array([[1, "2.5"], [b"x", 3]], dtype=object))
    >>> values.tolist()[0], ok.tolist()
    ([1.0, 2.5], [True, False])
    """
    a = x if isinstance(x, np.ndarray) else np.asarray(x, dtype=object if _ragged(x) else None)
    if a.ndim == 0:
        raise TensorShapeError("sidewatch: expected a batch (first axis: rows), got a scalar")
    if a.dtype.kind in "biuf":
        return a.astype(np.float64, copy=False), np.ones(a.shape[0], dtype=bool)
    if a.dtype.kind not in "OSU":
        raise TensorShapeError(f"sidewatch: cannot read numbers from an array of {a.dtype}")
    if a.size > MAX_ROWS_PARSED:
        raise TensorShapeError(f"sidewatch: {a.size} elements to parse one by one: more than {MAX_ROWS_PARSED}")
    flat = a.reshape(-1)
    values = np.empty(flat.shape[0], dtype=np.float64)
    bad = np.zeros(flat.shape[0], dtype=bool)
    for i, item in enumerate(flat.tolist()):
        v = _parse_number(item)
        if v is None:
            bad[i], values[i] = True, math.nan
        else:
            values[i] = v
    values = values.reshape(a.shape)
    ok = ~bad.reshape(a.shape[0], -1).any(axis=1) if a.shape[0] else np.ones(0, dtype=bool)
    values[~ok] = np.nan
    return values, ok


def _ragged(x: Any) -> bool:
    """Whether a nested list is ragged (numpy refuses it without dtype=object)."""
    try:
        np.asarray(x)
    except ValueError:
        return True
    return False


def as_items(x: Any) -> list[Any]:
    """The rows of a batch of one element per row (``[n]`` or ``[n, 1]``) as Python objects. Raises
    :class:`TensorShapeError` for other shapes."""
    a = x if isinstance(x, np.ndarray) else np.asarray(x, dtype=object if _ragged(x) else None)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise TensorShapeError(f"sidewatch: expected one element per row ([n] or [n, 1]), got shape {a.shape}")
    return a.tolist()


# --- a bounded hashed set (deterministic, not Python's randomised hash) ----------------------------

class HashedSet:
    """A set of strings kept as a bitmap of ``buckets`` bits (a power of two): :meth:`contains` may say yes
    for a string never added (about the share of bits set, :attr:`fill`), never no for one added. Its size
    does not depend on how many strings were added. Hash: ``zlib.crc32`` of the UTF-8 bytes (the low bits).

    >>> s = HashedSet(1 << 10)
    >>> s.add(["apple", "pear"])
    >>> s.contains(["apple", "plum"]).tolist(), HashedSet.from_state(s.state_dict()).contains(["pear"]).tolist()
    ([True, False], [True])
    """

    def __init__(self, buckets: int = 1 << 16) -> None:
        if buckets < 8 or buckets & (buckets - 1) or buckets > 1 << 24:
            raise ValueError("sidewatch: buckets must be a power of two between 8 and 2**24")
        self.buckets = int(buckets)
        self.bits = np.zeros(self.buckets, dtype=bool)

    def _index(self, items: list[str]) -> np.ndarray:
        mask = self.buckets - 1
        return np.fromiter((zlib.crc32(s.encode("utf-8", "surrogatepass")) & mask for s in items),
                           dtype=np.int64, count=len(items))

    def add(self, items: list[str]) -> None:
        self.bits[self._index(list(items))] = True

    def contains(self, items: list[str]) -> np.ndarray:
        return self.bits[self._index(list(items))]

    @property
    def fill(self) -> float:
        return float(self.bits.mean())

    def state_dict(self) -> dict[str, Any]:
        return {"buckets": self.buckets, "bitmap": base64.b64encode(np.packbits(self.bits).tobytes()).decode("ascii")}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> HashedSet:
        s = cls(int(state["buckets"]))
        packed = np.frombuffer(base64.b64decode(state["bitmap"]), dtype=np.uint8)
        if packed.size * 8 != s.buckets:
            raise ValueError("sidewatch: hashed set: bitmap size does not match buckets")
        s.bits = np.unpackbits(packed).astype(bool)
        return s
