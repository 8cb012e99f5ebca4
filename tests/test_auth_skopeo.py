"""skopeo, a real client, against a real regmirror process with access control: Basic
credentials from an htpasswd file, and the Bearer flow through a token service the test
runs. Every server runs at DEBUG, and its whole log is searched for the test's passwords
and tokens afterwards."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.auth import leaked, secret, write_htpasswd
from tests.support.oci_layout import Image, build_image, read_layout, write_image_layout
from tests.support.processes import ServerProcess, regmirror_server  # noqa: F401
from tests.support.skopeo import Skopeo, skopeo
from tests.support.token_server import ISSUER, SERVICE, TokenIssuer, User, run_token_server

__all__ = ["skopeo"]  # a pytest fixture

pytestmark = pytest.mark.skipif(
    shutil.which("skopeo") is None,
    reason="skopeo not installed (Debian package skopeo; tests/run.sh installs it)",
)

CI_PASSWORD = secret("ci-skopeo-Pa55")
READER_PASSWORD = secret("reader-skopeo-Pa55")


@pytest.fixture(scope="module")
def image() -> Image:
    return build_image(seed=21, layers=({"etc/a": 100, "bin/b": 70000}, {"usr/c": 300000}))


@pytest.fixture
def server_with(
    regmirror_server: Callable[..., ServerProcess],  # noqa: F811
) -> Iterator[Callable[..., ServerProcess]]:
    """Start regmirror at DEBUG with ``auth``; after the test, no secret in its log."""
    started: list[ServerProcess] = []

    def start(auth: dict[str, Any]) -> ServerProcess:
        loopback_pulls = auth.get("anonymous_pull", ["127.0.0.0/8"]) != []
        server = regmirror_server(
            config={"auth": auth}, log_level="DEBUG", ready_status=200 if loopback_pulls else 401
        )
        started.append(server)
        return server

    yield start
    for server in started:
        log = server.logs(None)
        assert "GET /v2/" in log or "serving" in log  # the log is the server's
        assert not leaked(log), f"secrets in {server.log_path}: {leaked(log)}"


def push(skopeo: Skopeo, tmp_path: Path, image: Image, destination: str, *flags: str) -> Any:
    layout = write_image_layout(tmp_path / "src", image, "v1")
    return skopeo.run(
        "copy",
        "--dest-tls-verify=false",
        *flags,
        f"oci:{layout.path}:v1",
        destination,
        check=False,
    )


def pull(skopeo: Skopeo, source: str, out: Path, *flags: str) -> Any:
    return skopeo.run(
        "copy", "--src-tls-verify=false", *flags, source, f"oci:{out}:v1", check=False
    )


def assert_pulled(out: Path, image: Image) -> None:
    pulled = read_layout(out)
    assert pulled.ref("v1")["digest"] == image.manifest.digest
    for digest, data in image.blobs.items():
        assert pulled.blobs[digest] == data


@pytest.fixture
def htpasswd_auth(tmp_path: Path) -> dict[str, Any]:
    path = write_htpasswd(tmp_path / "htpasswd", {"ci": CI_PASSWORD, "reader": READER_PASSWORD})
    return {
        "htpasswd": str(path),
        "anonymous_pull": [],
        "rules": [
            {"user": "ci", "repositories": ["*"], "actions": ["pull", "push"]},
            {"user": "reader", "repositories": ["*"], "actions": ["pull"]},
        ],
    }


def test_skopeo_pushes_and_pulls_with_htpasswd_credentials(
    skopeo, server_with, htpasswd_auth, image, tmp_path
):
    server = server_with(htpasswd_auth)
    repo = f"docker://{server.host_port}/team/app:v1"

    result = push(skopeo, tmp_path, image, repo, "--dest-creds", f"ci:{CI_PASSWORD}")
    assert result.returncode == 0, result.stderr
    result = pull(skopeo, repo, tmp_path / "out", "--src-creds", f"reader:{READER_PASSWORD}")
    assert result.returncode == 0, result.stderr
    assert_pulled(tmp_path / "out", image)


def test_skopeo_is_refused_without_or_with_wrong_credentials(
    skopeo, server_with, htpasswd_auth, image, tmp_path
):
    server = server_with(htpasswd_auth)
    repo = f"docker://{server.host_port}/team/app:v1"

    anonymous = push(skopeo, tmp_path, image, repo)
    wrong = push(skopeo, tmp_path, image, repo, "--dest-creds", "ci:not-the-password")
    reader = push(skopeo, tmp_path, image, repo, "--dest-creds", f"reader:{READER_PASSWORD}")
    anonymous_pull = pull(skopeo, repo, tmp_path / "out")

    for result in (anonymous, wrong, anonymous_pull):
        assert result.returncode != 0
        assert "unauthorized" in result.stderr.lower() or "401" in result.stderr, result.stderr
    assert reader.returncode != 0
    assert "denied" in reader.stderr.lower(), reader.stderr
    log = server.logs(None)
    assert "failed login (basic) for user 'ci'" in log
    assert "not granted" in log


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    return TokenIssuer()


@pytest.mark.parametrize("keys", ["rootcertbundle", "jwks"])
def test_skopeo_pushes_and_pulls_through_a_token_service(
    skopeo, server_with, issuer, image, tmp_path, keys
):
    key_file = (
        issuer.write_rootcertbundle(tmp_path / "root.pem")
        if keys == "rootcertbundle"
        else issuer.write_jwks(tmp_path / "jwks.json")
    )
    users = {
        "ci": User(CI_PASSWORD, {"team/*": ["pull", "push"]}),
        "reader": User(READER_PASSWORD, {"*": ["pull"]}),
    }
    with run_token_server(issuer, users) as tokens:
        server = server_with(
            {
                "anonymous_pull": [],
                "token": {
                    "realm": tokens.url,
                    "service": SERVICE,
                    "issuer": ISSUER,
                    keys: str(key_file),
                },
            }
        )
        repo = f"docker://{server.host_port}/team/app:v1"

        pushed = push(skopeo, tmp_path, image, repo, "--dest-creds", f"ci:{CI_PASSWORD}")
        assert pushed.returncode == 0, pushed.stderr
        pulled = pull(skopeo, repo, tmp_path / "out", "--src-creds", f"reader:{READER_PASSWORD}")
        assert pulled.returncode == 0, pulled.stderr
        assert_pulled(tmp_path / "out", image)
        refused = push(skopeo, tmp_path, image, repo, "--dest-creds", f"reader:{READER_PASSWORD}")
        assert refused.returncode != 0

    asked = {scope for request in tokens.requests for scope in request["scopes"]}
    assert "repository:team/app:pull,push" in asked
    assert {r["service"] for r in tokens.requests} == {SERVICE}
    assert "insufficient_scope" in server.logs(None) or "not granted" in server.logs(None)
