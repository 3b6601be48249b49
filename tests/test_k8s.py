"""Kubernetes: deploy/k8s (StatefulSet, headless Service, ConfigMap, PodDisruptionBudget,
PodMonitor), checked offline.

- Every manifest validates against the Kubernetes JSON schemas that kubernetes-validate ships
  (strict: an unknown field is an error), for every Kubernetes version it has schemas of. The
  PodMonitor is a CRD it has no schema for: it is checked against the part of the Prometheus
  Operator's CRD schema it uses.
- The manifests agree with each other and with the appliance's own config (ingest.config.load
  of the ConfigMap's TOML): ports, probes, worker count and CPU, grace period and drain, volumes.
- The init container's script runs here as the pod runs it, and a real `ingest serve` on
  loopback serves the rendered config: METADATA hands out the pod's DNS name for every worker.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from ingest import config as config_mod
from ingest.net.client import BootstrapClient
from ingest.security import ClientCurve, generate_keys
from ingest.supervisor import RESTART_BACKOFF_MAX_MS, WORKER_START_TIMEOUT_MS
from tests.support import PORTS_PER_APPLIANCE, free_port_block

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
PROMETHEUS_YML = REPO / "deploy" / "prometheus" / "prometheus.yml"
CONFIG_KEY = "ingest.toml"

POD_NAME = "ingest-1"
NAMESPACE = "telemetry"
# What the downward API hands the init container in pod ingest-1 of namespace telemetry.
FIELD_VALUES = {"metadata.name": POD_NAME, "metadata.namespace": NAMESPACE}

# A new pod compiles every numba kernel before its workers are ready: ~23 s measured on this
# 2-core machine with an empty cache, rounded up for slower nodes.
COLD_COMPILE_MS = 60_000
# A crashed worker's successor, on a warm cache, is ready within this (~1-3 s measured).
WARM_WORKER_START_MS = 10_000
# After shutdown_timeout_ms the supervisor kills late workers, reaps them, closes its
# sockets and exits: well under this.
SUPERVISOR_EXIT_MS = 5_000
READY_TIMEOUT_S = 60  # the appliance under test, on this machine's (possibly cold) cache

# Kubernetes' IANA_SVC_NAME rule for port names: what a probe, a Service or a PodMonitor
# may refer to a port by.
PORT_NAME_RE = re.compile(r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*$")


# ---- reading the manifests ---------------------------------------------------------------

def manifest_files() -> list[Path]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [K8S / name for name in kustomization["resources"]]


def manifests() -> dict[str, dict]:
    """{kind: document} of every manifest kustomization.yaml lists (one object per kind)."""
    docs: dict[str, dict] = {}
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs, f"a second {doc['kind']} in {path.name}"
            docs[doc["kind"]] = doc
    return docs


def pod_spec(docs: dict) -> dict:
    return docs["StatefulSet"]["spec"]["template"]["spec"]


def main_container(docs: dict) -> dict:
    (container,) = [c for c in pod_spec(docs)["containers"] if c["name"] == "ingest"]
    return container


def init_container(docs: dict) -> dict:
    (container,) = [c for c in pod_spec(docs)["initContainers"] if c["name"] == "render-config"]
    return container


def all_containers(docs: dict) -> list[dict]:
    return pod_spec(docs)["containers"] + pod_spec(docs).get("initContainers", [])


def config_template(docs: dict) -> str:
    return docs["ConfigMap"]["data"][CONFIG_KEY]


def load_config_text(text: str, tmp_path: Path) -> config_mod.Config:
    path = tmp_path / "ingest.toml"
    path.write_text(text)
    return config_mod.load(path)


def container_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def probe_port(container: dict, probe: dict) -> int:
    port = probe["httpGet"]["port"]
    return container_ports(container)[port] if isinstance(port, str) else port


def cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def expand(value: str, variables: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values, command and args: a defined variable is
    replaced, $$ is a literal $, anything else stays as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else variables.get(m.group(1), m.group(0)), value)


def container_env(container: dict, field_values: dict[str, str]) -> dict[str, str]:
    """The environment Kubernetes gives the container, in its order of definition."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            env[var["name"]] = field_values[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[var["name"]] = expand(var["value"], env)
    return env


def mounts(container: dict, volume_kind: str, docs: dict) -> list[str]:
    """Mount paths of the container's volumes of one kind (emptyDir, configMap, ...)."""
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    claims = {c["metadata"]["name"] for c in docs["StatefulSet"]["spec"].get("volumeClaimTemplates", [])}
    paths = []
    for m in container.get("volumeMounts", []):
        kind = "persistentVolumeClaim" if m["name"] in claims else next(iter(set(volumes[m["name"]]) - {"name"}))
        if kind == volume_kind:
            paths.append(m["mountPath"])
    return paths


def is_under(path: str | Path, directories: list[str]) -> bool:
    return any(Path(path).is_relative_to(d) for d in directories)


def run_render_script(docs: dict, env_overrides: dict[str, str]) -> subprocess.CompletedProcess:
    """The init container's command, run here with the environment the pod gives it (and
    `env_overrides` for its paths)."""
    container = init_container(docs)
    env = container_env(container, FIELD_VALUES) | env_overrides
    argv = [expand(a, env) for a in container["command"] + container.get("args", [])]
    return subprocess.run(argv, env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, timeout=10)


def render(docs: dict, tmp_path: Path, template: str | None = None,
           env_overrides: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    template_path = tmp_path / "template" / CONFIG_KEY
    template_path.parent.mkdir(exist_ok=True)
    template_path.write_text(config_template(docs) if template is None else template)
    rendered = tmp_path / "run" / CONFIG_KEY
    rendered.parent.mkdir(exist_ok=True)
    result = run_render_script(docs, {"CONFIG_TEMPLATE": str(template_path), "CONFIG_FILE": str(rendered),
                                      **(env_overrides or {})})
    return result, rendered


@pytest.fixture(scope="module")
def docs() -> dict:
    return manifests()


@pytest.fixture
def config(docs, tmp_path) -> config_mod.Config:
    return load_config_text(config_template(docs), tmp_path)


# ---- schemas -----------------------------------------------------------------------------

def kubernetes_versions() -> list[str]:
    return sorted(set(kubernetes_validate.all_versions()), key=lambda v: tuple(map(int, v.split("."))))


@pytest.mark.parametrize("version", kubernetes_versions())
def test_every_manifest_validates_strictly_against_the_kubernetes_schemas(docs, version):
    for kind, doc in docs.items():
        if kind == "PodMonitor":  # a CRD: test_podmonitor_has_the_shape_the_prometheus_operator_crd_accepts
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{kind} against Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}")


def test_a_misspelt_field_is_refused_by_the_schema_check(docs):
    """The check above can fail: strict schemas refuse a field Kubernetes does not know."""
    statefulset = yaml.safe_load(yaml.safe_dump(docs["StatefulSet"]))
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, kubernetes_versions()[-1], strict=True)


def test_kustomization_lists_every_manifest_of_the_directory():
    listed = {p.name for p in manifest_files()}
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


# The part of the Prometheus Operator's PodMonitor CRD (monitoring.coreos.com/v1, its
# openAPIV3Schema) that podmonitor.yaml uses, with the CRD's field names and types. Any other
# field is refused: a ServiceMonitor's `endpoints` or `targetPort`, a misspelt key.
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
RELABEL_ACTIONS = ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod", "labelmap",
                   "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "lowercase", "Lowercase",
                   "uppercase", "Uppercase", "keepequal", "KeepEqual", "dropequal", "DropEqual"]
STRING = {"type": "string"}
STRINGS = {"type": "array", "items": STRING}
RELABEL_CONFIG = {"type": "object", "additionalProperties": False, "properties": {
    "action": {"enum": RELABEL_ACTIONS}, "sourceLabels": STRINGS, "separator": STRING,
    "targetLabel": STRING, "regex": STRING, "replacement": STRING, "modulus": {"type": "integer"}}}
PODMONITOR_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": STRING, "labels": {"type": "object", "additionalProperties": STRING}}},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "jobLabel": STRING,
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": {"type": "object", "additionalProperties": STRING}}},
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"port": STRING, "path": STRING, "scheme": {"enum": ["http", "https"]},
                                   "interval": {"type": "string", "pattern": DURATION},
                                   "scrapeTimeout": {"type": "string", "pattern": DURATION},
                                   "honorLabels": {"type": "boolean"},
                                   "relabelings": {"type": "array", "items": RELABEL_CONFIG},
                                   "metricRelabelings": {"type": "array", "items": RELABEL_CONFIG}}}},
            },
        },
    },
}


def test_podmonitor_has_the_shape_the_prometheus_operator_crd_accepts(docs):
    jsonschema.validate(docs["PodMonitor"], PODMONITOR_SCHEMA)
    wrong = yaml.safe_load(yaml.safe_dump(docs["PodMonitor"]))
    wrong["spec"]["endpoints"] = wrong["spec"].pop("podMetricsEndpoints")  # a ServiceMonitor's key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, PODMONITOR_SCHEMA)


def test_podmonitor_scrapes_the_appliances_metrics_port_as_the_job_the_alerts_read(docs, config):
    spec = docs["PodMonitor"]["spec"]
    pod_labels = docs["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    prometheus = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = [j["job_name"] for j in prometheus["scrape_configs"]]
    assert pod_labels[spec["jobLabel"]] == job, "rules.yml reads up{job=...} of prometheus.yml's job"
    (endpoint,) = spec["podMetricsEndpoints"]
    assert container_ports(main_container(docs))[endpoint["port"]] == config.server.metrics_port
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == prometheus["global"]["scrape_interval"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "instance", "action": "replace"} \
        in endpoint["relabelings"]


# ---- the config and the ports ------------------------------------------------------------

def test_configmap_toml_loads_with_the_appliance_config_loader(config):
    server = config.server
    assert server.bind in config_mod.WILDCARD_HOSTS, "devices reach the pod IP, not its loopback"
    assert server.metrics_bind in config_mod.WILDCARD_HOSTS, "kubelet probes and Prometheus reach the pod IP"
    assert server.workers > 0, "a fixed worker count, not auto (see test_workers_equal_the_cpu_limit)"
    assert server.data_dir.is_absolute()


def expected_ports(config: config_mod.Config) -> set[int]:
    """Every port the appliance binds with this config."""
    ports = {config.server.port, config.server.metrics_port}
    for worker in range(config.worker_count):
        ports |= {config.worker_pull_port(worker), config.worker_router_port(worker)}
    return ports | {t.raw_port for t in config.topics if t.raw_port}


def test_the_pod_exposes_exactly_the_ports_the_config_binds(docs, config):
    ports = container_ports(main_container(docs))
    assert len(ports) == len(main_container(docs)["ports"]), "two ports with one name"
    assert set(ports.values()) == expected_ports(config)
    assert ports["bootstrap"] == config.server.port
    assert ports["metrics"] == config.server.metrics_port
    for worker in range(config.worker_count):
        assert ports[f"w{worker}-push"] == config.worker_pull_port(worker)
        assert ports[f"w{worker}-requests"] == config.worker_router_port(worker)
    for name in ports:
        assert PORT_NAME_RE.match(name), f"port name {name!r} is not an IANA_SVC_NAME"


def test_the_headless_service_publishes_every_port_of_the_pods_under_the_statefulsets_name(docs):
    service, statefulset = docs["Service"], docs["StatefulSet"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["name"] == statefulset["spec"]["serviceName"]
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    assert statefulset["spec"]["selector"]["matchLabels"].items() \
        <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["publishNotReadyAddresses"] is True
    ports = container_ports(main_container(docs))
    published = {p["name"]: (p["port"], ports[p["targetPort"]]) for p in service["spec"]["ports"]}
    assert published == {name: (port, port) for name, port in ports.items()}


def test_workers_equal_the_cpu_limit_of_a_guaranteed_pod(docs, config):
    """workers = "auto" counts the cgroup cpuset, which is every core of the node unless the
    kubelet's static CPU manager pins the pod, and the data directory refuses another count:
    the count is fixed and matches the CPU the pod gets."""
    resources = main_container(docs)["resources"]
    assert config.server.workers == cpu_cores(resources["limits"]["cpu"]) == cpu_cores(resources["requests"]["cpu"])
    for container in all_containers(docs):  # Guaranteed QoS needs it of every container
        for resource in ("cpu", "memory"):
            assert container["resources"]["requests"][resource] == container["resources"]["limits"][resource], \
                f"{container['name']}: {resource} request != limit"


def test_probes_ask_the_metrics_port_for_readyz(docs, config):
    container = main_container(docs)
    paths = {kind: container[kind]["httpGet"]["path"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    # Liveness is /readyz too: /healthz fails on a full disk, which a restart cannot cure.
    assert paths == {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/readyz"}
    for kind in paths:
        assert probe_port(container, container[kind]) == config.server.metrics_port
        assert container[kind]["httpGet"].get("scheme", "HTTP") == "HTTP"


def probe_window_ms(probe: dict) -> int:
    """How long the probe may fail before the kubelet acts."""
    return probe["periodSeconds"] * probe["failureThreshold"] * 1000


def test_probe_budgets_cover_a_cold_start_and_a_worker_restart(docs, config):
    container = main_container(docs)
    assert probe_window_ms(container["startupProbe"]) >= WORKER_START_TIMEOUT_MS + COLD_COMPILE_MS
    # A crashed worker is the supervisor's to restart: its backoff and a warm start must fit
    # before the kubelet restarts the whole pod; a stalled one is noticed after the heartbeat timeout.
    assert probe_window_ms(container["livenessProbe"]) >= \
        RESTART_BACKOFF_MAX_MS + WARM_WORKER_START_MS + config.server.heartbeat_timeout_ms


def prestop_ms(container: dict) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "exec" in pre_stop or "httpGet" in pre_stop:
        pytest.fail("a preStop exec or httpGet hook takes an unknown share of the grace period")
    return pre_stop.get("sleep", {}).get("seconds", 0) * 1000


def test_termination_grace_period_covers_the_supervisors_drain(docs, config):
    grace_ms = pod_spec(docs)["terminationGracePeriodSeconds"] * 1000
    assert grace_ms >= prestop_ms(main_container(docs)) + config.server.shutdown_timeout_ms + SUPERVISOR_EXIT_MS


# ---- hardening and volumes ---------------------------------------------------------------

def test_every_container_is_hardened_to_the_restricted_pod_security_standard(docs):
    pod = pod_spec(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False, "service links would set INGEST_* variables"
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    for container in all_containers(docs):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert context["seccompProfile"]["type"] == "RuntimeDefault", container["name"]
        assert not context.get("privileged"), container["name"]
    allowed = {"configMap", "secret", "emptyDir", "persistentVolumeClaim", "downwardAPI", "projected"}
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= allowed, volume


def test_every_path_the_appliance_writes_is_a_volume(docs, config):
    container = main_container(docs)
    env = container_env(container, FIELD_VALUES)
    assert is_under(config.server.data_dir, mounts(container, "persistentVolumeClaim", docs))
    assert is_under(env["NUMBA_CACHE_DIR"], mounts(container, "emptyDir", docs))
    assert "/tmp" in mounts(container, "emptyDir", docs)
    assert is_under(config.security.server_secret_key_file, mounts(container, "secret", docs))
    assert is_under(config.security.authorized_keys_dir, mounts(container, "configMap", docs))
    for volume in pod_spec(docs)["volumes"]:
        if "emptyDir" in volume:
            assert "sizeLimit" in volume["emptyDir"], f"emptyDir {volume['name']} has no bound"


def test_the_init_container_writes_the_config_the_appliance_reads(docs):
    init, main = init_container(docs), main_container(docs)
    env = container_env(init, FIELD_VALUES)
    command = main["command"]
    assert command[:2] == ["ingest", "serve"]
    assert command[command.index("--config") + 1] == env["CONFIG_FILE"]
    assert is_under(env["CONFIG_FILE"], mounts(init, "emptyDir", docs))
    assert is_under(env["CONFIG_FILE"], mounts(main, "emptyDir", docs))
    (template_mount,) = [m for m in init["volumeMounts"] if Path(env["CONFIG_TEMPLATE"]).parent == Path(m["mountPath"])]
    (volume,) = [v for v in pod_spec(docs)["volumes"] if v["name"] == template_mount["name"]]
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert Path(env["CONFIG_TEMPLATE"]).name == CONFIG_KEY


def test_volumes_created_by_hand_are_explained_in_the_readme(docs):
    shipped = {docs["ConfigMap"]["metadata"]["name"]}
    readme = (K8S / "README.md").read_text()
    for volume in pod_spec(docs)["volumes"]:
        if "secret" in volume:
            assert f"create secret generic {volume['secret']['secretName']}" in readme
        elif "configMap" in volume and volume["configMap"]["name"] not in shipped:
            assert f"create configmap {volume['configMap']['name']}" in readme


# ---- the init container's script ---------------------------------------------------------

def pod_dns_name(docs: dict) -> str:
    return f"{POD_NAME}.{docs['Service']['metadata']['name']}.{NAMESPACE}.svc.cluster.local"


def test_the_rendered_config_advertises_the_pods_dns_name_and_nothing_else_changes(docs, tmp_path, config):
    result, rendered = render(docs, tmp_path)
    assert result.returncode == 0, result.stderr
    pod_config = config_mod.load(rendered)
    assert pod_config.server.advertised_host == pod_dns_name(docs)
    assert pod_config.advertised_endpoint(7403) == f"tcp://{pod_dns_name(docs)}:7403"
    as_dict = pod_config.to_dict()
    as_dict["server"]["advertised_host"] = ""
    assert as_dict == config.to_dict()


def test_the_render_script_refuses_a_template_without_the_line_to_fill_in(docs, tmp_path):
    template = config_template(docs).replace('advertised_host = ""\n', "")
    result, rendered = render(docs, tmp_path, template=template)
    assert result.returncode != 0
    assert "needs the line" in result.stderr
    assert not rendered.exists()


def test_the_render_script_refuses_a_host_that_is_not_a_dns_name(docs, tmp_path):
    result, rendered = render(docs, tmp_path, env_overrides={"ADVERTISED_HOST": 'x" \nbind = "evil'})
    assert result.returncode != 0
    assert "is not a DNS name" in result.stderr
    assert not rendered.exists()


# ---- the rendered config served by a real appliance --------------------------------------

def set_keys(text: str, values: dict[str, str | int]) -> str:
    """`text` with the line of each key replaced by `key = value` (each exactly once)."""
    for key, value in values.items():
        literal = f'"{value}"' if isinstance(value, str) else str(value)
        text, count = re.subn(rf"^{key} = .*$", f"{key} = {literal}", text, flags=re.MULTILINE)
        assert count == 1, f"{key}: {count} lines"
    return text


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_until_probe_passes(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ingest serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if http_status(url) == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer 200 within {READY_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def test_the_pods_config_serves_metadata_with_its_dns_name_and_drains_within_the_grace_period(docs, tmp_path):
    """The pod's command on its rendered config, moved to loopback, free ports and this test's
    own data directory and keys; everything else as the pod has it (workers, CURVE, drain)."""
    result, rendered = render(docs, tmp_path)
    assert result.returncode == 0, result.stderr
    keys = tmp_path / "keys"
    _, appliance_secret = generate_keys(keys, "appliance")
    (keys / "authorized").mkdir()
    client_public, client_secret = generate_keys(keys, "client")
    client_public.rename(keys / "authorized" / client_public.name)
    port = free_port_block()
    metrics_port = port + PORTS_PER_APPLIANCE - 1
    local = tmp_path / "local.toml"
    local.write_text(set_keys(rendered.read_text(), {
        "bind": "127.0.0.1", "metrics_bind": "127.0.0.1", "port": port, "metrics_port": metrics_port,
        "data_dir": str(tmp_path / "data"), "server_secret_key_file": str(appliance_secret),
        "authorized_keys_dir": str(keys / "authorized")}))
    config = config_mod.load(local)

    main = main_container(docs)
    command = main["command"]
    argv = [str(Path(sys.executable).parent / command[0])] + command[1:]
    argv[argv.index("--config") + 1] = str(local)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        metrics = f"http://127.0.0.1:{metrics_port}"
        wait_until_probe_passes(metrics + main["startupProbe"]["httpGet"]["path"], process, log)
        assert http_status(metrics + main["livenessProbe"]["httpGet"]["path"]) == 200
        curve = ClientCurve.from_files(keys / "appliance.key", client_secret)
        with BootstrapClient(f"tcp://127.0.0.1:{port}", curve=curve) as client:
            meta = client.metadata()
        host = pod_dns_name(docs)
        assert meta["curve"] is True
        assert [(w["pull"], w["router"]) for w in meta["workers"]] == [
            (f"tcp://{host}:{config.worker_pull_port(i)}", f"tcp://{host}:{config.worker_router_port(i)}")
            for i in range(config.server.workers)]

        process.send_signal(signal.SIGTERM)
        grace_s = pod_spec(docs)["terminationGracePeriodSeconds"]
        assert process.wait(grace_s) == 0, log.read_text()[-4000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
