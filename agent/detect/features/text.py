"""Text inputs: BYTES (or str) tensors of one string per row, ``[N]`` or ``[N, 1]``.

Per row, at most ``max_chars`` characters are read (10,000 by default; at most four bytes a
character are decoded), at most ``max_tokens`` tokens are looked up. Continuous features:

``log_length``   ``log(1 + characters)``;
``letters``, ``digits``, ``whitespace``, ``punctuation``, ``non_ascii``   the shares of the characters
    that are ASCII letters, ASCII digits, whitespace (ASCII), other printable ASCII, and beyond ASCII
    (a text in another alphabet moves ``non_ascii`` and ``letters``);
``oov``          the share of the row's tokens (lower-cased runs of letters of any alphabet) that are
    not in the reference's vocabulary, a :class:`~agent.detect.features.block.HashedSet` of
    ``buckets`` bits (deterministic CRC-32 hashes); a row without tokens has 0.

and the scalar ``length`` (characters), whose reference-decile bins catch a change of the length's
distribution. An element that is not bytes or str, or bytes that are not UTF-8, makes the row
invalid; a numeric tensor raises :class:`~agent.detect.features.block.TensorShapeError`.

>>> import numpy as np
>>> ref = np.array([b"the cat sat on the mat", b"a dog ate the bone"] * 10, dtype=object)
>>> text = TextFeatures().fit(ref)
>>> block = text.transform(np.array([b"the cat ate", "\\u043a\\u043e\\u0442 ate", b"\\xff\\xfe", 3], dtype=object))
>>> block.valid.tolist(), block.scalars["length"].tolist()[:2]
([True, True, False, False], [11.0, 7.0])
>>> names = block.continuous_names
>>> [round(float(block.continuous[1, names.index(k)]), 2) for k in ("non_ascii", "oov")]
[0.43, 0.5]
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Self

import numpy as np

from agent.detect.features.block import FeatureBlock, HashedSet, TensorFeatures, TensorShapeError, as_items

MAX_CHARS = 10_000
_TOKEN = re.compile(r"[^\W\d_]+")      # runs of letters (any alphabet): numbers are not words
NAMES = ["log_length", "letters", "digits", "whitespace", "punctuation", "non_ascii", "oov"]

# Class of each ASCII code point: 0 other (control), 1 letter, 2 digit, 3 whitespace, 4 punctuation.
_ASCII_CLASS = np.zeros(128, dtype=np.int64)
_ASCII_CLASS[[ord(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]] = 1
_ASCII_CLASS[[ord(c) for c in "0123456789"]] = 2
_ASCII_CLASS[[ord(c) for c in " \t\n\r\v\f"]] = 3
_ASCII_CLASS[[c for c in range(33, 127) if not chr(c).isalnum()]] = 4


def read_text(item: Any, max_chars: int = MAX_CHARS) -> str | None:
    """At most ``max_chars`` characters of one element (bytes as UTF-8), or None if it is not text.

    >>> read_text(b"caf\\xc3\\xa9"), read_text("abc", 2), read_text(b"\\xff"), read_text(1.5)
    ('café', 'ab', None, None)
    """
    if isinstance(item, str):
        return item[:max_chars]
    if not isinstance(item, bytes | bytearray):
        return None
    raw = bytes(item[:4 * max_chars])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        # A character cut by the byte cap is not an error; anything else is.
        if len(item) <= len(raw) or err.start < len(raw) - 3:
            return None
        try:
            text = raw[:err.start].decode("utf-8")
        except UnicodeDecodeError:
            return None
    return text[:max_chars]


class TextFeatures(TensorFeatures):
    """Length, character mix and out-of-vocabulary rate of strings (module docstring)."""

    kind = "text"

    def __init__(self, max_chars: int = MAX_CHARS, max_tokens: int = 2000, buckets: int = 1 << 16) -> None:
        if not 1 <= max_chars <= 1_000_000 or not 1 <= max_tokens <= 100_000:
            raise ValueError("sidewatch: text max_chars must be 1 to 1e6 and max_tokens 1 to 1e5")
        self.max_chars = int(max_chars)
        self.max_tokens = int(max_tokens)
        self.buckets = int(buckets)
        self.vocabulary = HashedSet(self.buckets)

    def params(self) -> dict[str, Any]:
        return {"max_chars": self.max_chars, "max_tokens": self.max_tokens, "buckets": self.buckets}

    def _texts(self, x: Any) -> tuple[list[str | None], np.ndarray]:
        if isinstance(x, np.ndarray) and x.dtype.kind not in "OSU":
            raise TensorShapeError(f"sidewatch: text features need BYTES or strings, got an array of {x.dtype}")
        texts = [read_text(item, self.max_chars) for item in as_items(x)]
        return texts, np.fromiter((t is not None for t in texts), dtype=bool, count=len(texts))

    def _tokens(self, text: str) -> list[str]:
        tokens = []
        for match in _TOKEN.finditer(text.lower()):
            tokens.append(match.group())
            if len(tokens) >= self.max_tokens:
                break
        return tokens

    def fit(self, reference: Any) -> Self:
        texts, ok = self._texts(reference)
        self._enough(ok)
        self.vocabulary = HashedSet(self.buckets)
        for text in texts:
            if text is not None:
                self.vocabulary.add(self._tokens(text))
        self.fitted = True
        return self

    def transform(self, batch: Any) -> FeatureBlock:
        self._check_fitted()
        texts, ok = self._texts(batch)
        n = len(texts)
        features = np.full((n, len(NAMES)), np.nan)
        length = np.full(n, np.nan)
        for i, text in enumerate(texts):
            if text is None:
                continue
            chars = len(text)
            length[i] = chars
            features[i, 0] = np.log1p(chars)
            if chars:
                codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
                ascii_ = codes < 128
                counts = np.bincount(_ASCII_CLASS[codes[ascii_]], minlength=5)
                features[i, 1:5] = counts[1:5] / chars
                features[i, 5] = 1.0 - ascii_.sum() / chars
            else:
                features[i, 1:6] = 0.0
            tokens = self._tokens(text)
            features[i, 6] = 1.0 - self.vocabulary.contains(tokens).mean() if tokens else 0.0
        return FeatureBlock(valid=ok, continuous=features, continuous_names=list(NAMES), scalars={"length": length})

    def fitted_state(self) -> dict[str, Any]:
        return {"vocabulary": self.vocabulary.state_dict()}

    def load_fitted(self, state: Mapping[str, Any]) -> None:
        self.vocabulary = HashedSet.from_state(state["vocabulary"])
        if self.vocabulary.buckets != self.buckets:
            raise ValueError("sidewatch: text feature state: vocabulary size does not match buckets")
