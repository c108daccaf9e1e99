"""The lanes (a marker for each test, from its folder) and the fixtures shared by several test modules: real
model servers on loopback. Helpers that are not fixtures live in tests/support."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.harness import REPO, start_model_server

MODEL = "mnist_cnn"
TESTS = Path(__file__).resolve().parent
# Runs inside MLServer's own virtual environment (it imports mlserver), never in the suite's.
collect_ignore = ["support/mlserver_runtime.py"]


def _lane(path: Path) -> str:
    if path.is_relative_to(TESTS / "integration"):
        return "integration"
    if path.is_relative_to(TESTS / "unit") or not path.is_relative_to(TESTS):
        return "unit"  # outside tests/: the docstring examples of agent/
    raise pytest.UsageError(f"{path}: test modules go in tests/unit (no processes, servers or sockets) "
                            "or tests/integration")


def pytest_collection_modifyitems(config, items):
    """Mark every test `unit` or `integration` by where it lives, so `-m "not integration"` is the fast lane."""
    for item in items:
        item.add_marker(_lane(Path(item.path)))


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    """The bundled model server (mnist_cnn versions 1 and 2); yields its port."""
    process, port = start_model_server(tmp_path_factory.mktemp("models"))
    yield port
    process.stop()


@pytest.fixture(scope="module")
def fallback_server(tmp_path_factory):
    """A second model server whose only version of mnist_cnn is "7" (version 1's network): answers from
    it are told apart by their version."""
    root = tmp_path_factory.mktemp("fallback-repo")
    (root / MODEL).mkdir()
    (root / MODEL / "7").symlink_to(REPO / "agent/demo/models" / MODEL / "1", target_is_directory=True)
    process, port = start_model_server(tmp_path_factory.mktemp("fallback"), root)
    yield port
    process.stop()


@pytest.fixture(scope="session")
def sklearn_mlserver(tmp_path_factory):
    """MLServer (its own virtual environment) serving the scikit-learn models of tests/support/sklearn_models.py
    (flare, diabetes, topics), trained at the start of the session; yields a sklearn_models.MLServer
    (``.grpc_port``, ``.http_port``)."""
    from tests.support.sklearn_models import start_sklearn_mlserver

    server = start_sklearn_mlserver(tmp_path_factory.mktemp("sklearn-mlserver"))
    yield server
    server.stop()
