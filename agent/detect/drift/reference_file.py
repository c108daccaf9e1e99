"""A drift reference read from a file (``models.<name>.reference``), for a model sidewatch cannot run.

A model version with such a file does not learn its baseline from traffic: at its first request (when the
request and the response say which tensors it has) its baseline is fitted from the file, by the same path
as a baseline learned from traffic (agent/detect/drift/baseline.py), and it is watched at once.

Formats, by suffix; every tensor of a file has the same number of rows (its first axis):

``.npz``    one array per tensor name (``numpy.savez``). Strings as ``S`` or ``U`` arrays (read as BYTES);
            object arrays are refused (reading them would unpickle).
``.csv``    a header row, then one row per row of the reference. A column ``T`` is tensor ``T`` of shape
            ``[N]``; columns ``T[0]``, ``T[1]``, ... (every index from 0, in any order) are the columns of a
            2-D tensor ``T``. A tensor whose every non-empty cell is a number is FP64 (an empty cell is NaN,
            a missing value); a tensor with any other cell is BYTES, every cell its UTF-8 bytes (a numeric
            model tensor then reads the numbers and leaves out the rows with a cell that is not one, as it
            does for live rows). To give numbers as BYTES, use ``.jsonl`` strings or ``.npz``.
``.jsonl``  one JSON object per line, ``{tensor: number | string | list}``, every line with the same keys;
            each tensor is its values stacked (a string is BYTES, a nested list a tensor of higher rank).
            Blank lines are skipped.

A key ``input:T`` or ``output:T`` is tensor ``T`` of that role only (for a name that is both an input and
an output); a bare ``T`` is every tensor of that name. Output tensors are optional: without any, only the
inputs are watched. Tensors of the file that the model does not have are left out (a log line says so).

A file larger than :data:`MAX_BYTES` (also uncompressed, for ``.npz``) is refused. Every problem (missing,
unreadable, another suffix, a malformed line, ragged columns or rows) is a
:class:`~agent.config.ConfigError` that names the key, the file and, for text formats, the line; it fails
``sidewatch serve`` at start and ``--check-config``.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "ref.csv"
>>> _ = path.write_text("x[0],x[1],label\\n1,2,a\\n3,,b\\n")
>>> tensors = read_reference(path, "models.m.reference")
>>> tensors["x"].tolist(), tensors["label"].tolist()
([[1.0, 2.0], [3.0, nan]], [b'a', b'b'])
>>> split_roles(tensors, inputs={"x"}, outputs={"label", "y"})["output"]["label"].tolist()
[b'a', b'b']
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from agent.config import ConfigError, ModelSettings

# The largest reference file read (uncompressed, for .npz): it is held in memory until the version's first
# request, and again when an operator resets the baseline.
MAX_BYTES = 256 * 1024 * 1024
MAX_TENSORS = 256
MAX_NAME = 256
SUFFIXES = (".npz", ".csv", ".jsonl")
ROLE_PREFIXES = ("input:", "output:")
_COLUMN = re.compile(r"^(?P<name>.+)\[(?P<index>\d+)\]$")


def reference_key(model: str) -> str:
    return f"models.{model}.reference"


def read_references(models: Mapping[str, ModelSettings]) -> dict[str, dict[str, np.ndarray]]:
    """``{model: {key: array}}`` of every model with ``reference`` set; a ConfigError for any bad file."""
    return {name: read_reference(settings.reference, reference_key(name))
            for name, settings in models.items() if settings.reference is not None}


def read_reference(path: Path | str, key: str) -> dict[str, np.ndarray]:
    """The tensors of one reference file, ``{key as written: array}`` (module docstring)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise _error(key, path, f"the suffix must be one of {', '.join(SUFFIXES)}, not {suffix or '(none)'!r}")
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise _error(key, path, "not a file")
        if size > MAX_BYTES:
            raise _error(key, path, f"{size} bytes: more than the {MAX_BYTES} a reference may have")
        if suffix == ".npz":
            tensors = _read_npz(path, key)
        else:
            text = path.read_bytes().decode("utf-8")
            tensors = _read_csv(text, path, key) if suffix == ".csv" else _read_jsonl(text, path, key)
    except OSError as err:
        raise _error(key, path, f"cannot read it: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise _error(key, path, f"not UTF-8 text: {err.reason} at byte {err.start}") from None
    _check_tensors(tensors, path, key)
    return tensors


def split_roles(tensors: Mapping[str, np.ndarray], inputs: Iterable[str],
                outputs: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
    """``{"input": {name: array}, "output": {...}}``: each key given to the tensors of the model it names
    (``input:T``, ``output:T``, or a bare ``T`` for either role). A prefixed key wins over a bare one."""
    names = {"input": set(inputs), "output": set(outputs)}
    roles: dict[str, dict[str, np.ndarray]] = {"input": {}, "output": {}}
    for key, array in tensors.items():
        role, _, name = key.partition(":") if key.startswith(ROLE_PREFIXES) else ("", "", key)
        for each in (role,) if role else ("input", "output"):
            if name in names[each] and (role or name not in roles[each]):
                roles[each][name] = array
    return roles


def unused_keys(tensors: Mapping[str, np.ndarray], inputs: Iterable[str], outputs: Iterable[str]) -> list[str]:
    """The keys of the file that name no tensor of the model."""
    inputs, outputs = set(inputs), set(outputs)
    unused = []
    for key in tensors:
        role, _, name = key.partition(":") if key.startswith(ROLE_PREFIXES) else ("", "", key)
        wanted = {"input": inputs, "output": outputs}.get(role, inputs | outputs)
        if name not in wanted:
            unused.append(key)
    return unused


def reference_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """A SHA-256 of the tensors as read (names, dtypes, shapes, values): a baseline fitted from a file is
    restored after a restart only while the file holds the same data."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        if array.dtype == object:
            for value in array.flat:
                item = value if isinstance(value, bytes) else str(value).encode()
                digest.update(len(item).to_bytes(8, "little") + item)
        else:
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


# --- formats ------------------------------------------------------------------------------------------


def _read_npz(path: Path, key: str) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as archive:
            # A small file may hold a large array: bound what is decompressed before decompressing it.
            size = sum(info.file_size for info in archive.infolist())
        if size > MAX_BYTES:
            raise _error(key, path, f"{size} bytes uncompressed: more than the {MAX_BYTES} a reference may have")
        with np.load(path, allow_pickle=False) as archive:
            tensors = {}
            for name in archive.files:
                try:
                    array = archive[name]
                except ValueError:
                    raise _error(key, path, f"array {name!r} holds Python objects (not read: that would "
                                            "unpickle); save strings as bytes (S) or str (U) arrays") from None
                tensors[name] = _strings_as_bytes(array)
            return tensors
    except (zipfile.BadZipFile, EOFError) as err:
        raise _error(key, path, f"not a .npz archive ({err})") from None
    except ValueError as err:
        raise _error(key, path, f"not a .npz archive of arrays ({err})") from None


def _strings_as_bytes(array: np.ndarray) -> np.ndarray:
    """``S``/``U`` arrays as object arrays of bytes, as BYTES tensors are decoded from requests."""
    if array.dtype.kind == "S":
        return np.array([bytes(x) for x in array.reshape(-1)], dtype=object).reshape(array.shape)
    if array.dtype.kind == "U":
        return np.array([str(x).encode() for x in array.reshape(-1)], dtype=object).reshape(array.shape)
    return array


def _read_csv(text: str, path: Path, key: str) -> dict[str, np.ndarray]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise _error(key, path, "line 1: no header row (the tensor names)")
        header = [h.strip() for h in header]
        layout = _csv_layout(header, path, key)
        cells: list[list[str]] = []
        for row in reader:
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                raise _error(key, path, f"line {reader.line_num}: {len(row)} fields, the header has {len(header)}")
            cells.append(row)
    except csv.Error as err:
        raise _error(key, path, f"line {reader.line_num}: not valid CSV ({err})") from None
    if not cells:
        raise _error(key, path, "no rows after the header")
    columns = list(zip(*cells))
    tensors = {}
    for name, indices in layout.items():
        parts = [_column(columns[i]) for i in indices]
        if any(p.dtype == object for p in parts):
            parts = [np.array([c.encode() for c in columns[i]], dtype=object) for i in indices]
        # A bare column is a tensor of shape [N]; T[0], T[1], ... one of shape [N, K].
        tensors[name] = parts[0] if _COLUMN.match(header[indices[0]]) is None else np.stack(parts, axis=1)
    return tensors


def _csv_layout(header: list[str], path: Path, key: str) -> dict[str, list[int]]:
    """``{tensor: [column positions in tensor column order]}`` from the header."""
    bare: dict[str, int] = {}
    indexed: dict[str, dict[int, int]] = {}
    for position, column in enumerate(header):
        if not column:
            raise _error(key, path, f"line 1: column {position + 1} has no name")
        match = _COLUMN.match(column)
        if match is None:
            if column in bare:
                raise _error(key, path, f"line 1: column {column!r} appears twice")
            bare[column] = position
            continue
        name, index = match["name"], int(match["index"])
        if index in indexed.setdefault(name, {}):
            raise _error(key, path, f"line 1: column {column!r} appears twice")
        indexed[name][index] = position
    layout = {name: [position] for name, position in bare.items()}
    for name, columns in indexed.items():
        if name in bare:
            raise _error(key, path, f"line 1: {name!r} is both a column and a tensor of columns {name}[0], ...")
        if sorted(columns) != list(range(len(columns))):
            raise _error(key, path, f"line 1: the columns of {name!r} must be {name}[0] to {name}[{len(columns) - 1}]"
                                    f" with none left out, got indices {sorted(columns)}")
        layout[name] = [columns[i] for i in range(len(columns))]
    return layout


def _column(cells: tuple[str, ...]) -> np.ndarray:
    """FP64 when every non-empty cell is a number (empty: NaN), else an object array (caller: bytes)."""
    values = np.empty(len(cells), dtype=np.float64)
    for i, cell in enumerate(cells):
        cell = cell.strip()
        if not cell:
            values[i] = math.nan
            continue
        try:
            values[i] = float(cell)
        except ValueError:
            return np.empty(0, dtype=object)
    return values


def _read_jsonl(text: str, path: Path, key: str) -> dict[str, np.ndarray]:
    rows: dict[str, list[Any]] = {}
    keys: list[str] | None = None
    first_line = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise _error(key, path, f"line {number}: not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(item, dict) or not item:
            raise _error(key, path, f"line {number}: expected a JSON object of tensor names to values")
        if keys is None:
            keys, first_line = list(item), number
            rows = {k: [] for k in keys}
        elif set(item) != set(keys):
            raise _error(key, path, f"line {number}: keys {sorted(item)} differ from line {first_line}'s {sorted(keys)}")
        for name, value in item.items():
            rows[name].append(_json_value(value, key, path, number, name))
    if keys is None:
        raise _error(key, path, "no rows (an empty file)")
    tensors = {}
    for name, values in rows.items():
        shape = np.shape(values[0])
        for offset, value in enumerate(values):
            if np.shape(value) != shape:
                line = _line_of(text, offset)
                raise _error(key, path, f"line {line}: {name!r} has shape {list(np.shape(value))}, the first row "
                                        f"{list(shape)} (ragged)")
        tensors[name] = _stack(values)
    return tensors


def _json_value(value: Any, key: str, path: Path, line: int, name: str) -> Any:
    """A float, bytes, or a nested list as an array (FP64, or object when it holds a string); a ConfigError
    naming the line for anything else. ``null`` is NaN (a missing value), ``true``/``false`` are 1 and 0."""
    if value is None:
        return math.nan
    if isinstance(value, bool | int | float):
        return float(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list):
        try:
            array = np.array(value, dtype=object)
        except ValueError:
            array = None
        if array is None or any(isinstance(x, list | dict) for x in array.reshape(-1)):
            raise _error(key, path, f"line {line}: {name!r} is a ragged list (rows of different lengths)")
        items = [_json_value(x, key, path, line, name) for x in array.reshape(-1)]
        if all(isinstance(x, float) for x in items):
            return np.array(items, dtype=np.float64).reshape(array.shape)
        out = np.empty(len(items), dtype=object)
        out[:] = items
        return out.reshape(array.shape)
    raise _error(key, path, f"line {line}: {name!r} is a {type(value).__name__}, not a number, string or list")


def _stack(values: list[Any]) -> np.ndarray:
    """One tensor from its rows: FP64 when every element is a number, else an object array."""
    if all(isinstance(v, float) for v in values):
        return np.array(values, dtype=np.float64)
    if all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in values):
        return np.stack(values)
    out = np.empty(len(values), dtype=object)
    if isinstance(values[0], np.ndarray):
        return np.stack([np.asarray(v, dtype=object) for v in values])
    out[:] = values
    return out


def _line_of(text: str, row: int) -> int:
    """The line number of the ``row``-th non-blank line."""
    seen = -1
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            seen += 1
            if seen == row:
                return number
    return 0


def _check_tensors(tensors: Mapping[str, np.ndarray], path: Path, key: str) -> None:
    if not tensors:
        raise _error(key, path, "no tensors")
    if len(tensors) > MAX_TENSORS:
        raise _error(key, path, f"{len(tensors)} tensors: more than {MAX_TENSORS}")
    rows = {}
    for name, array in tensors.items():
        bare = name.split(":", 1)[1] if name.startswith(ROLE_PREFIXES) else name
        if not 1 <= len(bare) <= MAX_NAME:
            raise _error(key, path, f"tensor names must have 1 to {MAX_NAME} characters, got {name!r}")
        if array.ndim == 0:
            raise _error(key, path, f"tensor {name!r} is a scalar, not rows")
        if array.dtype.kind not in "biufO":
            raise _error(key, path, f"tensor {name!r} is of dtype {array.dtype}: not numbers or strings")
        rows[name] = len(array)
    if len(set(rows.values())) > 1:
        raise _error(key, path, f"the tensors have different numbers of rows (ragged): {rows}")
    if not next(iter(rows.values())):
        raise _error(key, path, "no rows")


def _error(key: str, path: Path, message: str) -> ConfigError:
    return ConfigError(f"sidewatch: {key}: {path}: {message}")
