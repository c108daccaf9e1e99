"""A model repository laid out as ``DIR/<model>/<version>/model.onnx``, loaded into ONNX Runtime."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.execution import ORT_TO_DATATYPE, open_session
from agent.repository import LAYOUT, latest_version, model_files, version_key

log = logging.getLogger(__name__)

BUNDLED_REPOSITORY = Path(__file__).resolve().parent.parent / "demo" / "models"


class ModelNotFound(LookupError):
    pass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    # -1 for a dimension of any size.
    shape: tuple[int, ...]

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(want in (-1, got) for want, got in zip(self.shape, shape))


def _spec(node: ort.NodeArg) -> TensorSpec:
    datatype = ORT_TO_DATATYPE.get(node.type)
    if datatype is None:
        raise ValueError(f"unsupported ONNX type {node.type} for tensor {node.name}")
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in node.shape)
    return TensorSpec(node.name, datatype, shape)


@dataclass
class LoadedModel:
    name: str
    version: str
    path: Path
    session: ort.InferenceSession
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        return self.session.run(output_names, feeds)


class ModelRepository:
    """Every version of every model in the repository, loaded at start."""

    def __init__(self, root: Path, device: str = "auto") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"sidewatch: model repository {self.root} is not a directory")
        self._models: dict[str, dict[str, LoadedModel]] = {}
        for name, version, model_file in model_files(self.root):
            session = open_session(model_file, device)
            model = LoadedModel(
                name=name,
                version=version,
                path=model_file,
                session=session,
                inputs=tuple(_spec(node) for node in session.get_inputs()),
                outputs=tuple(_spec(node) for node in session.get_outputs()),
            )
            self._models.setdefault(name, {})[version] = model
            log.info("sidewatch: loaded model %s version %s from %s", name, version, model_file)
        if not self._models:
            raise FileNotFoundError(f"sidewatch: no {LAYOUT} found under {self.root}")

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=version_key)

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The model's given version, or its latest version when ``version`` is empty."""
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"model '{name}' is not in the repository")
        if not version:
            return versions[latest_version(versions)]
        model = versions.get(version)
        if model is None:
            raise ModelNotFound(f"model '{name}' has no version '{version}' (versions: {', '.join(self.versions(name))})")
        return model
