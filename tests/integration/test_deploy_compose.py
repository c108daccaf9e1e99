"""deploy/docker-compose.yml, checked offline: Docker cannot run here, so no container is started.

The file is validated against the Compose Specification's schema (check-jsonschema's copy); every file it
mounts and builds from exists; its services find each other under the names and ports the mounted
configurations use (Prometheus, Alertmanager, Grafana, sidewatch); sidewatch's configuration passes
--check-config with the admin token made by the stack's own admin-token step; and the stack's processes
run here without containers: the model server, sidewatch with the compose configuration (Envoy carrying the
calls, as sidewatch's child), its health check through Envoy's listener, and the traffic generator, whose
attack makes sidewatch's own alert pin the model to version 1.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from agent.config import ServeConfig, split_address
from tests.support.deploy_dockerfile import parse_dockerfile
from tests.support.harness import REPO, Process, free_port, http_get, metric_value, sidewatch
from tests.support.process_tree import envoy_child, listening

DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES = COMPOSE["services"]


def _mounts(service: str) -> list[tuple[str, str]]:
    """(source, target) of a service's volumes, short syntax."""
    return [tuple(entry.split(":")[:2]) for entry in SERVICES[service].get("volumes", [])]


def _source(service: str, target: str) -> str:
    return next(source for source, mounted in _mounts(service) if mounted == target)


def _config_text() -> str:
    return (DEPLOY / _source("sidewatch", "/etc/sidewatch/sidewatch.yaml")).read_text()


def _config() -> ServeConfig:
    return ServeConfig.model_validate(yaml.safe_load(_config_text()))


def test_the_compose_file_follows_the_compose_specification(tmp_path):
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    done = subprocess.run([*command, str(COMPOSE_FILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    # The check is live: a service with a misspelt key is refused.
    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    broken["services"]["sidewatch"]["healthchek"] = broken["services"]["sidewatch"].pop("healthcheck")
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    assert subprocess.run([*command, str(path)], capture_output=True, text=True).returncode != 0


def test_every_mounted_file_and_the_build_exist():
    named = set(COMPOSE["volumes"])
    for name, service in SERVICES.items():
        for source, _ in _mounts(name):
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
    build = SERVICES["model-server"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for name in ("model-server", "admin-token", "sidewatch", "traffic"):
        assert SERVICES[name]["image"] == f"sidewatch:{version}"
    # Ports reach the host on loopback only.
    for name, service in SERVICES.items():
        assert all(port.startswith("127.0.0.1:") for port in service.get("ports", [])), name


def test_sidewatch_runs_the_image_entry_point_with_the_mounted_configuration():
    runtime = parse_dockerfile(DEPLOY / "Dockerfile").stages[-1]
    assert "entrypoint" not in SERVICES["sidewatch"]
    assert SERVICES["sidewatch"]["command"] == runtime.last("CMD").exec_form()
    assert _source("sidewatch", "/etc/sidewatch/sidewatch.yaml") == "./compose/sidewatch.yaml"
    health = SERVICES["sidewatch"]["healthcheck"]["test"]
    assert health[:5] == ["CMD", "python", "/opt/sidewatch/healthcheck.py", "--config", "/etc/sidewatch/sidewatch.yaml"]
    copies = [item.flags_and_args()[1] for item in runtime.all("COPY")]
    assert ["deploy/healthcheck.py", "/opt/sidewatch/healthcheck.py"] in copies


def test_the_services_find_each_other_where_the_configurations_say():
    config = _config()
    # sidewatch -> the model server.
    host, port = split_address(config.upstream.address)
    model_server = SERVICES[host]["command"]
    assert split_address(model_server[model_server.index("--listen") + 1])[1] == port
    assert _source(host, "/models") == _source("sidewatch", str(config.detection.model_repository))
    # Prometheus -> sidewatch's metrics and Alertmanager.
    prometheus_dir = DEPLOY / _source("prometheus", "/etc/prometheus")
    prometheus = yaml.safe_load((prometheus_dir / "prometheus.yml").read_text())
    for rule_file in prometheus["rule_files"]:
        assert (prometheus_dir / rule_file).exists()
    (job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "sidewatch"]
    assert job["static_configs"][0]["targets"] == [f"sidewatch:{split_address(config.metrics.listen)[1]}"]
    (alertmanager_target,) = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alertmanager_target.split(":")[0] in SERVICES
    # Alertmanager -> sidewatch's receiver, with the token the admin-token step wrote into the shared volume.
    alertmanager = yaml.safe_load((DEPLOY / _source("alertmanager", "/etc/alertmanager/alertmanager.yml")).read_text())
    (receiver,) = [r for r in alertmanager["receivers"] if r["name"] == "sidewatch-rollback"]
    (webhook,) = receiver["webhook_configs"]
    assert webhook["url"] == f"http://sidewatch:{split_address(config.admin.listen)[1]}/alertmanager"
    assert config.admin.tls is None and split_address(config.admin.listen)[0] == "0.0.0.0"
    credentials = Path(webhook["http_config"]["authorization"]["credentials_file"])
    volume = _source("alertmanager", str(credentials.parent))
    assert _source("sidewatch", str(config.admin.token_file.parent)) == volume
    assert config.admin.token_file.name == credentials.name
    writer = SERVICES["admin-token"]
    (mounted,) = [target for source, target in _mounts("admin-token") if source == volume]
    assert f'"{mounted}/{credentials.name}"' in writer["command"][0]
    for name in ("sidewatch", "alertmanager"):
        assert SERVICES[name]["depends_on"]["admin-token"]["condition"] == "service_completed_successfully"
    # Every alert that asks for a rollback is mapped to hooks by the receiver.
    alerts = yaml.safe_load((prometheus_dir / "alert-rules.yml").read_text())
    wanted = {r["alert"] for g in alerts["groups"] for r in g["rules"] if r.get("labels", {}).get("rollback") == "true"}
    assert wanted and wanted <= set(config.admin.alertmanager_hooks)
    # Grafana -> Prometheus, and the dashboards where the provisioning looks for them.
    provisioning = DEPLOY / _source("grafana", "/etc/grafana/provisioning")
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert re.fullmatch(r"http://prometheus:9090/?", datasource["url"])
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "sidewatch.yml").read_text())["providers"]
    dashboards = DEPLOY / _source("grafana", provider["options"]["path"])
    assert list(dashboards.glob("*.json"))
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).relative_to(provider["options"]["path"])).exists()


def _make_token(secrets_dir: Path) -> Path:
    """Run the admin-token service's own program, with its volume at ``secrets_dir``."""
    (target,) = [t for s, t in _mounts("admin-token") if not s.startswith(".")]
    program = SERVICES["admin-token"]["command"][0].replace(f'"{target}/', f'"{secrets_dir}/')
    subprocess.run([sys.executable, "-c", program], check=True)
    subprocess.run([sys.executable, "-c", program], check=True)   # a restart keeps the token
    (token,) = secrets_dir.iterdir()
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    return token


def _localized_config(tmp_path: Path) -> tuple[dict, Path]:
    """The compose configuration with the container's paths moved to local folders."""
    secrets_dir = tmp_path / "admin-token"
    secrets_dir.mkdir()
    _make_token(secrets_dir)
    state = tmp_path / "state"
    state.mkdir()
    text = _config_text()
    text = text.replace("/var/run/secrets/sidewatch/", f"{secrets_dir}/").replace("/var/lib/sidewatch/", f"{state}/")
    text = re.sub(r"model_repository: /models\b", f"model_repository: {DEPLOY / _source('sidewatch', '/models')}", text)
    data = yaml.safe_load(text)
    # Envoy's work directory is the container's own (its /tmp): here, one of the test's.
    data["envoy"]["work_dir"] = str(tmp_path / "envoy")
    return data, secrets_dir


def test_sidewatch_runs_the_envoy_data_plane_in_its_own_container():
    """Envoy carries the calls, inside the sidewatch service's container (the image's envoy extra): no service
    of its own, its work directory is the container's, and its heap is capped."""
    config = _config()
    assert config.data_plane == "envoy"
    assert not [name for name, service in SERVICES.items() if "envoy" in str(service.get("image", ""))]
    assert config.envoy.work_dir is not None and config.envoy.work_dir.is_absolute()
    # Not in a mounted volume: the generated configuration stays in the container and goes with it.
    assert not [target for _, target in _mounts("sidewatch") if config.envoy.work_dir.is_relative_to(target)]
    assert config.envoy.max_heap_bytes is not None


def test_the_compose_configuration_passes_check_config(tmp_path):
    data, _ = _localized_config(tmp_path)
    path = tmp_path / "sidewatch.yaml"
    path.write_text(yaml.safe_dump(data))
    done = subprocess.run(sidewatch("serve", "--config", str(path), "--check-config"), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_stack_runs_without_containers_and_the_attack_pins_the_model(tmp_path):
    data, _ = _localized_config(tmp_path)
    model_port, ports = free_port(), {"listen": free_port(), "metrics": free_port(), "admin": free_port()}
    command = SERVICES["model-server"]["command"]
    command = [arg.replace("/models", str(DEPLOY / _source("model-server", "/models")))
               .replace("0.0.0.0:8001", f"127.0.0.1:{model_port}") for arg in command]
    with Process(sidewatch("model-server", *command), tmp_path / "model-server.log") as model_server:
        model_server.wait_listening(model_port)
        # Service names become loopback addresses; the ports, free ones.
        data["upstream"]["address"] = f"127.0.0.1:{model_port}"
        data["listen"] = f"127.0.0.1:{ports['listen']}"
        data["metrics"]["listen"] = f"127.0.0.1:{ports['metrics']}"
        data["admin"]["listen"] = f"127.0.0.1:{ports['admin']}"
        config = tmp_path / "sidewatch.yaml"
        config.write_text(yaml.safe_dump(data))
        with Process(sidewatch("serve", *SERVICES["sidewatch"]["command"][:1], str(config)),
                     tmp_path / "sidecar.log") as sidecar:
            sidecar.wait_listening(ports["listen"])
            # Envoy, sidewatch's child, holds the listener; sidewatch keeps metrics and the admin API.
            envoy = envoy_child(sidecar.popen.pid)
            assert envoy is not None, sidecar.log()[-3000:]
            assert ("127.0.0.1", ports["listen"]) in listening(envoy)
            assert ("127.0.0.1", ports["listen"]) not in listening(sidecar.popen.pid)
            assert (Path(data["envoy"]["work_dir"]) / "envoy.json").is_file()
            health = [arg.replace("/opt/sidewatch/healthcheck.py", str(DEPLOY / "healthcheck.py"))
                      .replace("/etc/sidewatch/sidewatch.yaml", str(config))
                      for arg in SERVICES["sidewatch"]["healthcheck"]["test"][2:]]
            deadline = time.monotonic() + 30
            while (checked := subprocess.run([sys.executable, *health], capture_output=True, text=True)).returncode:
                assert time.monotonic() < deadline, checked.stderr
                time.sleep(0.5)
            traffic = SERVICES["traffic"]
            script = DEPLOY / _source("traffic", traffic["entrypoint"][1])
            args = [arg.replace("sidewatch:9000", f"127.0.0.1:{ports['listen']}") for arg in traffic["command"]]
            done = subprocess.run([sys.executable, str(script), *args, "--rate", "25", "--cycles", "1",
                                   "--benign-seconds", "3", "--drift-seconds", "2", "--attack-seconds", "10"],
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            lines = re.findall(r"traffic: cycle 1 (\w+): (\d+) answered, (\d+) failed", done.stdout)
            assert [name for name, _, _ in lines] == ["benign", "drift", "attack"]
            answered = sum(int(count) for _, count, _ in lines)
            assert answered > 300 and all(failed == "0" for _, _, failed in lines)
            # Envoy's access log reaches sidewatch's call metrics within its flush interval (0.5 s).
            deadline = time.monotonic() + 10
            while metric_value(metrics := http_get(f"http://127.0.0.1:{ports['metrics']}/metrics"),
                               "sidewatch_requests_total", method="ModelInfer", code="OK") < answered:
                assert time.monotonic() < deadline, metric_value(metrics, "sidewatch_requests_total",
                                                                 method="ModelInfer", code="OK")
                time.sleep(0.2)
            assert metric_value(metrics, "sidewatch_adversarial_detections_total", model="mnist_cnn") > 0
            # The sidecar's own alert fired on the attack and its route hook pinned the model to version 1.
            deadline = time.monotonic() + 15
            while not _pinned_to_version_1(metrics):
                # The tap watches what spare CPU allows (the shipped tap.reserve_cores): on a machine busy with
                # other work it samples 1% of the calls, too few for the rate alarm; its figures say so.
                assert time.monotonic() < deadline, (
                    sidecar.log()[-2000:] + "\n" + "\n".join(line for line in metrics.splitlines() if line.startswith(
                        ("sidewatch_tap_sampled_ratio", "sidewatch_tap_cpu_budget_cores", "sidewatch_adversarial_inputs_total",
                         "sidewatch_adversarial_detections_total"))))
                time.sleep(0.5)
                metrics = http_get(f"http://127.0.0.1:{ports['metrics']}/metrics")


def _pinned_to_version_1(metrics: str) -> bool:
    try:
        return metric_value(metrics, "sidewatch_route_pinned", model="mnist_cnn", version="1") == 1
    except KeyError:  # the gauge appears with the pin: on a busy machine, after the traffic has ended
        return False


@pytest.mark.parametrize("argv", [["--rate", "0"], ["--benign-seconds", "0", "--drift-seconds", "0",
                                                      "--attack-seconds", "0"]])
def test_the_traffic_generator_refuses_nonsense(argv):
    done = subprocess.run([sys.executable, str(DEPLOY / "compose" / "traffic.py"), *argv], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "must be positive" in done.stderr
