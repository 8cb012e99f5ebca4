"""Access control with an htpasswd file: 401 vs 403, rules, anonymous pull by network,
X-Forwarded-For from trusted proxies only, mounts, the catalog, reloads and timing."""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest

from regmirror.app import create_app
from regmirror.config import AuthSettings, ConfigError, RuleSettings, Settings, TokenSettings
from tests.support.api import (  # noqa: F401  (fixtures)
    assert_error,
    blob_bytes,
    data_dir,
    make_client,
    sha256,
)
from tests.support.auth import (  # noqa: F401  (fixtures)
    basic,
    bcrypt_hash,
    request_from,
    secret,
    secrets_watch,
    write_htpasswd,
)

pytestmark = pytest.mark.usefixtures("secrets_watch")

CI_PASSWORD = secret("ci-Pa55-wörd")
ALICE_PASSWORD = secret("alice-s3cret")
ADMIN_PASSWORD = secret("admin-0123")
CI = basic("ci", CI_PASSWORD)
ALICE = basic("alice", ALICE_PASSWORD)
ADMIN = basic("admin", ADMIN_PASSWORD)
DATA = blob_bytes(2000, seed=3)
DIGEST = sha256(DATA)


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    users = {"ci": CI_PASSWORD, "alice": ALICE_PASSWORD, "admin": ADMIN_PASSWORD}
    return write_htpasswd(tmp_path / "htpasswd", users)


@pytest.fixture
def auth_client(make_client, htpasswd):
    """``await auth_client(**auth settings)``: a client on an app with htpasswd auth."""

    async def make(**auth):
        return await make_client(auth=AuthSettings(htpasswd=str(htpasswd), **auth))

    return make


def rule(user: str, repositories: list[str], actions: list[str]) -> RuleSettings:
    return RuleSettings(user=user, repositories=repositories, actions=actions)


async def push(client, name: str, headers, data: bytes = DATA) -> int:
    response = await client.post(
        f"/v2/{name}/blobs/uploads/?digest={sha256(data)}", data=data, headers=headers
    )
    return response.status


# -- 401: no or bad credentials ------------------------------------------------------


async def test_push_without_credentials_is_401_with_basic_challenge(auth_client):
    client = await auth_client()

    response = await client.post(f"/v2/lib/app/blobs/uploads/?digest={DIGEST}", data=DATA)

    await assert_error(response, 401, "UNAUTHORIZED")
    assert response.headers["WWW-Authenticate"] == 'Basic realm="regmirror"'


async def test_challenge_carries_the_configured_realm(auth_client):
    client = await auth_client(realm="CI registry")

    response = await client.post("/v2/lib/app/blobs/uploads/")

    assert response.headers["WWW-Authenticate"] == 'Basic realm="CI registry"'


@pytest.mark.parametrize(
    "headers",
    [
        basic("ci", "wrong-password"),
        basic("nobody", CI_PASSWORD),
        {"Authorization": "Basic !!!not-base64"},
        basic("ci", ""),
    ],
    ids=["bad-password", "unknown-user", "malformed", "empty-password"],
)
async def test_bad_credentials_are_401_even_for_an_anonymous_pull(auth_client, headers):
    client = await auth_client()

    response = await client.get("/v2/lib/app/tags/list", headers=headers)

    await assert_error(response, 401, "UNAUTHORIZED")
    assert response.headers["WWW-Authenticate"] == 'Basic realm="regmirror"'


async def test_good_credentials_push_and_pull(auth_client):
    client = await auth_client(anonymous_pull=[])

    assert await push(client, "lib/app", CI) == 201
    response = await client.get(f"/v2/lib/app/blobs/{DIGEST}", headers=CI)
    assert response.status == 200
    assert await response.read() == DATA


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v2/lib/app/blobs/uploads/"),
        ("PUT", "/v2/lib/app/manifests/latest"),
        ("DELETE", f"/v2/lib/app/blobs/{DIGEST}"),
        ("DELETE", "/v2/lib/app/manifests/latest"),
        ("GET", "/v2/_catalog"),
        ("PATCH", "/v2/lib/app/blobs/uploads/0123"),
        ("GET", "/v2/lib/app/blobs/uploads/0123"),
    ],
)
async def test_push_delete_and_catalog_need_credentials_even_from_loopback(
    auth_client, method, path
):
    client = await auth_client()  # anonymous pull from loopback: the default

    response = await client.request(method, path)

    await assert_error(response, 401, "UNAUTHORIZED")


# -- anonymous pull by network ---------------------------------------------------------


async def test_loopback_pulls_anonymously_by_default(auth_client):
    client = await auth_client()
    assert await push(client, "lib/app", CI) == 201

    assert (await client.get("/v2/")).status == 200
    response = await client.get(f"/v2/lib/app/blobs/{DIGEST}")
    assert response.status == 200
    assert await response.read() == DATA


async def test_empty_anonymous_pull_makes_every_request_authenticate(auth_client):
    client = await auth_client(anonymous_pull=[])
    assert await push(client, "lib/app", CI) == 201

    base = await client.get("/v2/")
    await assert_error(base, 401, "UNAUTHORIZED")
    assert base.headers["WWW-Authenticate"] == 'Basic realm="regmirror"'
    await assert_error(await client.get(f"/v2/lib/app/blobs/{DIGEST}"), 401, "UNAUTHORIZED")
    head = await client.head(f"/v2/lib/app/blobs/{DIGEST}")
    assert (head.status, head.headers["WWW-Authenticate"]) == (401, 'Basic realm="regmirror"')
    assert (await client.get("/v2/", headers=ALICE)).status == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_probes_and_metrics_need_no_credentials(auth_client, path):
    client = await auth_client(anonymous_pull=[])

    assert (await client.get(path)).status == 200


async def test_anonymous_pull_only_from_the_listed_networks(auth_client):
    client = await auth_client(anonymous_pull=["127.0.0.2/32"])
    assert await push(client, "lib/app", CI) == 201
    path = f"/v2/lib/app/blobs/{DIGEST}"

    status, _, body = await request_from(client, "127.0.0.2", "GET", path)
    assert (status, body) == (200, DATA)
    status, headers, _ = await request_from(client, "127.0.0.3", "GET", path)
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Basic realm="regmirror"'
    status, _, _ = await request_from(client, "127.0.0.3", "GET", "/v2/")
    assert status == 401
    status, _, _ = await request_from(client, "127.0.0.2", "GET", "/v2/")
    assert status == 200


async def test_anonymous_networks_may_not_push(auth_client):
    client = await auth_client(anonymous_pull=["127.0.0.2/32"])

    status, _, _ = await request_from(client, "127.0.0.2", "POST", "/v2/lib/app/blobs/uploads/")

    assert status == 401


# -- behind a proxy ----------------------------------------------------------------------


async def test_forwarded_for_is_believed_from_a_trusted_proxy(auth_client):
    client = await auth_client(anonymous_pull=["10.0.0.0/8"], trusted_proxies=["127.0.0.5/32"])

    status, _, _ = await request_from(
        client, "127.0.0.5", "GET", "/v2/", headers={"X-Forwarded-For": "10.1.2.3"}
    )
    assert status == 200
    status, _, _ = await request_from(client, "127.0.0.5", "GET", "/v2/")
    assert status == 401  # the proxy itself is not in anonymous_pull


async def test_forwarded_for_from_an_untrusted_address_is_ignored(auth_client):
    client = await auth_client(anonymous_pull=["10.0.0.0/8"], trusted_proxies=["127.0.0.5/32"])

    status, _, _ = await request_from(
        client, "127.0.0.6", "GET", "/v2/", headers={"X-Forwarded-For": "10.1.2.3"}
    )

    assert status == 401


async def test_a_client_cannot_prepend_a_trusted_hop(auth_client):
    """nginx appends the real client to what the client sent: the rightmost untrusted hop
    decides, not the leftmost."""
    client = await auth_client(anonymous_pull=["10.0.0.0/8"], trusted_proxies=["127.0.0.5/32"])

    status, _, _ = await request_from(
        client,
        "127.0.0.5",
        "GET",
        "/v2/",
        headers={"X-Forwarded-For": "10.1.2.3, 192.0.2.7"},
    )

    assert status == 401


async def test_forwarded_for_without_trusted_proxies_never_grants_loopback(auth_client):
    client = await auth_client(anonymous_pull=["127.0.0.2/32"])

    status, _, _ = await request_from(
        client, "127.0.0.3", "GET", "/v2/", headers={"X-Forwarded-For": "127.0.0.2"}
    )

    assert status == 401


# -- rules and 403 ------------------------------------------------------------------------


async def test_without_rules_every_user_may_pull_and_push_but_not_delete(auth_client):
    client = await auth_client(anonymous_pull=[])

    assert await push(client, "lib/app", ALICE) == 201
    assert (await client.get(f"/v2/lib/app/blobs/{DIGEST}", headers=CI)).status == 200
    response = await client.delete(f"/v2/lib/app/blobs/{DIGEST}", headers=CI)
    await assert_error(response, 403, "DENIED")
    assert "WWW-Authenticate" not in response.headers


async def test_rules_first_match_wins(auth_client):
    client = await auth_client(
        anonymous_pull=[],
        rules=[
            rule("ci", ["secret/*"], ["pull"]),
            rule("ci", ["*"], ["pull", "push"]),
            rule("admin", ["*"], ["pull", "push", "delete"]),
            rule("*", ["lib/*"], ["pull"]),
        ],
    )

    assert await push(client, "team/app", CI) == 201
    assert await push(client, "secret/app", CI) == 403  # a later rule would allow it
    assert await push(client, "secret/app", ADMIN) == 201
    assert (await client.get(f"/v2/secret/app/blobs/{DIGEST}", headers=CI)).status == 200
    assert await push(client, "lib/app", ALICE) == 403
    assert await push(client, "lib/app", ADMIN) == 201
    assert (await client.get(f"/v2/lib/app/blobs/{DIGEST}", headers=ALICE)).status == 200
    response = await client.get(f"/v2/team/app/blobs/{DIGEST}", headers=ALICE)
    await assert_error(response, 403, "DENIED")  # no rule for alice matches team/app
    response = await client.delete(f"/v2/team/app/blobs/{DIGEST}", headers=CI)
    await assert_error(response, 403, "DENIED")
    response = await client.delete(f"/v2/team/app/blobs/{DIGEST}", headers=ADMIN)
    assert response.status == 202


async def test_credentials_never_give_less_than_anonymous_pull(auth_client):
    client = await auth_client(rules=[rule("ci", ["ci/*"], ["pull", "push"])])
    assert await push(client, "ci/app", CI) == 201
    response = await client.post(
        f"/v2/lib/app/blobs/uploads/?mount={DIGEST}&from=ci/app", headers=CI
    )
    assert response.status == 403

    # From loopback (anonymous pull), ci pulls lib/app although its rules do not name it.
    response = await client.get("/v2/lib/app/tags/list", headers=CI)
    await assert_error(response, 404, "NAME_UNKNOWN")


async def test_catalog_only_for_users_who_may_pull_everything(auth_client):
    client = await auth_client(
        rules=[
            rule("alice", ["secret/*"], []),
            rule("*", ["*"], ["pull"]),
            rule("ci", ["*"], ["pull", "push"]),
        ]
    )

    assert (await client.get("/v2/_catalog", headers=CI)).status == 200
    await assert_error(await client.get("/v2/_catalog", headers=ALICE), 403, "DENIED")
    await assert_error(await client.get("/v2/_catalog"), 401, "UNAUTHORIZED")


async def test_mount_without_pull_on_the_source_is_a_plain_upload_session(auth_client):
    client = await auth_client(
        rules=[
            rule("ci", ["team/*"], ["pull", "push"]),
            rule("admin", ["*"], ["pull", "push"]),
        ]
    )
    assert await push(client, "secret/base", ADMIN) == 201
    mount = f"/v2/team/app/blobs/uploads/?mount={DIGEST}&from=secret/base"

    response = await client.post(mount, headers=CI)
    assert response.status == 202, await response.text()
    assert response.headers["Location"].startswith("/v2/team/app/blobs/uploads/")
    assert (await client.head(f"/v2/team/app/blobs/{DIGEST}", headers=CI)).status == 404

    response = await client.post(mount, headers=ADMIN)
    assert response.status == 201
    assert (await client.head(f"/v2/team/app/blobs/{DIGEST}", headers=CI)).status == 200


# -- the htpasswd file ---------------------------------------------------------------------


async def test_password_change_takes_effect_without_restart(auth_client, htpasswd):
    client = await auth_client(anonymous_pull=[])
    assert (await client.get("/v2/", headers=CI)).status == 200

    new_password = secret("rotated-Pa55")
    write_htpasswd(htpasswd, {"ci": new_password})
    os.utime(htpasswd, ns=(time.time_ns(), time.time_ns() + 1))  # whatever the clock tick

    assert (await client.get("/v2/", headers=CI)).status == 401
    assert (await client.get("/v2/", headers=basic("ci", new_password))).status == 200
    assert (await client.get("/v2/", headers=ALICE)).status == 401


async def test_a_file_turned_invalid_refuses_every_login_until_fixed(auth_client, htpasswd):
    client = await auth_client(anonymous_pull=[])
    good = htpasswd.read_text()
    htpasswd.write_text(good + "bob:$apr1$abcdefgh$0123456789abcdefghijkl\n")

    assert (await client.get("/v2/", headers=CI)).status == 401
    htpasswd.write_text(good)
    assert (await client.get("/v2/", headers=CI)).status == 200


@pytest.mark.parametrize(
    "line, kind",
    [
        ("bob:$apr1$abcdefgh$0123456789abcdefghijkl", "MD5"),
        ("bob:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=", "SHA-1"),
        ("bob:plaintext", "plain-text"),
        ("bob:$6$salt$" + "x" * 86, "SHA-crypt"),
        ("just-a-user", "user:hash"),
    ],
)
def test_a_non_bcrypt_line_is_refused_at_startup_naming_the_line(tmp_path, line, kind):
    path = tmp_path / "htpasswd"
    path.write_text(f"# CI\nci:{bcrypt_hash('x')}\n{line}\n")
    settings = Settings(data_dir=str(tmp_path / "data"), auth=AuthSettings(htpasswd=str(path)))

    with pytest.raises(ConfigError, match=rf"{path} line 3: .*{kind}"):
        create_app(settings)


@pytest.mark.parametrize("prefix", ["$2y$", "$2a$", "$2b$"])
async def test_every_bcrypt_variant_is_accepted(make_client, tmp_path, prefix):
    path = tmp_path / "htpasswd"
    path.write_text(f"ci:{bcrypt_hash(CI_PASSWORD, prefix=prefix)}\n")
    client = await make_client(auth=AuthSettings(htpasswd=str(path), anonymous_pull=[]))

    assert (await client.get("/v2/", headers=CI)).status == 200


def test_a_missing_htpasswd_file_is_refused_at_startup(tmp_path):
    settings = Settings(
        data_dir=str(tmp_path / "data"), auth=AuthSettings(htpasswd=str(tmp_path / "absent"))
    )

    with pytest.raises(ConfigError, match="auth.htpasswd: cannot read"):
        create_app(settings)


@pytest.mark.parametrize(
    "auth, message",
    [
        (AuthSettings(anonymous_pull=["10.0.0.0/8"]), "set auth.htpasswd or auth.token"),
        (AuthSettings(htpasswd="x", token=TokenSettings(realm="http://t")), "not both"),
        (AuthSettings(htpasswd="x", anonymous_pull=["10.0.0.0/33"]), r"anonymous_pull\[0\]"),
        (AuthSettings(htpasswd="x", trusted_proxies=["proxy"]), r"trusted_proxies\[0\]"),
        (AuthSettings(htpasswd="x", rules=[rule("ci", ["*"], ["write"])]), "rules"),
        (AuthSettings(htpasswd="x", realm='say "hi"'), "auth.realm"),
    ],
)
def test_auth_settings_that_cannot_work_are_refused(tmp_path, auth, message):
    (tmp_path / "x").write_text("")
    os.chdir(tmp_path)

    with pytest.raises(ConfigError, match=message):
        create_app(Settings(data_dir=str(tmp_path / "data"), auth=auth))


async def test_unknown_users_take_as_long_as_known_ones(make_client, tmp_path):
    """bcrypt at cost 10 (~50 ms): a check against nothing would answer in ~1 ms."""
    path = write_htpasswd(tmp_path / "htpasswd", {"ci": CI_PASSWORD}, cost=10)
    client = await make_client(auth=AuthSettings(htpasswd=str(path), anonymous_pull=[]))

    async def median(headers) -> float:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            assert (await client.get("/v2/", headers=headers)).status == 401
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    known = await median(basic("ci", "wrong-Pa55-t1"))
    unknown = await median(basic("nobody", "wrong-Pa55-t2"))

    assert known > 0.005  # bcrypt really ran
    assert 0.5 < unknown / known < 2.0, (known, unknown)


async def test_a_successful_check_is_remembered_not_recomputed(make_client, tmp_path):
    path = write_htpasswd(tmp_path / "htpasswd", {"ci": CI_PASSWORD}, cost=10)
    client = await make_client(auth=AuthSettings(htpasswd=str(path), anonymous_pull=[]))

    async def timed(headers) -> float:
        started = time.perf_counter()
        assert (await client.get("/v2/", headers=headers)).status == 200
        return time.perf_counter() - started

    first = await timed(CI)
    again = statistics.median([await timed(CI) for _ in range(5)])

    assert again < first / 3, (first, again)


# -- logs and metrics ----------------------------------------------------------------------


async def test_failed_logins_are_logged_and_counted_without_secrets(auth_client, secrets_watch):
    client = await auth_client(anonymous_pull=[])
    await client.get("/v2/", headers=basic("ci", "wrong-one"))
    await client.get("/v2/", headers=basic("mallory", "guess-Pa55-m1"))
    await client.delete(f"/v2/lib/app/blobs/{DIGEST}", headers=CI)

    text = await (await client.get("/metrics")).text()

    assert 'regmirror_auth_failures_total{reason="bad_password",scheme="basic"} 1.0' in text
    assert 'regmirror_auth_failures_total{reason="unknown_user",scheme="basic"} 1.0' in text
    assert 'regmirror_auth_failures_total{reason="denied",scheme="basic"} 1.0' in text
    assert "mallory" not in text
    failures = [line for line in secrets_watch if "failed login" in line]
    assert any(
        "'ci'" in line and "127.0.0.1" in line and "bad_password" in line for line in failures
    )
    assert any("'mallory'" in line and "unknown_user" in line for line in failures)


async def test_a_password_longer_than_bcrypt_takes_is_401_not_a_500(make_client, tmp_path):
    """bcrypt reads 72 bytes; registry:2 (Go's bcrypt) refuses longer ones, and so do we,
    rather than let a password that only shares its first 72 bytes in."""
    long_password = secret("p" * 72 + "-and-more")
    path = tmp_path / "htpasswd"
    path.write_text(f"ci:{bcrypt_hash('p' * 72)}\n")
    client = await make_client(auth=AuthSettings(htpasswd=str(path), anonymous_pull=[]))

    response = await client.get("/v2/", headers=basic("ci", long_password))

    await assert_error(response, 401, "UNAUTHORIZED")
    assert (await client.get("/v2/", headers=basic("nobody", long_password))).status == 401
