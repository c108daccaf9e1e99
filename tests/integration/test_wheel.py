"""The wheel, built by the image's build stage: its one real step, `pip wheel .`, is run on a copy of the build
context that .dockerignore leaves, and the wheel is checked for what the image runs. (The Dockerfiles
themselves, parsed offline: tests/unit/test_deploy_docker.py.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

from tests.support.deploy_dockerfile import DockerIgnore
from tests.support.harness import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_build_context_builds_a_wheel_with_the_command_and_the_bundled_models(tmp_path):
    """The build stage's `pip wheel .`, on exactly the files .dockerignore lets into the context."""
    context = tmp_path / "context"
    for relative in DockerIgnore(REPO / ".dockerignore").context_files(REPO):
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, target)
    # No build isolation: the test environment has setuptools already, and needs no download.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "--wheel-dir", str(tmp_path / "wheels"), str(context)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    wheels = list((tmp_path / "wheels").glob(f"{PYPROJECT['project']['name']}-*.whl"))
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
