"""Real container engines against a real regmirror: a Docker engine pulls and pushes
(directly, through the shipped ``daemon.json`` mirror snippet, and over mutual TLS with
``certs.d``), and containerd pulls through the shipped ``hosts.toml``.

Images are generated (tests/support/oci_layout.py) and pushed into regmirror with skopeo
first. The engines run in a private mount namespace whose /etc/hosts sends Docker Hub to
127.0.0.1 (tests/support/engines.py), so a pull that did not go through regmirror fails
instead of reaching the internet.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest

from tests.support.certs import Issued, TestCA
from tests.support.engines import (  # noqa: F401  (pytest fixtures)
    Containerd,
    Docker,
    containerd_engine,
    docker_engine,
    loopback6_forwarder,
    shipped_daemon_json,
    shipped_hosts_toml,
)
from tests.support.oci_layout import Image, build_image, write_image_layout
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    ServerProcess,
    regmirror_server,
)
from tests.support.skopeo import Skopeo

pytestmark = pytest.mark.skipif(
    shutil.which("skopeo") is None,
    reason="skopeo not installed (Debian package skopeo; tests/run.sh installs it)",
)

CI_USER, CI_PASSWORD = "ci", "docker-login-pass-41"
StartServer = Callable[..., ServerProcess]
StartDocker = Callable[..., Docker]
LAYERS = ({"etc/hostname": 9, "usr/bin/tool": 4096}, {"opt/data.bin": 300 * 1024 + 7})


@pytest.fixture(scope="module")
def image() -> Image:
    return build_image(seed=41, layers=LAYERS)


@pytest.fixture
def skopeo(tmp_path: Path) -> Skopeo:
    return Skopeo(tmp_path / "skopeo")


def push(skopeo: Skopeo, tmp_path: Path, image: Image, target: str, *flags: str) -> None:
    """Push ``image`` to ``target`` (``host:port/repo:tag``) with skopeo."""
    layout = write_image_layout(tmp_path / "layout", image, "v1")
    skopeo.copy(f"oci:{layout.path}:v1", f"docker://{target}", *flags)


def diff_ids(docker: Docker, reference: str) -> list[str]:
    inspected = json.loads(docker.run("image", "inspect", reference).stdout)
    layers: list[str] = inspected[0]["RootFS"]["Layers"]
    return layers


def requests_seen(server: ServerProcess, path: str) -> int:
    """How many requests for ``path`` regmirror answered (from its metrics)."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("regmirror_http_requests_total") and f'route="{path}"' in line
    )


# -- Docker engine ----------------------------------------------------------------------


def test_docker_pulls_an_image_pushed_to_regmirror(
    regmirror_server: StartServer,  # noqa: F811
    docker_engine: StartDocker,  # noqa: F811
    skopeo: Skopeo,
    image: Image,
    tmp_path: Path,
) -> None:
    server = regmirror_server()
    push(skopeo, tmp_path, image, f"{server.host_port}/team/app:v1")
    docker = docker_engine()
    reference = f"{server.host_port}/team/app:v1"
    docker.run("pull", reference)
    assert diff_ids(docker, reference) == image.diff_ids


def test_docker_pushes_to_regmirror(
    regmirror_server: StartServer,  # noqa: F811
    docker_engine: StartDocker,  # noqa: F811
    skopeo: Skopeo,
    image: Image,
    tmp_path: Path,
) -> None:
    server = regmirror_server()
    push(skopeo, tmp_path, image, f"{server.host_port}/team/app:v1")
    docker = docker_engine()
    docker.run("pull", f"{server.host_port}/team/app:v1")
    pushed = f"{server.host_port}/ci/pushed:v2"
    docker.run("tag", f"{server.host_port}/team/app:v1", pushed)
    docker.run("push", pushed)
    # What docker pushed is what a fresh engine pulls back.
    docker.run("image", "rm", pushed, f"{server.host_port}/team/app:v1")
    docker.run("pull", pushed)
    assert diff_ids(docker, pushed) == image.diff_ids
    skopeo.run("inspect", "--tls-verify=false", f"docker://{pushed}")


def test_docker_hub_pulls_go_through_the_shipped_daemon_json_mirror(
    regmirror_server: StartServer,  # noqa: F811
    docker_engine: StartDocker,  # noqa: F811
    skopeo: Skopeo,
    image: Image,
    tmp_path: Path,
) -> None:
    server = regmirror_server()
    # What Docker Hub calls "testimg" is library/testimg.
    push(skopeo, tmp_path, image, f"{server.host_port}/library/testimg:v1")
    docker = docker_engine(daemon_json=shipped_daemon_json(server.host_port))
    before = requests_seen(server, "/v2/{name}/manifests/{reference}")
    docker.run("pull", "testimg:v1")  # docker.io/library/testimg:v1
    assert diff_ids(docker, "testimg:v1") == image.diff_ids
    assert requests_seen(server, "/v2/{name}/manifests/{reference}") > before


REGISTRY_NAME = "regmirror.test"  # mapped to ::1 in the engine's /etc/hosts


@pytest.fixture(params=[False, True], ids=["tls", "mutual-tls"])
def tls_server(
    regmirror_server: StartServer,  # noqa: F811
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[TLSServer]:
    """regmirror over HTTPS, and over mutual TLS, reachable by docker as
    ``regmirror.test:PORT``: a registry docker treats as secure (it checks certificates
    and reads certs.d)."""
    ca = TestCA(tmp_path / "pki")
    issued, client = ca.server(hosts=(REGISTRY_NAME, "127.0.0.1")), ca.client()
    tls = {"cert": str(issued.cert), "key": str(issued.key)}
    mutual: bool = request.param
    if mutual:
        tls["client_ca"] = str(ca.cert)
    trust = ssl.create_default_context(cafile=str(ca.cert))
    trust.load_cert_chain(client.cert, client.key)
    server = regmirror_server(config={"tls": tls}, ssl_context=trust)
    certs = tmp_path / "skopeo-certs"
    certs.mkdir()
    for source, name in (
        (ca.cert, "ca.crt"),
        (client.cert, "client.cert"),
        (client.key, "client.key"),
    ):
        shutil.copy(source, certs / name)
    with loopback6_forwarder(server.port) as port:
        yield TLSServer(server, ca, client, certs, f"{REGISTRY_NAME}:{port}", mutual)


@dataclass
class TLSServer:
    server: ServerProcess
    ca: TestCA
    client: Issued
    skopeo_certs: Path  # ca.crt, client.cert, client.key
    name: str  # regmirror.test:PORT
    mutual: bool

    def push(self, skopeo: Skopeo, tmp_path: Path, image: Image, repo: str) -> None:
        layout = write_image_layout(tmp_path / "layout", image, "v1")
        target = f"docker://{self.server.host_port}/{repo}"
        skopeo.run(
            "copy", "--dest-cert-dir", str(self.skopeo_certs), f"oci:{layout.path}:v1", target
        )

    def docker(self, start: StartDocker) -> Docker:
        return start(extra_hosts={REGISTRY_NAME: "::1"})


def test_docker_pulls_and_pushes_over_https_and_mutual_tls_with_certs_d(
    tls_server: TLSServer,
    docker_engine: StartDocker,  # noqa: F811
    skopeo: Skopeo,
    image: Image,
    tmp_path: Path,
) -> None:
    tls_server.push(skopeo, tmp_path, image, "team/app:v1")
    docker = tls_server.docker(docker_engine)
    reference = f"{tls_server.name}/team/app:v1"
    untrusted = docker.run("pull", reference, check=False)
    assert untrusted.returncode != 0
    assert "certificate signed by unknown authority" in untrusted.stderr
    certs = docker.certs_d(tls_server.name)
    shutil.copy(tls_server.ca.cert, certs / "ca.crt")
    if tls_server.mutual:
        refused = docker.run("pull", reference, check=False)
        assert refused.returncode != 0  # the CA is trusted, but no client certificate
        shutil.copy(tls_server.client.cert, certs / "client.cert")
        shutil.copy(tls_server.client.key, certs / "client.key")
    docker.run("pull", reference)  # certs.d is read on every pull
    assert diff_ids(docker, reference) == image.diff_ids
    pushed = f"{tls_server.name}/ci/over-tls:v1"
    docker.run("tag", reference, pushed)
    docker.run("push", pushed)
    skopeo.run(
        "inspect",
        "--cert-dir",
        str(tls_server.skopeo_certs),
        f"docker://{tls_server.server.host_port}/ci/over-tls:v1",
    )


def test_docker_login_push_and_pull_with_htpasswd(
    regmirror_server: StartServer,  # noqa: F811
    docker_engine: StartDocker,  # noqa: F811
    skopeo: Skopeo,
    image: Image,
    tmp_path: Path,
) -> None:
    hashed = bcrypt.hashpw(CI_PASSWORD.encode(), bcrypt.gensalt(6)).decode()
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"{CI_USER}:{hashed}\n")
    auth = {"htpasswd": str(htpasswd), "anonymous_pull": []}  # every request authenticates
    server = regmirror_server(config={"auth": auth}, ready_status=401)
    reference = f"{server.host_port}/team/app:v1"
    push(skopeo, tmp_path, image, reference, f"--dest-creds={CI_USER}:{CI_PASSWORD}")
    docker = docker_engine()

    def login(password: str, check: bool = True) -> int:
        argv = ("login", "-u", CI_USER, "--password-stdin", server.host_port)
        return docker.run(*argv, input=password, check=check).returncode

    anonymous = docker.run("pull", reference, check=False)
    assert anonymous.returncode != 0 and "no basic auth credentials" in anonymous.stderr
    assert login("not-it", check=False) != 0
    login(CI_PASSWORD)
    docker.run("pull", reference)
    assert diff_ids(docker, reference) == image.diff_ids
    pushed = f"{server.host_port}/ci/logged-in:v1"
    docker.run("tag", reference, pushed)
    docker.run("push", pushed)
    docker.run("logout", server.host_port)
    docker.run("image", "rm", pushed, reference)
    assert docker.run("pull", pushed, check=False).returncode != 0  # logged out
    login(CI_PASSWORD)
    docker.run("pull", pushed)
    assert diff_ids(docker, pushed) == image.diff_ids
    assert CI_PASSWORD not in server.logs(None) + docker.logs(100_000)


# -- containerd -------------------------------------------------------------------------


def test_containerd_pulls_docker_hub_images_through_the_shipped_hosts_toml(
    regmirror_server: StartServer,  # noqa: F811
    containerd_engine: Callable[..., Containerd],  # noqa: F811
    skopeo: Skopeo,
    image: Image,
    tmp_path: Path,
) -> None:
    server = regmirror_server()
    push(skopeo, tmp_path, image, f"{server.host_port}/library/testimg:v1")
    containerd = containerd_engine()
    containerd.hosts_toml("docker.io", shipped_hosts_toml(server.host_port))
    before = requests_seen(server, "/v2/{name}/manifests/{reference}")
    containerd.ctr(
        "images", "pull", "--hosts-dir", str(containerd.hosts_dir), "--snapshotter", "native",
        "docker.io/library/testimg:v1",
    )  # fmt: skip
    listed = containerd.ctr("images", "ls", "--quiet").stdout.split()
    assert "docker.io/library/testimg:v1" in listed
    assert requests_seen(server, "/v2/{name}/manifests/{reference}") > before
    content = containerd.ctr("content", "ls", "--quiet").stdout.split()
    assert {layer.digest for layer in image.layers} <= set(content)


def test_containerd_pulls_over_https_and_mutual_tls_with_hosts_toml(
    tls_server: TLSServer,
    containerd_engine: Callable[..., Containerd],  # noqa: F811
    skopeo: Skopeo,
    image: Image,
    tmp_path: Path,
) -> None:
    tls_server.push(skopeo, tmp_path, image, "team/app:v1")
    containerd = containerd_engine()
    registry = tls_server.server.host_port
    pki = tls_server.ca.cert.parent

    def pull() -> subprocess.CompletedProcess[str]:
        return containerd.ctr(
            "images", "pull", "--hosts-dir", str(containerd.hosts_dir), "--snapshotter", "native",
            f"{registry}/team/app:v1", check=False,
        )  # fmt: skip

    host = f'server = "https://{registry}"\n[host."https://{registry}"]\n  capabilities = ["pull", "resolve"]\n'
    containerd.hosts_toml(registry, host)
    untrusted = pull()
    assert untrusted.returncode != 0 and "certificate" in untrusted.stderr
    host += f'  ca = "{tls_server.ca.cert}"\n'
    if tls_server.mutual:
        containerd.hosts_toml(registry, host)
        assert pull().returncode != 0  # the CA is trusted, but no client certificate
        host += f'  client = [["{pki / "client.crt"}", "{pki / "client.key"}"]]\n'
    containerd.hosts_toml(registry, host)
    pulled = pull()
    assert pulled.returncode == 0, pulled.stderr
    content = containerd.ctr("content", "ls", "--quiet").stdout.split()
    assert {layer.digest for layer in image.layers} <= set(content)
