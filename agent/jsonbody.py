"""JSON request bodies from callers that may be hostile: one parser for every endpoint that takes JSON.

``json.loads`` raises more than ``ValueError``: a body nested deeper than the interpreter's recursion limit
(100,000 ``[``) raises ``RecursionError``, which a handler catching ``ValueError`` lets through as an
internal error. :func:`parse_json_body` turns every way a body can fail to parse into :class:`BadBody`,
so the caller answers 400 and counts it. It imports nothing else of the package.
"""

from __future__ import annotations

import json


class BadBody(ValueError):
    """The body is not JSON (bad bytes, bad syntax, nested too deep, a number too long), or not of the
    shape the endpoint takes."""


def parse_json_body(body: bytes, shape: type | None = dict):
    """The body's JSON value; raises :class:`BadBody` when it cannot be parsed, or when ``shape`` is given
    and the value is not an instance of it (a JSON object by default).

    >>> parse_json_body(b'{"model": "mnist"}')
    {'model': 'mnist'}
    >>> parse_json_body(b"[" * 100_000)
    Traceback (most recent call last):
    ...
    agent.jsonbody.BadBody: not JSON: nested too deep
    """
    try:
        value = json.loads(body)
    except RecursionError:
        raise BadBody("not JSON: nested too deep") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, bad UTF-8, a number over the digit limit
        raise BadBody(f"not JSON: {str(err)[:200]}") from None
    if shape is not None and not isinstance(value, shape):
        raise BadBody(f"the body must be a JSON {'object' if shape is dict else shape.__name__}")
    return value
