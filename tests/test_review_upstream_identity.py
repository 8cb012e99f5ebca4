"""Review attack: what one upstream's credentials fetched must not be served through a
route that does not have them.

Two upstreams on one registry host are an ordinary configuration: the registry's public
images anonymously (the default route) and a private organisation's with a robot's
credentials under a prefix (``corp/``), with ``auth.rules`` keeping ``corp/*`` from most
users. Pulls were recorded by registry host and upstream name only, so both routes
shared one record: once someone allowed had pulled ``corp/acme/secret``, anyone could
read it as ``acme/secret`` through the anonymous route, by digest forever and by tag for
the tag TTL, without the upstream being asked.
"""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from regmirror.config import AuthSettings, RuleSettings, UpstreamSettings
from regmirror.digest import Digest
from regmirror.manifest import OCI_MANIFEST
from regmirror.upstream import basic_authorization
from tests.support.api import OCI_CONFIG, OCI_LAYER, data_dir, make_client  # noqa: F401
from tests.support.auth import basic, secret, secrets_watch, write_htpasswd  # noqa: F401

pytestmark = pytest.mark.usefixtures("secrets_watch")

ROBOT_PASSWORD = secret("corp-robot-pw")
ADMIN = basic("admin", secret("admin-pw-review"))
DEV = basic("dev", secret("dev-pw-review"))
LAYER = b"the private organisation's layer" * 100
CONFIG = b"{}"


def descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": str(Digest.of(data)), "size": len(data)}


MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, CONFIG),
        "layers": [descriptor(OCI_LAYER, LAYER)],
    }
).encode()


@pytest.fixture
async def private_upstream(aiohttp_server: Any) -> str:
    """A registry whose one repository, ``acme/secret``, only its robot may read."""
    blobs = {str(Digest.of(d)): d for d in (LAYER, CONFIG)}
    manifests = {"latest": MANIFEST, str(Digest.of(MANIFEST)): MANIFEST}
    robot = basic_authorization("robot", ROBOT_PASSWORD)

    def refuse(request: web.Request) -> web.Response | None:
        if request.match_info["name"] != "acme/secret":
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
        if request.headers.get("Authorization") != robot:
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="private"'},
            )
        return None

    async def manifest(request: web.Request) -> web.Response:
        refused = refuse(request)
        if refused is not None:
            return refused
        raw = manifests.get(request.match_info["reference"])
        if raw is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        headers = {"Docker-Content-Digest": str(Digest.of(raw)), "Content-Type": OCI_MANIFEST}
        return web.Response(body=raw, headers=headers)

    async def blob(request: web.Request) -> web.Response:
        refused = refuse(request)
        if refused is not None:
            return refused
        data = blobs.get(request.match_info["digest"])
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        return web.Response(body=data, headers={"Content-Type": "application/octet-stream"})

    app = web.Application()
    app.router.add_get("/v2/{name:.+}/manifests/{reference}", manifest)
    app.router.add_get("/v2/{name:.+}/blobs/{digest}", blob)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


async def test_what_a_credentialed_upstream_fetched_is_not_served_through_an_anonymous_route(
    make_client: Any, private_upstream: str, tmp_path: Path
) -> None:
    htpasswd = write_htpasswd(
        tmp_path / "htpasswd", {"admin": "admin-pw-review", "dev": "dev-pw-review"}
    )
    rules = [
        RuleSettings(user="admin", repositories=["*"], actions=["pull"]),
        RuleSettings(user="dev", repositories=["corp/*"], actions=[]),  # no access there
        RuleSettings(user="dev", repositories=["*"], actions=["pull"]),
    ]
    client = await make_client(
        auth=AuthSettings(htpasswd=str(htpasswd), rules=rules, anonymous_pull=[]),
        upstreams=[
            UpstreamSettings(url=private_upstream),  # the default route: anonymous
            UpstreamSettings(
                url=private_upstream, prefix="corp", username="robot", password=ROBOT_PASSWORD
            ),
        ],
    )
    manifest_digest = str(Digest.of(MANIFEST))
    layer_digest = str(Digest.of(LAYER))

    # Someone allowed pulls the private image through the credentialed route.
    for path in (
        "/v2/corp/acme/secret/manifests/latest",
        f"/v2/corp/acme/secret/blobs/{layer_digest}",
    ):
        response = await client.get(path, headers=ADMIN)
        assert response.status == 200, await response.text()
        await response.read()
    refused = await client.get("/v2/corp/acme/secret/manifests/latest", headers=DEV)
    assert refused.status == 403  # the rules keep dev out of corp/*

    # The same repository through the anonymous default route: the upstream refuses it
    # there, so must regmirror, whatever it holds.
    for path in (
        f"/v2/acme/secret/manifests/{manifest_digest}",
        "/v2/acme/secret/manifests/latest",
        f"/v2/acme/secret/blobs/{layer_digest}",
    ):
        response = await client.get(path, headers=DEV)
        body = await response.read()
        assert response.status != 200, f"{path}: served {len(body)} bytes of corp's content"
        assert LAYER not in body and MANIFEST not in body


async def test_containerds_ns_does_not_reach_a_prefixed_upstream_past_the_rules(
    make_client: Any, private_upstream: str, tmp_path: Path
) -> None:
    """``?ns=<host>`` routes to the upstream of that host even when it is the one behind
    a prefix: the rules for ``corp/*`` must hold for it too."""
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"dev": "dev-pw-review"})
    rules = [
        RuleSettings(user="dev", repositories=["corp/*"], actions=[]),
        RuleSettings(user="dev", repositories=["*"], actions=["pull"]),
    ]
    client = await make_client(
        auth=AuthSettings(htpasswd=str(htpasswd), rules=rules, anonymous_pull=[]),
        upstreams=[
            UpstreamSettings(
                url=private_upstream, prefix="corp", username="robot", password=ROBOT_PASSWORD
            ),
        ],
    )
    host = private_upstream.removeprefix("http://")
    assert (await client.get("/v2/corp/acme/secret/manifests/latest", headers=DEV)).status == 403
    response = await client.get(f"/v2/acme/secret/manifests/latest?ns={host}", headers=DEV)
    body = await response.read()
    assert response.status in (401, 403, 404), (response.status, body[:200])
    assert MANIFEST not in body
