"""Fixtures shared by several test modules: real model servers on loopback."""

from __future__ import annotations

import pytest

from tests.support.harness import REPO, start_model_server

MODEL = "mnist_cnn"


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
