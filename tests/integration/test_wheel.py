"""The wheel: built as the image's build stage builds it, and installed on its own.

The build stage's one real step, `pip wheel .`, is run on a copy of the build context that .dockerignore
leaves, and the wheel is checked for what the image runs. (The Dockerfiles themselves, parsed offline:
tests/unit/test_deploy_docker.py.) Then the wheel goes into a fresh virtual environment with its runtime
dependencies alone, no extras and no site packages: the command starts, the default configuration passes
--check-config, every module of the package imports, and nothing of the tests or of training (pytest,
tritonclient, torch) came with it. Code that needs torch lives in bench/, outside the package.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.support.deploy_dockerfile import DockerIgnore
from tests.support.harness import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Packages of the tests and of training, which the runtime must neither need nor pull in.
NOT_AT_RUNTIME = ["torch", "pytest", "tritonclient", "envoy"]
# Packages of the wheel that need an optional extra, and the extra (pip install 'sidewatch[EXTRA]').
NEEDS_EXTRA = {"agent.dataplane.envoy": "envoy"}


def _build_wheel(directory: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """`pip wheel` on a copy of the build context; the pip run and the folder the wheel went to."""
    context = directory / "context"
    for relative in DockerIgnore(REPO / ".dockerignore").context_files(REPO):
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, target)
    # No build isolation: the test environment has setuptools already, and needs no download.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "--wheel-dir", str(directory / "wheels"), str(context)], capture_output=True, text=True)
    return done, directory / "wheels"


def test_the_build_context_builds_a_wheel_with_the_command_and_the_bundled_models(tmp_path):
    """The build stage's `pip wheel .`, on exactly the files .dockerignore lets into the context."""
    done, wheel_dir = _build_wheel(tmp_path)
    assert done.returncode == 0, done.stderr
    wheels = list(wheel_dir.glob(f"{PYPROJECT['project']['name']}-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        entry_points = next(wheel.read(name).decode() for name in names if name.endswith("entry_points.txt"))
    assert re.search(r"^sidewatch = agent\.cli:main$", entry_points, re.M)
    for version in ("1", "2"):
        assert f"agent/demo/models/mnist_cnn/{version}/model.onnx" in names
        assert f"agent/demo/models/mnist_cnn/{version}/sidewatch-calibration.json" in names
    assert "agent/protocol/oip_pb2.py" in names
    assert not [name for name in names if name.startswith("tests/") or "__pycache__" in name]


# --- installed alone ----------------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    """This environment without what would let the test's own packages leak in (pip's settings stay)."""
    return {key: value for key, value in os.environ.items()
            if key not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """The wheel and a fresh virtual environment holding it with its runtime dependencies only: built once for
    the module (pip installs from its index or wheel cache, about 15 s here)."""
    directory = tmp_path_factory.mktemp("wheel")
    done, wheel_dir = _build_wheel(directory)
    assert done.returncode == 0, done.stderr
    [wheel] = wheel_dir.glob("*.whl")
    venv = directory / "venv"
    # The venv module makes the environment from the base interpreter: no site packages of this one.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=_clean_env())
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
                          capture_output=True, text=True, env=_clean_env(), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return wheel, venv


def _run(venv: Path, cwd: Path, *command: str) -> subprocess.CompletedProcess:
    # Outside the repository, so that nothing is imported from the working tree.
    return subprocess.run([str(venv / "bin" / command[0]), *command[1:]], capture_output=True, text=True,
                          cwd=cwd, env=_clean_env(), timeout=120)


def test_the_installed_command_runs_and_checks_the_default_configuration(installed, tmp_path):
    _, venv = installed
    done = _run(venv, tmp_path, "sidewatch", "--help")
    assert done.returncode == 0, done.stderr
    assert "serve" in done.stdout and "model-server" in done.stdout
    done = _run(venv, tmp_path, "sidewatch", "serve", "--check-config")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "configuration is valid" in done.stdout + done.stderr
    # data_plane auto without the envoy extra: the grpc.aio relay, and the reason.
    assert "the python data plane would carry the calls (the envoy extra is not installed" in done.stderr, \
        done.stderr


def test_every_module_imports_with_the_runtime_dependencies_alone(installed, tmp_path):
    wheel, venv = installed
    with zipfile.ZipFile(wheel) as archive:
        modules = sorted(name[:-3].removesuffix("/__init__").replace("/", ".") for name in archive.namelist()
                         if name.startswith("agent/") and name.endswith(".py"))
    modules = [name for name in modules if not any(name.startswith(package + ".") for package in NEEDS_EXTRA)]
    script = ("import importlib, importlib.util, sys, agent\n"
              f"for name in {modules!r}:\n"
              "    importlib.import_module(name)\n"
              "print(agent.__file__)\n"
              f"print(sorted(name for name in {NOT_AT_RUNTIME!r} if importlib.util.find_spec(name)))\n")
    done = _run(venv, tmp_path, "python", "-c", script)
    assert done.returncode == 0, done.stderr
    where, present = done.stdout.splitlines()
    assert Path(where).is_relative_to(venv), where          # the installed package, not the working tree
    assert len(modules) > 50 and "agent.cli" in modules
    assert present == "[]", f"the runtime environment has {present}"


def test_no_module_in_the_wheel_imports_torch(installed):
    """torch is for training and attacks (bench/); an import of it anywhere in the package, even inside a
    function that only `make model` would call, means the code belongs outside."""
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        sources = {name: archive.read(name) for name in archive.namelist() if name.endswith(".py")}
    needing_torch = []
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source, name)):
            imported = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(module.split(".")[0] == "torch" for module in imported):
                needing_torch.append(name)
    assert sources and not needing_torch


def test_the_wheel_carries_the_envoy_data_planes_lua_filter(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        assert "agent/dataplane/envoy/model_peek.lua" in archive.namelist()


def test_the_envoy_data_plane_without_its_extra_is_refused_with_a_message_not_a_traceback(installed, tmp_path):
    """The runtime environment has no envoy extra: asking for the Envoy data plane names the extra."""
    _, venv = installed
    done = _run(venv, tmp_path, "sidewatch", "serve", "--data-plane", "envoy", "--check-config")
    assert done.returncode != 0
    assert "sidewatch[envoy]" in done.stderr and "Traceback" not in done.stderr, done.stderr
