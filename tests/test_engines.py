"""Real container engines against a real regmirror: a Docker engine pulls and pushes
(directly, through the shipped ``daemon.json`` mirror snippet, and over mutual TLS with
``certs.d``), and containerd pulls through the shipped ``hosts.toml``. Where regmirror
pulls through, a registry:2 behind a counting proxy stands in for Docker Hub, so the
tests see what reached the upstream (nothing, after ``regmirror warm``).

Images are generated (tests/support/oci_layout.py) and pushed into regmirror with skopeo
first. The engines run in a private mount namespace whose /etc/hosts sends Docker Hub to
127.0.0.1 (tests/support/engines.py), so a pull that did not go through regmirror fails
instead of reaching the internet.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
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
from tests.support.fake_upstream import fake_upstream
from tests.support.http import session
from tests.support.oci_layout import Image, build_image, write_image_layout
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    REPO_ROOT,
    ServerProcess,
    regmirror_server,
)
from tests.support.pullthrough import UpstreamProxy, push_image_to, upstream_env, upstream_proxy
from tests.support.skopeo import Skopeo, skopeo
from tests.support.upstream import upstream_registry  # noqa: F401  (pytest fixture)

__all__ = ["session", "skopeo"]  # pytest fixtures

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
async def hub_proxy(
    upstream_registry: ServerProcess,  # noqa: F811
) -> AsyncIterator[UpstreamProxy]:
    """A counting proxy in front of the registry:2 that stands in for Docker Hub."""
    async with upstream_proxy(upstream_registry.url) as proxy:
        yield proxy


def upstream_manifest_names(proxy: UpstreamProxy) -> set[str]:
    """The repositories whose manifests reached the upstream."""
    paths = (path for _, path in proxy.requests if "/manifests/" in path)
    return {path.removeprefix("/v2/").split("/manifests/")[0] for path in paths}


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


async def test_docker_pull_alpine_goes_through_registry_mirrors_to_the_upstream(
    upstream_registry: ServerProcess,  # noqa: F811
    hub_proxy: UpstreamProxy,
    regmirror_server: StartServer,  # noqa: F811
    docker_engine: StartDocker,  # noqa: F811
    session: aiohttp.ClientSession,
    image: Image,
) -> None:
    """What a host does: ``docker pull alpine:3.19`` with the shipped daemon.json; the
    registry:2 standing in for Docker Hub holds library/alpine:3.19 and regmirror
    fills from it."""
    await push_image_to(session, upstream_registry.url, "library/alpine", image, "3.19")
    server = regmirror_server(env=upstream_env(hub_proxy.url, ns="docker.io"))
    docker = await asyncio.to_thread(
        docker_engine, daemon_json=shipped_daemon_json(server.host_port)
    )
    await asyncio.to_thread(docker.run, "pull", "alpine:3.19")
    assert await asyncio.to_thread(diff_ids, docker, "alpine:3.19") == image.diff_ids
    assert requests_seen(server, "/v2/{name}/manifests/{reference}") >= 1
    assert upstream_manifest_names(hub_proxy) == {"library/alpine"}
    assert hub_proxy.blob_gets == len(image.blobs)  # each blob filled once


async def warm(server: ServerProcess, *references: str) -> subprocess.CompletedProcess[bytes]:
    """``python -m regmirror warm --url SERVER REFERENCES`` (this checkout's code),
    awaited without blocking the loop the proxy runs on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGMIRROR_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    argv = [sys.executable, "-m", "regmirror", "warm", "--url", server.url, *references]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return subprocess.CompletedProcess(argv, process.returncode, output)


async def test_after_regmirror_warm_a_docker_pull_makes_no_upstream_request(
    upstream_registry: ServerProcess,  # noqa: F811
    hub_proxy: UpstreamProxy,
    regmirror_server: StartServer,  # noqa: F811
    docker_engine: StartDocker,  # noqa: F811
    session: aiohttp.ClientSession,
    image: Image,
) -> None:
    await push_image_to(session, upstream_registry.url, "library/alpine", image, "3.19")
    server = regmirror_server(env=upstream_env(hub_proxy.url, ns="docker.io"))
    warmed = await warm(server, "library/alpine:3.19")
    assert warmed.returncode == 0, warmed.stdout.decode()
    assert hub_proxy.blob_gets == len(image.blobs)
    hub_proxy.requests.clear()

    docker = await asyncio.to_thread(
        docker_engine, daemon_json=shipped_daemon_json(server.host_port)
    )
    before = requests_seen(server, "/v2/{name}/blobs/{digest}")
    await asyncio.to_thread(docker.run, "pull", "alpine:3.19")
    assert await asyncio.to_thread(diff_ids, docker, "alpine:3.19") == image.diff_ids
    # docker fetched the layers from regmirror, and regmirror asked the upstream nothing.
    assert requests_seen(server, "/v2/{name}/blobs/{digest}") - before >= len(image.layers)
    assert hub_proxy.requests == []


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


async def test_containerd_ns_docker_io_is_answered_by_the_upstream_bound_to_docker_io(
    upstream_registry: ServerProcess,  # noqa: F811
    hub_proxy: UpstreamProxy,
    regmirror_server: StartServer,  # noqa: F811
    containerd_engine: Callable[..., Containerd],  # noqa: F811
    session: aiohttp.ClientSession,
    image: Image,
) -> None:
    """containerd adds ``?ns=docker.io`` to what it asks the mirror of the shipped
    hosts.toml; regmirror answers from the upstream whose ``ns`` is docker.io (here
    under a prefix), not from the default upstream, which holds another image under
    the same name."""
    await push_image_to(session, upstream_registry.url, "library/testimg", image, "ns")
    decoy = build_image(seed=42, layers=LAYERS)
    async with fake_upstream() as default:
        default.add_image("library/testimg", decoy, "ns")
        env = {
            **upstream_env(default.url),
            **upstream_env(hub_proxy.url, 1, prefix="hub", ns="docker.io"),
        }
        server = regmirror_server(env=env)
        containerd = await asyncio.to_thread(containerd_engine)
        containerd.hosts_toml("docker.io", shipped_hosts_toml(server.host_port))
        await asyncio.to_thread(
            containerd.ctr,
            "images", "pull", "--hosts-dir", str(containerd.hosts_dir), "--snapshotter", "native",
            "docker.io/library/testimg:ns",
        )  # fmt: skip
        content = set(containerd.ctr("content", "ls", "--quiet").stdout.split())
        assert {layer.digest for layer in image.layers} <= content
        assert not {layer.digest for layer in decoy.layers} & content
        assert upstream_manifest_names(hub_proxy) == {"library/testimg"}
        assert default.requests == []
        # Without ?ns= the same name is the default upstream's: the decoy.
        async with session.get(f"{server.url}/v2/library/testimg/manifests/ns") as response:
            assert response.status == 200
            assert response.headers["Docker-Content-Digest"] == decoy.manifest.digest
