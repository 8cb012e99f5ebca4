"""The version check, the operational endpoints, and errors for routes that do not exist."""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

from tests.support.api import (
    assert_error,
    client,  # noqa: F401  (fixtures)
    data_dir,  # noqa: F401
    make_client,  # noqa: F401
)


async def test_version_check_answers_200_with_api_version_header(client):
    response = await client.get("/v2/")

    assert response.status == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert response.content_type == "application/json"
    assert await response.json() == {}


async def test_version_check_without_trailing_slash_answers_200(client):
    response = await client.get("/v2")

    assert response.status == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_version_check_head_answers_200_without_body(client):
    response = await client.head("/v2/")

    assert response.status == 200
    assert await response.read() == b""


async def test_healthz_reports_ok(client):
    response = await client.get("/healthz")

    assert response.status == 200
    assert (await response.json())["status"] == "ok"


async def test_readyz_reports_ready(client):
    response = await client.get("/readyz")

    assert response.status == 200
    assert (await response.json())["status"] == "ready"


async def test_metrics_is_prometheus_text_counting_requests_by_route_template(client):
    await client.get("/v2/")
    await client.get("/v2/some/repo/tags/list")

    response = await client.get("/metrics")

    assert response.status == 200
    assert response.content_type == "text/plain"
    text = await response.text()
    assert "# TYPE regmirror_http_requests_total counter" in text
    assert 'route="/v2/",status="200"' in text
    assert 'route="/v2/{name}/tags/list",status="404"' in text
    assert "regmirror_http_request_duration_seconds_bucket" in text
    assert "some/repo" not in text  # no repository names as labels


async def test_unknown_route_is_404_json_envelope(client):
    response = await client.get("/v3/nothing")

    await assert_error(response, 404, "NOT_FOUND")


async def test_unknown_route_below_v2_is_404_json_envelope(client):
    response = await client.get("/v2/repo/unknown-endpoint")

    await assert_error(response, 404, "NOT_FOUND")


async def test_wrong_method_is_405_unsupported_with_allow(client):
    response = await client.post("/v2/")

    await assert_error(response, 405, "UNSUPPORTED")
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD"}


async def test_wrong_method_on_repository_route_is_405_unsupported(client):
    response = await client.post("/v2/repo/tags/list")

    await assert_error(response, 405, "UNSUPPORTED")


async def test_error_responses_are_counted_in_metrics(client):
    await client.get("/v3/nothing")

    text = await (await client.get("/metrics")).text()

    assert 'route="unmatched",status="404"' in text
