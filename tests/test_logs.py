"""The access log and the operator's log lines, read from real ``regmirror serve`` processes.

Each test runs requests against a server and reads everything the process wrote: an
access line carries the tier that served the request (local disk, an upstream fill, S3)
and whether it waited on another request's fill; ``log.format: json`` makes every line
an object; ``log.access: false`` writes none; no credential reaches any line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from aiohttp import web

from regmirror.config import ConfigError, UpstreamSettings, load
from regmirror.digest import Digest
from regmirror.logs.access import target
from regmirror.logs.throttle import Throttled
from tests.support.api import data_dir, make_client  # noqa: F401
from tests.support.http import session
from tests.support.processes import HOST, ServerProcess, free_port, regmirror_server
from tests.support.pullthrough import (
    BOUND,
    eventually,
    fetch_hashed,
    upstream_env,
    upstream_proxy,
)
from tests.support.s3 import MotoS3, moto_s3
from tests.support.s3_registry import regmirror_env
from tests.support.token_server import ISSUER, SERVICE, TokenIssuer, repository
from tests.support.upstream import push_blob, push_image, serve, upstream_registry

__all__ = ["moto_s3", "regmirror_server", "session", "upstream_registry"]

ACCESS = re.compile(
    r'regmirror\.access: (?P<client>\S+) - (?P<user>\S+) "(?P<method>\S+) (?P<path>\S+) '
    r'HTTP/1\.1" (?P<status>\d+) (?P<bytes>\d+) (?P<duration>[\d.]+) '
    r"tier=(?P<tier>\S+) waited=(?P<waited>yes|no)"
)


def access_lines(server: ServerProcess) -> list[dict[str, str]]:
    return [m.groupdict() for m in ACCESS.finditer(server.logs(None))]


def line_for(server: ServerProcess, method: str, path: str) -> list[dict[str, str]]:
    return [a for a in access_lines(server) if a["method"] == method and a["path"] == path]


async def logged(server: ServerProcess, method: str, path: str, count: int = 1) -> list[Any]:
    """The access lines of ``method path``, once ``count`` of them are written (the line
    is written after the body, so just after the client has read it)."""

    async def found() -> list[dict[str, str]] | None:
        lines = line_for(server, method, path)
        return lines if len(lines) >= count else None

    result: list[Any] = await eventually(found, timeout=10.0)
    return result


async def get(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, bytes]:
    async with session.get(url, **kwargs) as response:
        return response.status, await response.read()


# -- tiers ---------------------------------------------------------------------------


async def test_a_local_hit_is_logged_with_tier_local_and_its_body_bytes(
    regmirror_server: Any, session: aiohttp.ClientSession
) -> None:
    server = regmirror_server()
    data = b"l" * 300_000
    digest = await push_blob(session, server.url, "team/app", data)
    path = f"/v2/team/app/blobs/{digest}"
    assert await get(session, server.url + path) == (200, data)
    missing = f"/v2/team/app/blobs/sha256:{'0' * 64}"
    assert (await get(session, server.url + missing))[0] == 404
    ranged = await get(session, server.url + path, headers={"Range": "bytes=100-199"})
    assert ranged == (206, data[100:200])

    hit, part = await logged(server, "GET", path, 2)
    assert (part["status"], part["bytes"], part["tier"]) == ("206", "100", "local")
    assert hit["tier"] == "local" and hit["waited"] == "no"
    assert hit["status"] == "200" and hit["bytes"] == str(len(data))  # sendfile counted
    assert hit["client"] == HOST and hit["user"] == "-"
    [miss] = await logged(server, "GET", missing)
    assert miss["status"] == "404" and miss["tier"] == "-"
    [upload] = await logged(server, "POST", "/v2/team/app/blobs/uploads/")
    assert upload["tier"] == "-" and upload["status"] == "202"
    # One line per request: aiohttp's own access logger is not writing a second.
    assert "aiohttp.access" not in server.logs(None)


async def test_a_fill_from_an_upstream_and_a_request_waiting_on_it(
    regmirror_server: Any, upstream_registry: ServerProcess, session: aiohttp.ClientSession
) -> None:
    image = await push_image(session, upstream_registry.url, "library/tool", layer=b"u" * 400_000)
    async with upstream_proxy(upstream_registry.url) as proxy:
        # One process: the second request joins the fill in process (tier upstream,
        # waited); from another worker it follows the file (the next test).
        server = regmirror_server(env={**upstream_env(proxy.url), "REGMIRROR_SERVER__WORKERS": "1"})
        path = f"/v2/library/tool/blobs/{image.layer_digest}"
        proxy.hold_after = 100_000  # the fill stops there until released
        first = asyncio.create_task(get(session, server.url + path))
        await asyncio.wait_for(proxy.held.wait(), BOUND)
        second = asyncio.create_task(get(session, server.url + path))

        async def joined() -> bool:
            async with session.get(f"{server.url}/metrics") as response:
                return "regmirror_fill_waiters_total 1.0" in await response.text()

        await eventually(joined, timeout=BOUND)
        proxy.release.set()
        assert await first == (200, image.layer)
        assert await second == (200, image.layer)
        assert proxy.blob_gets == 1
        assert await get(session, server.url + path) == (200, image.layer)
        manifest = "/v2/library/tool/manifests/latest"
        assert (await get(session, server.url + manifest))[0] == 200

    lines = await logged(server, "GET", path, 3)
    assert sorted((a["tier"], a["waited"]) for a in lines[:2]) == [
        ("upstream", "no"),
        ("upstream", "yes"),
    ]
    assert all(a["bytes"] == str(len(image.layer)) for a in lines[:2])
    assert (lines[2]["tier"], lines[2]["waited"]) == ("local", "no")
    [pulled] = await logged(server, "GET", manifest)
    assert pulled["tier"] == "upstream"

    text = server.logs(None)
    layer = str(image.layer_digest)
    assert f"fill {layer} started from {proxy.url}: {len(image.layer)} bytes" in text
    assert re.search(
        rf"fill {layer} finished from {re.escape(proxy.url)}: {len(image.layer)} bytes in ", text
    )
    assert text.count(f"fill {layer} started") == 1


async def test_a_fill_followed_from_another_process_is_logged_with_tier_fill(
    regmirror_server: Any,
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    image = await push_image(session, upstream_registry.url, "library/shared", layer=b"f" * 300_000)
    async with upstream_proxy(upstream_registry.url) as proxy:
        owner = regmirror_server(env=upstream_env(proxy.url), data_dir=tmp_path / "data")
        follower = regmirror_server(env=upstream_env(proxy.url), data_dir=tmp_path / "data")
        path = f"/v2/library/shared/blobs/{image.layer_digest}"
        proxy.hold_after = 100_000
        first = asyncio.create_task(get(session, owner.url + path))
        await asyncio.wait_for(proxy.held.wait(), BOUND)
        headers = asyncio.Event()  # the follower learnt the size from the owner's file
        second = asyncio.create_task(
            fetch_hashed(session, follower.url + path, on_headers=headers.set, keep=True)
        )
        await asyncio.wait_for(headers.wait(), BOUND)
        proxy.release.set()
        assert await first == (200, image.layer)
        followed_body = await second
        assert (followed_body.status, followed_body.body) == (200, image.layer)
        assert proxy.blob_gets == 1  # the follower fetched nothing: it read the owner's file

    [owned] = await logged(owner, "GET", path)
    [followed] = await logged(follower, "GET", path)
    assert (owned["tier"], followed["tier"]) == ("upstream", "fill")
    assert followed["bytes"] == str(len(image.layer))
    assert f"fill {image.layer_digest} finished from another process" in follower.logs(None)


async def test_a_blob_and_manifest_read_from_s3_are_logged_with_tier_s3(
    regmirror_server: Any, moto_s3: MotoS3, session: aiohttp.ClientSession
) -> None:
    bucket = moto_s3.new_bucket("logs")
    pusher = regmirror_server(env=regmirror_env(moto_s3, bucket))
    image = await push_image(session, pusher.url, "ci/app", layer=b"s" * 200_000)
    # Empty local disk; at DEBUG, where botocore would log each request's signature.
    reader = regmirror_server(env=regmirror_env(moto_s3, bucket), log_level="DEBUG")
    blob = f"/v2/ci/app/blobs/{image.layer_digest}"
    manifest = "/v2/ci/app/manifests/latest"
    async with session.head(reader.url + blob) as response:
        assert response.status == 200
    assert await get(session, reader.url + blob) == (200, image.layer)
    assert await get(session, reader.url + blob) == (200, image.layer)
    assert (await get(session, reader.url + manifest))[0] == 200

    [head] = await logged(reader, "HEAD", blob)
    assert head["tier"] == "s3" and head["bytes"] == "0"
    filled, hit = await logged(reader, "GET", blob, 2)
    assert (filled["tier"], filled["waited"], filled["bytes"]) == ("s3", "no", "200000")
    assert hit["tier"] == "local"
    [read] = await logged(reader, "GET", manifest)
    assert read["tier"] == "s3"
    text = reader.logs(None)
    assert f"fill {image.layer_digest} started from s3: 200000 bytes" in text
    assert "DEBUG" in text
    assert "Authorization" not in text and "Signature" not in text


# -- formats and switches ------------------------------------------------------------


async def test_json_format_makes_every_line_an_object_and_access_lines_carry_the_fields(
    regmirror_server: Any, session: aiohttp.ClientSession
) -> None:
    server = regmirror_server(env={"REGMIRROR_LOG__FORMAT": "json"})
    digest = await push_blob(session, server.url, "team/app", b"j" * 1000)
    path = f"/v2/team/app/blobs/{digest}"
    assert (await get(session, server.url + path))[0] == 200

    async def entries() -> list[dict[str, Any]] | None:
        parsed = [json.loads(line) for line in server.logs(None).splitlines() if line]
        hits = [e for e in parsed if e.get("event") == "access" and e.get("path") == path]
        return parsed if hits else None

    parsed = await eventually(entries, timeout=10.0)
    assert all({"time", "level", "logger", "message"} <= set(e) for e in parsed)
    [hit] = [e for e in parsed if e.get("event") == "access" and e["path"] == path]
    assert hit["logger"] == "regmirror.access"
    assert hit["client"] == HOST and hit["user"] is None
    assert (hit["method"], hit["status"], hit["bytes"]) == ("GET", 200, 1000)
    assert hit["tier"] == "local" and hit["fill_wait"] is False
    assert isinstance(hit["duration"], float) and hit["protocol"] == "HTTP/1.1"
    assert any("serving http://" in e["message"] for e in parsed)


async def test_access_false_writes_no_access_line(
    regmirror_server: Any, session: aiohttp.ClientSession
) -> None:
    server = regmirror_server(env={"REGMIRROR_LOG__ACCESS": "false"})
    digest = await push_blob(session, server.url, "team/app", b"q" * 1000)
    assert (await get(session, f"{server.url}/v2/team/app/blobs/{digest}"))[0] == 200
    assert (await get(session, f"{server.url}/v2/nothing/here"))[0] == 404
    server.stop()  # everything it would write is written
    text = server.logs(None)
    assert "serving http://" in text
    assert "regmirror.access" not in text and "aiohttp.access" not in text
    assert "/v2/team/app" not in text and "/v2/nothing" not in text


def test_an_unknown_log_format_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"log\.format: 'xml' is not one of text, json"):
        load(environ={"REGMIRROR_LOG__FORMAT": "xml"})


# -- secrets -------------------------------------------------------------------------

PASSWORD = "hunter2-pa55word"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.tok3n-s3cret.sig"
SIGNATURE = "presigned-s1gnature"


async def test_no_password_token_or_presigned_signature_reaches_any_line(
    regmirror_server: Any, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"alice:{hashed}\n")
    server = regmirror_server(config={"auth": {"htpasswd": str(htpasswd)}}, ready_status=200)
    basic = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    wrong = "Basic " + base64.b64encode(f"alice:{PASSWORD}x".encode()).decode()
    catalog = f"/v2/_catalog?n=10&X-Amz-Signature={SIGNATURE}&token={TOKEN}"
    assert (await get(session, server.url + catalog, headers={"Authorization": basic}))[0] == 200
    assert (await get(session, server.url + catalog, headers={"Authorization": wrong}))[0] == 401
    bearer = {"Authorization": f"Bearer {TOKEN}"}  # not Basic: ignored, anonymous pull
    assert (await get(session, server.url + "/v2/team/app/tags/list", headers=bearer))[0] == 404
    server.stop()

    text = server.logs(None)
    lines = access_lines(server)
    assert [a["user"] for a in lines if a["path"].startswith("/v2/_catalog")] == ["alice", "-"]
    assert [a["status"] for a in lines if a["path"].startswith("/v2/_catalog")] == ["200", "401"]
    assert "/v2/_catalog?n=10&X-Amz-Signature=…&token=…" in text
    for secret in (PASSWORD, TOKEN, SIGNATURE, basic.split()[1], wrong.split()[1]):
        assert secret not in text, secret


async def test_a_bearer_token_never_reaches_any_line_and_its_subject_is_the_user(
    regmirror_server: Any, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    issuer = TokenIssuer()
    token = {
        "realm": "https://auth.example.test/token",
        "service": SERVICE,
        "issuer": ISSUER,
        "rootcertbundle": str(issuer.write_rootcertbundle(tmp_path / "root.pem")),
    }
    server = regmirror_server(config={"auth": {"token": token}})
    good = issuer.issue([repository("lib/app", "pull", "push")], subject="robot")
    expired = issuer.issue([repository("lib/app", "pull", "push")], expires_in=-3600)
    data = b"t" * 2000
    upload = f"/v2/lib/app/blobs/uploads/?digest={Digest.of(data)}"
    for bearer, status in ((good, 201), (expired, 401)):
        headers = {"Authorization": f"Bearer {bearer}"}
        async with session.post(server.url + upload, data=data, headers=headers) as response:
            assert response.status == status, await response.text()
    server.stop()

    lines = [a for a in access_lines(server) if a["method"] == "POST"]
    assert [(a["user"], a["status"]) for a in lines] == [("robot", "201"), ("-", "401")]
    text = server.logs(None)
    for secret in (good, expired, good.rpartition(".")[2], expired.rpartition(".")[2]):
        assert secret not in text, secret  # nor either signature on its own


async def test_a_presigned_redirect_that_fails_reaches_neither_log_nor_client(
    make_client: Any,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Seen failing before: the upstream error quoted the redirect's URL, signature and
    all, in the fill's log line and in the 503 a client reads."""
    closed = free_port()  # blob storage that refuses connections
    digest = Digest.of(b"never")
    presigned = f"http://{HOST}:{closed}/blobs/data?X-Amz-Signature={SIGNATURE}&X-Amz-Date=1"

    async def blob(request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": "5"})
        raise web.HTTPTemporaryRedirect(presigned)

    async def version(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v2/", version)
    app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", blob)
    async with serve(app) as upstream:
        registry = await make_client(upstreams=[UpstreamSettings(url=upstream)])
        with caplog.at_level(logging.DEBUG):
            response = await registry.get(f"/v2/library/app/blobs/{digest}")
            body = await response.text()
    assert response.status == 503
    assert SIGNATURE not in body, body
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"fill {digest} failed from {upstream}" in logged
    assert SIGNATURE not in logged, logged


# -- pieces --------------------------------------------------------------------------


def test_the_logged_target_keeps_the_api_parameters_and_hides_other_values() -> None:
    query = "mount=sha256:ab&from=b/c&_state=SECRET&flag"
    assert target("/v2/a/blobs/uploads/", query) == "/v2/a/blobs/uploads/?mount=sha256:ab&from=b/c&_state=…&…"
    assert target("/v2/a/tags/list", "n=5&last=x") == "/v2/a/tags/list?n=5&last=x"


def test_a_repeated_error_is_logged_once_a_period_then_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    throttled = Throttled(logging.getLogger("test.throttle"), period=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        for _ in range(100):
            throttled.warning("hub", "upstream %s down", "hub")
        throttled.warning("other", "upstream %s down", "other")
        now[0] = 61.0
        throttled.warning("hub", "upstream %s down", "hub")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "upstream hub down",
        "upstream other down",
        "upstream hub down (99 more like it in the last 61 s not logged)",
    ]


def test_no_user_name_or_path_can_forge_a_field_or_a_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from aiohttp.test_utils import make_mocked_request

    from regmirror.logs.access import ACCESS, AccessLogger
    from regmirror.logs.served import SERVED, Served

    request = make_mocked_request("GET", "/v2/a%0A/tags/list")
    request[SERVED] = Served(client="10.0.0.1", user='eve" 200 1 tier=local\nforged')
    with caplog.at_level(logging.INFO, logger="regmirror.access"):
        AccessLogger(ACCESS, "").log(request, web.Response(body=b"{}"), 0.25)
    [line] = [r.getMessage() for r in caplog.records]
    assert "\n" not in line
    assert line == (
        "10.0.0.1 - eve\\x22\\x20200\\x201\\x20tier=local\\x0aforged "
        '"GET /v2/a%0A/tags/list HTTP/1.1" 200 2 0.250 tier=- waited=no'
    )
