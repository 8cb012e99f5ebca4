"""podman, a real client, against a real regmirror: ``podman login`` + ``push`` + ``pull``
with htpasswd (issue 8), ``podman push`` while the default upstream is down or denies
like Docker Hub (issue 7, finding 4), and Docker Hub pulls through the shipped
``deploy/podman/registries.conf`` mirror (issue 10, item 7).

podman runs rootful and isolated (tests/support/engines.py :class:`Podman`): its own
store (vfs), registries.conf, auth file and XDG directories, in a private mount
namespace whose /etc/hosts sends Docker Hub to 127.0.0.1, so a pull that did not go
through regmirror fails instead of reaching the internet. No container is run.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import aiohttp
import bcrypt
import pytest

from tests.support.engines import SHIPPED_MIRROR, Podman, podman
from tests.support.fake_upstream import Mode, fake_upstream
from tests.support.http import session
from tests.support.metrics import metric
from tests.support.oci_layout import Image, build_image, write_image_layout
from tests.support.processes import REPO_ROOT, ServerProcess, regmirror_server
from tests.support.pullthrough import push_image_to, upstream_env, upstream_proxy
from tests.support.skopeo import Skopeo, skopeo
from tests.support.upstream import upstream_registry

__all__ = ["podman", "regmirror_server", "session", "skopeo", "upstream_registry"]

pytestmark = pytest.mark.skipif(
    shutil.which("skopeo") is None,
    reason="skopeo not installed (Debian package skopeo; tests/run.sh installs it)",
)

SHIPPED_REGISTRIES_CONF = REPO_ROOT / "deploy" / "podman" / "registries.conf"
CI_USER, CI_PASSWORD, WRONG_PASSWORD = "ci", "podman-login-pass-77", "podman-wrong-pass-78"
LAYERS = ({"etc/hostname": 9, "usr/bin/tool": 4096}, {"opt/data.bin": 200 * 1024 + 3})
StartServer = Callable[..., ServerProcess]


def shipped_registries_conf(mirror: str) -> str:
    """deploy/podman/registries.conf with ``localhost:5000`` replaced by ``mirror``."""
    text = SHIPPED_REGISTRIES_CONF.read_text()
    assert SHIPPED_MIRROR in text
    return text.replace(SHIPPED_MIRROR, mirror)


@pytest.fixture(scope="module")
def image() -> Image:
    return build_image(seed=77, layers=LAYERS)


def load_into(podman: Podman, tmp_path: Path, image: Image, reference: str) -> None:
    """Put ``image`` into podman's store as ``reference`` (from an OCI layout on disk)."""
    layout = write_image_layout(tmp_path / f"layout-{image.manifest.digest[7:19]}", image, "v1")
    image_id = podman.run("pull", f"oci:{layout.path}:v1").stdout.split()[-1]
    podman.run("tag", image_id, reference)


# -- issue 8: podman login, push and pull against htpasswd --------------------------------


@pytest.fixture
def htpasswd_server(regmirror_server: StartServer, tmp_path: Path) -> ServerProcess:
    """regmirror with an htpasswd file and no anonymous pull: every client is challenged
    (README "Access control": one answered 200 by GET /v2/ never sends credentials)."""
    hashed = bcrypt.hashpw(CI_PASSWORD.encode(), bcrypt.gensalt(6)).decode()
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"{CI_USER}:{hashed}\n")
    auth = {"htpasswd": str(htpasswd), "anonymous_pull": []}
    return regmirror_server(config={"auth": auth}, ready_status=401)


def test_podman_login_push_and_pull_with_htpasswd(
    htpasswd_server: ServerProcess,
    podman: Podman,
    skopeo: Skopeo,
    image: Image,
    tmp_path: Path,
) -> None:
    server = htpasswd_server
    reference = f"{server.host_port}/team/app:v1"
    layout = write_image_layout(tmp_path / "layout", image, "v1")
    skopeo.copy(
        f"oci:{layout.path}:v1", f"docker://{reference}", f"--dest-creds={CI_USER}:{CI_PASSWORD}"
    )

    def login(password: str, check: bool = True) -> int:
        argv = ("login", "--tls-verify=false", "-u", CI_USER, "--password-stdin", server.host_port)
        return podman.run(*argv, input=password, check=check).returncode

    def logged_in() -> bool:
        return server.host_port in json.loads(podman.auth_file.read_text()).get("auths", {})

    anonymous = podman.run("pull", "--tls-verify=false", reference, check=False)
    assert anonymous.returncode != 0
    assert (
        "unauthorized" in anonymous.stderr.lower() or "authentication required" in anonymous.stderr
    )
    assert login(WRONG_PASSWORD, check=False) != 0
    assert not logged_in()  # a refused login stores nothing
    login(CI_PASSWORD)
    assert logged_in()

    podman.run("pull", "--tls-verify=false", reference)
    assert podman.diff_ids(reference) == image.diff_ids
    pushed = f"{server.host_port}/ci/podman:v1"
    podman.run("tag", reference, pushed)
    podman.run("push", "--tls-verify=false", pushed)

    # What podman pushed is what a client holding the credentials pulls back.
    podman.run("logout", server.host_port)
    assert not logged_in()
    podman.run("rmi", pushed, reference)
    refused = podman.run("pull", "--tls-verify=false", pushed, check=False)
    assert refused.returncode != 0  # logged out: challenged, no credentials
    login(CI_PASSWORD)
    podman.run("pull", "--tls-verify=false", pushed)
    assert podman.diff_ids(pushed) == image.diff_ids

    log = server.logs(None)
    assert CI_PASSWORD not in log and WRONG_PASSWORD not in log
    # The refused login was logged (user, address, reason) and counted.
    assert any("failed login" in line and repr(CI_USER) in line for line in log.splitlines())
    assert metric(server, "regmirror_auth_failures_total", reason="bad_password") >= 1


# -- issue 7, finding 4: podman push with the default upstream down or denying ------------


@pytest.mark.parametrize(
    ("upstream", "kind"), [("down", "unavailable"), ("deny", "denied"), ("forbid", "denied")]
)
async def test_podman_push_succeeds_whatever_the_default_upstream_does(
    upstream: Mode | Literal["down"],
    kind: str,
    regmirror_server: StartServer,
    podman: Podman,
    image: Image,
    tmp_path: Path,
) -> None:
    """The prefix-less upstream serves every name, the one CI pushes to included: the
    blob probes podman sends before each upload must answer 404 from what regmirror
    holds when that upstream refuses connections (down), answers 401 then
    ``insufficient_scope`` like Docker Hub (deny), or 403 (forbid)."""
    down = upstream == "down"
    async with fake_upstream("serve" if upstream == "down" else upstream, running=not down) as fake:
        server = regmirror_server(env=upstream_env(fake.url))
        target = f"{server.host_port}/ci/app:v1"
        await asyncio.to_thread(load_into, podman, tmp_path, image, target)

        await asyncio.to_thread(podman.run, "push", "--tls-verify=false", target)

        await asyncio.to_thread(podman.run, "rmi", target)
        await asyncio.to_thread(podman.run, "pull", "--tls-verify=false", target)
        assert await asyncio.to_thread(podman.diff_ids, target) == image.diff_ids
        # The probes met the upstream's failure, which was counted, not surfaced...
        assert metric(server, "regmirror_upstream_errors_total", kind=kind) >= 1
        if not down:
            # ...and asked it only about the pushed name, only to read.
            assert fake.names() == {"ci/app"}
            assert {seen.method for seen in fake.requests} <= {"GET", "HEAD"}


# -- issue 10, item 7: Docker Hub pulls through the shipped registries.conf mirror --------


async def test_podman_pulls_docker_hub_images_through_the_shipped_registries_conf(
    upstream_registry: ServerProcess,
    regmirror_server: StartServer,
    podman: Podman,
    session: aiohttp.ClientSession,
    image: Image,
) -> None:
    """registry:2 stands in for Docker Hub as regmirror's upstream; podman pulls
    ``docker.io/library/testimg:v1`` with only the shipped registries.conf (host:port
    changed) telling it about the mirror."""
    await push_image_to(session, upstream_registry.url, "library/testimg", image, "v1")
    reference = "docker.io/library/testimg:v1"
    async with upstream_proxy(upstream_registry.url) as proxy:
        server = regmirror_server(env=upstream_env(proxy.url, ns="docker.io"))

        # Without the mirror, Docker Hub's name leads to 127.0.0.1:443: nothing there.
        direct = await asyncio.to_thread(podman.run, "pull", reference, check=False)
        assert direct.returncode != 0
        assert proxy.requests == []

        podman.registries_conf.write_text(shipped_registries_conf(server.host_port))
        before = metric(server, "regmirror_http_requests_total", method="GET")
        await asyncio.to_thread(podman.run, "pull", reference)

        assert await asyncio.to_thread(podman.diff_ids, reference) == image.diff_ids
        # It went podman -> regmirror -> the upstream, which served every blob once.
        assert metric(server, "regmirror_http_requests_total", method="GET") > before
        assert proxy.count("GET", "manifests") >= 1
        assert proxy.blob_gets == len(image.blobs)
        assert {
            path.split("/manifests/")[0] for _, path in proxy.requests if "/manifests/" in path
        } == {"/v2/library/testimg"}


def test_the_shipped_registries_conf_mirrors_docker_hub_to_the_local_regmirror() -> None:
    conf = tomllib.loads(SHIPPED_REGISTRIES_CONF.read_text())
    (registry,) = conf["registry"]
    assert (registry["prefix"], registry["location"]) == ("docker.io", "registry-1.docker.io")
    assert registry["mirror"] == [{"location": "localhost:5000", "insecure": True}]
