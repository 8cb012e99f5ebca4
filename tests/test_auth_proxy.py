"""Behind the nginx tier of deploy/nginx/: the backends believe X-Forwarded-For from the
tier (auth.trusted_proxies) and decide anonymous pull by the real client's address; a
client cannot claim another address by sending the header itself.

Real processes: nginx with the tier config as shipped (backends and listen rewritten to
this machine's ports) in front of a regmirror process. Clients connect from distinct
loopback addresses (127.0.0.2, 127.0.0.3) to be told apart.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from http.client import HTTPConnection

import pytest

from tests.support.auth import write_htpasswd
from tests.support.nginx import tier
from tests.support.processes import (  # noqa: F401  (fixtures)
    ServerProcess,
    regmirror_server,
)

__all__ = ["tier"]  # a pytest fixture

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")


def get_from(source: str, url: str, path: str, headers: dict[str, str] | None = None) -> int:
    """``GET path`` from the local address ``source``; the status."""
    host, port = url.removeprefix("http://").split(":")
    connection = HTTPConnection(host, int(port), timeout=30, source_address=(source, 0))
    try:
        connection.request("GET", path, headers=headers or {})
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.fixture
def backend(regmirror_server, tmp_path) -> ServerProcess:  # noqa: F811
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"ci": "unused-here"})
    auth = {
        "htpasswd": str(htpasswd),
        "anonymous_pull": ["127.0.0.2/32"],
        "trusted_proxies": ["127.0.0.1/32"],
    }
    # The readiness probe comes from 127.0.0.1: a trusted proxy, not an anonymous client.
    return regmirror_server(config={"auth": auth}, ready_status=401)


def test_the_tier_passes_the_client_address_and_the_backend_believes_it(backend, tier):
    url = tier([backend.port])

    assert get_from("127.0.0.2", url, "/v2/") == 200
    assert get_from("127.0.0.2", url, "/v2/lib/app/tags/list") == 404  # pulled, not refused
    assert get_from("127.0.0.3", url, "/v2/") == 401
    assert get_from("127.0.0.3", url, "/v2/lib/app/tags/list") == 401


def test_a_client_cannot_spoof_its_address_through_the_tier(backend, tier):
    url = tier([backend.port])
    spoofed = {"X-Forwarded-For": "127.0.0.2"}

    assert get_from("127.0.0.3", url, "/v2/", spoofed) == 401
    assert get_from("127.0.0.3", url, "/v2/lib/app/tags/list", spoofed) == 401


def test_without_the_tier_the_header_is_not_believed(backend):
    # Straight to the backend from 127.0.0.3, which is no trusted proxy.
    assert get_from("127.0.0.3", backend.url, "/v2/", {"X-Forwarded-For": "127.0.0.2"}) == 401
    assert get_from("127.0.0.2", backend.url, "/v2/") == 200
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{backend.url}/v2/", timeout=30)  # from 127.0.0.1, no header
    assert exc.value.code == 401
