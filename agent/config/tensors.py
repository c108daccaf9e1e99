"""Per-tensor overrides of the drift features a model's inputs and outputs get (not yet part of ServeConfig).

sidewatch chooses each tensor's feature kind from the model's metadata (agent/detect/features/choose.py);
an override, keyed by tensor name, changes the kind or its options::

    tensors:
      income:   {kind: numeric, columns: [age, income, debt]}
      country:  {kind: categorical, top_k: 10}
      pixels:   {layout: NHWC}
      logits:   {kind: classifier, output: logits}
      features: {kind: ignore}

An option that the (given) kind does not use is an error, so is a name or a list beyond its bound.

>>> TensorOverride(kind="numeric", columns=["age", "income"]).columns
['age', 'income']
>>> parse_tensor_overrides({"x": {"kind": "text", "layout": "NHWC"}})
Traceback (most recent call last):
...
agent.config.base.ConfigError: tensors.x: layout applies to kind image, not text
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping

from pydantic import Field, StringConstraints, ValidationError, model_validator

from agent.config.base import ConfigError, Strict

KINDS = ("numeric", "categorical", "image", "text", "classifier", "regression", "score", "embedding", "ignore")
Kind = Literal["numeric", "categorical", "image", "text", "classifier", "regression", "score", "embedding", "ignore"]
Name = Annotated[str, StringConstraints(min_length=1, max_length=64)]

# Which kinds each option applies to.
OPTION_KINDS: dict[str, tuple[str, ...]] = {
    "columns": ("numeric", "categorical"),
    "layout": ("image",),
    "grid": ("image",),
    "top_k": ("categorical", "classifier"),
    "output": ("classifier",),
    "max_chars": ("text",),
    "projections": ("embedding",),
    "threshold": ("score",),
}
MAX_TENSORS = 256


class TensorOverride(Strict):
    """How one tensor is watched. Every field is optional; an unset one keeps the chosen default."""

    kind: Kind | None = None
    columns: list[Name] | None = Field(default=None, min_length=1, max_length=256)
    layout: Literal["NCHW", "NHWC"] | None = None
    grid: int | None = Field(default=None, ge=1, le=32)
    top_k: int | None = Field(default=None, ge=1, le=100)
    output: Literal["probabilities", "logits"] | None = None
    max_chars: int | None = Field(default=None, ge=1, le=1_000_000)
    projections: int | None = Field(default=None, ge=1, le=64)
    threshold: float | None = None

    @model_validator(mode="after")
    def _options_fit_kind(self) -> TensorOverride:
        if self.kind is None:
            return self
        for option, kinds in OPTION_KINDS.items():
            if getattr(self, option) is not None and self.kind not in kinds:
                raise ValueError(f"{option} applies to kind {' or '.join(kinds)}, not {self.kind}")
        return self

    def options(self) -> dict[str, Any]:
        """The options that are set (``kind`` excepted)."""
        return {k: v for k, v in self.model_dump(exclude={"kind"}).items() if v is not None}


def parse_tensor_overrides(raw: Mapping[str, Any] | None, where: str = "tensors") -> dict[str, TensorOverride]:
    """``{tensor name: override}`` from a mapping; a :class:`ConfigError` naming the key for anything bad."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or len(raw) > MAX_TENSORS:
        raise ConfigError(f"{where}: expected a mapping of at most {MAX_TENSORS} tensor names to overrides")
    out = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not 1 <= len(name) <= 256:
            raise ConfigError(f"{where}: tensor names must be strings of 1 to 256 characters, got {name!r}")
        if isinstance(value, TensorOverride):
            out[name] = value
            continue
        try:
            out[name] = TensorOverride.model_validate(value)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            message = str(first["msg"]).removeprefix("Value error, ")
            raise ConfigError(f"{where}.{name}{'.' + loc if loc else ''}: {message}") from None
    return out
