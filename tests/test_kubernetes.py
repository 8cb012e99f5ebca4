"""deploy/kubernetes/ stays in step with the code: the manifests validate against the
Kubernetes API schemas (kubernetes-validate, offline), and the fields that matter agree
with regmirror itself: the config loads, the probes name endpoints the app serves on the
port it listens on, the volume is mounted where data_dir points, the user is the image's,
and the hosts.toml laid down on nodes points containerd at that listener."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from regmirror.app import create_app
from regmirror.cli import main
from regmirror.config import ServerSettings, Settings, load

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
# `regmirror serve` gives in-flight requests this long after SIGTERM, in total.
DRAIN_SECONDS = ServerSettings().drain_timeout


def manifest(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((KUBE / name).read_text())
    return document


def daemonset() -> dict[str, Any]:
    return manifest("daemonset.yaml")


def pod() -> dict[str, Any]:
    spec: dict[str, Any] = daemonset()["spec"]["template"]["spec"]
    return spec


def container(name: str = "regmirror") -> dict[str, Any]:
    spec = pod()
    [found] = [c for c in spec["containers"] + spec["initContainers"] if c["name"] == name]
    return found


def mounts(c: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in c["volumeMounts"]}


def volumes() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod()["volumes"]}


def config() -> Settings:
    return load(KUBE / "config.yml", environ={})


def hosts_toml() -> dict[str, Any]:
    return tomllib.loads((KUBE / "hosts.toml").read_text())


# -- schemas ---------------------------------------------------------------------------


def _validate(document: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize(
    "name", ["namespace.yaml", "serviceaccount.yaml", "daemonset.yaml", "secret.example.yaml"]
)
def test_manifests_validate_against_the_kubernetes_schemas(name: str) -> None:
    _validate(manifest(name))


def test_the_schema_check_catches_a_misspelt_field() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    broken = copy.deepcopy(daemonset())
    c = broken["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


def test_the_kustomization_lists_every_manifest_and_generates_the_config() -> None:
    kustomization = manifest("kustomization.yaml")
    assert kustomization["namespace"] == "regmirror"
    assert sorted(kustomization["resources"]) == sorted(
        p.name
        for p in KUBE.glob("*.yaml")
        if p.name not in ("kustomization.yaml", "secret.example.yaml")
    )
    [generator] = kustomization["configMapGenerator"]
    assert generator["name"] == volumes()["config"]["configMap"]["name"]
    assert sorted(generator["files"]) == ["config.yml", "hosts.toml"]
    [image] = kustomization["images"]
    assert image["name"] == container()["image"] == container("node-setup")["image"]


def test_kustomize_builds_what_kubectl_would_apply() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the kustomize build is not checked")
    built = subprocess.run(
        [kubectl, "kustomize", str(KUBE)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    documents = {d["kind"]: d for d in yaml.safe_load_all(built)}
    assert set(documents) == {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "PodMonitor"}
    configmap = documents["ConfigMap"]
    assert re.fullmatch(r"regmirror-config-[a-z0-9]{10}", configmap["metadata"]["name"])
    assert configmap["data"]["hosts.toml"] == (KUBE / "hosts.toml").read_text()
    spec = documents["DaemonSet"]["spec"]["template"]["spec"]
    [config_volume] = [v for v in spec["volumes"] if v["name"] == "config"]
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    image = manifest("kustomization.yaml")["images"][0]
    assert spec["containers"][0]["image"] == f"{image['newName']}:{image['newTag']}"
    for document in documents.values():
        assert document["metadata"].get("namespace", "regmirror") == "regmirror"
        if document["kind"] != "PodMonitor":  # a CRD: no schema here
            _validate(document)


# -- the node agent ------------------------------------------------------------------------


def test_it_runs_in_the_nodes_network_on_loopback() -> None:
    spec = pod()
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "Default"  # the node's resolver: no dependency on CoreDNS
    assert config().host_port() == ("127.0.0.1", 5000)
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["priorityClassName"] == "system-node-critical"


def test_it_runs_the_serve_command_with_the_configmap() -> None:
    c = container()
    command = c["command"]
    assert command[:2] == ["regmirror", "serve"]
    assert "--listen" not in command and "--data-dir" not in command  # config.yml decides
    config_path = Path(command[command.index("--config") + 1])
    assert str(config_path.parent) == mounts(c)["config"]
    assert config_path.name == "config.yml"
    with pytest.raises(SystemExit) as exc:  # the flags exist: --help parses after them
        main([*command[1:], "--help"])
    assert exc.value.code == 0


def test_the_probes_ask_endpoints_regmirror_serves_where_it_listens(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=str(tmp_path)))
    served = {r.get_info().get("path") for r in app.router.resources()}
    host, port = config().host_port()
    c = container()
    probes = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    for probe, path in probes.items():
        get = c[probe]["httpGet"]
        assert (get["host"], get["port"], get["path"]) == (host, port, path)
        assert path in served


def test_the_cache_lives_on_a_host_path_where_data_dir_points() -> None:
    data = volumes()["data"]
    assert data["hostPath"] == {"path": "/var/lib/regmirror", "type": "DirectoryOrCreate"}
    assert mounts(container())["data"] == config().data_dir == "/var/lib/regmirror"
    assert mounts(container("node-setup"))["data"] == config().data_dir


def test_regmirror_runs_unprivileged_as_the_images_user() -> None:
    uid = re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert uid is not None
    security = container()["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == security["runAsGroup"] == int(uid[1])
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod()["automountServiceAccountToken"] is False
    assert pod()["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_the_node_setup_gets_only_the_capabilities_it_needs() -> None:
    security = container("node-setup")["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) <= {"CHOWN", "FOWNER", "DAC_OVERRIDE"}
    uid = container()["securityContext"]["runAsUser"]
    script = container("node-setup")["command"][-1]
    assert f"chown {uid}:{uid} {config().data_dir}" in script


def test_it_has_resources_and_room_to_drain() -> None:
    resources = container()["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert "memory" in resources["limits"]
    assert pod()["terminationGracePeriodSeconds"] >= DRAIN_SECONDS + 10


def test_credentials_come_from_the_secret_and_override_the_config() -> None:
    [source] = container()["envFrom"]
    secret = manifest("secret.example.yaml")
    assert source["secretRef"] == {"name": secret["metadata"]["name"], "optional": True}
    variables = secret["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(variables)
    settings = load(KUBE / "config.yml", environ=variables)
    docker_hub = settings.upstreams[0]
    assert docker_hub.ns == "docker.io"
    assert (docker_hub.username, docker_hub.password) == (
        variables["REGMIRROR_UPSTREAMS__0__USERNAME"],
        variables["REGMIRROR_UPSTREAMS__0__PASSWORD"],
    )
    assert "password" not in (KUBE / "config.yml").read_text().lower()


# -- containerd on the node --------------------------------------------------------------


def test_hosts_toml_sends_docker_io_pulls_to_the_local_regmirror() -> None:
    host, port = config().host_port()
    hosts = hosts_toml()
    assert hosts["server"] == "https://registry-1.docker.io"  # the fallback
    assert hosts["host"] == {f"http://{host}:{port}": {"capabilities": ["pull", "resolve"]}}
    # The same file as deploy/containerd's, but for 127.0.0.1 rather than localhost.
    shipped = tomllib.loads((ROOT / "deploy/containerd/docker.io/hosts.toml").read_text())
    assert shipped["server"] == hosts["server"]
    assert list(shipped["host"].values()) == list(hosts["host"].values())
    assert any(u.ns == "docker.io" for u in config().upstreams)


def test_the_init_container_lays_hosts_toml_where_containerd_reads_it() -> None:
    setup = container("node-setup")
    certs_d = volumes()["certs-d"]["hostPath"]["path"]
    assert certs_d == "/etc/containerd/certs.d"
    assert mounts(setup)["certs-d"] == certs_d
    script = setup["command"][-1]
    source = f"{mounts(setup)['config']}/hosts.toml"
    target = f"{certs_d}/docker.io/hosts.toml"
    assert f"cp {source} " in script
    assert script.rstrip().endswith(f" {target}") and "mv -f " in script  # atomically


# -- Prometheus ------------------------------------------------------------------------------


def test_the_podmonitor_scrapes_the_metrics_port_of_these_pods() -> None:
    monitor = manifest("podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "PodMonitor"
    labels = daemonset()["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    env = {e["name"]: e for e in container()["env"]}
    listen = env["REGMIRROR_METRICS_LISTEN"]["value"]
    assert listen == f"$({env['NODE_IP']['name']}):{ports[endpoint['port']]}"
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert {"targetLabel": "job", "replacement": "regmirror"} in endpoint["relabelings"]
