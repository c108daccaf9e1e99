"""A model repository's layout, ``DIR/<model>/<version>/model.onnx``: one walk and one version order.

The bundled model server (agent.modelserver) loads the models found this way, and the detector
registry (agent.detect.registry) the calibrations beside them; both must agree on what a repository
holds and on which version is the latest. A version named by digits sorts by its number, before any
other name, which sorts as text (as Triton's repository does).

It sits at the bottom of the package: it imports nothing else of sidewatch.

>>> sorted(["10", "2", "canary", "1"], key=version_key)
['1', '2', '10', 'canary']
>>> latest_version(["1", "2", "10"])
'10'
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

MODEL_FILE = "model.onnx"
LAYOUT = f"DIR/<model>/<version>/{MODEL_FILE}"


def version_key(version: str) -> tuple[int, int | str]:
    """Sort key of a version directory's name: numbers by value first, other names after, as text."""
    return (0, int(version)) if version.isdigit() else (1, version)


def latest_version(versions: Iterable[str]) -> str:
    """The latest of ``versions`` by :func:`version_key` (the first of equals, e.g. ``1`` and ``01``)."""
    return max(versions, key=version_key)


def version_dirs(root: Path) -> Iterator[tuple[str, str, Path]]:
    """``(model, version, directory)`` for every ``root/<model>/<version>/`` directory, with or without a
    model file, in path order."""
    for version_dir in sorted(Path(root).glob("*/*/")):
        if version_dir.is_dir():
            yield version_dir.parent.name, version_dir.name, version_dir


def model_files(root: Path) -> Iterator[tuple[str, str, Path]]:
    """``(model, version, model file)`` for every ``root/<model>/<version>/model.onnx``, in path order."""
    for model_file in sorted(Path(root).glob(f"*/*/{MODEL_FILE}")):
        version_dir = model_file.parent
        yield version_dir.parent.name, version_dir.name, model_file
