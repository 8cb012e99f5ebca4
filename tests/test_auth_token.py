"""Docker token auth: Bearer tokens from a token service, checked as registry:2 does.

Tokens are signed by tests/support/token_server.py's issuer (an RS256 key whose
self-signed certificate is the rootcertbundle, or a JWKS); each way a token can be wrong
gets its own test, and the Bearer flow runs end to end against the token server.
"""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import RSAAlgorithm

from regmirror.app import create_app
from regmirror.auth.token import libtrust_key_id, thumbprint
from regmirror.config import AuthSettings, ConfigError, Settings, TokenSettings
from tests.support.api import (  # noqa: F401  (fixtures)
    assert_error,
    blob_bytes,
    data_dir,
    make_client,
    sha256,
)
from tests.support.auth import basic, bearer, secret, secrets_watch  # noqa: F401
from tests.support.token_server import (
    ISSUER,
    SERVICE,
    TokenIssuer,
    User,
    make_certificate,
    new_key,
    repository,
    run_token_server,
)

pytestmark = pytest.mark.usefixtures("secrets_watch")

REALM = "https://auth.example.test/token"
DATA = blob_bytes(1500, seed=5)
DIGEST = sha256(DATA)
UPLOAD = f"/v2/lib/app/blobs/uploads/?digest={DIGEST}"
PUSH_LIB_APP = [repository("lib/app", "pull", "push")]


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    return TokenIssuer()


def token_settings(tmp_path: Path, issuer: TokenIssuer, **overrides) -> TokenSettings:
    values = {
        "realm": REALM,
        "service": SERVICE,
        "issuer": ISSUER,
        "rootcertbundle": str(issuer.write_rootcertbundle(tmp_path / "root.pem")),
        **overrides,
    }
    return TokenSettings(**values)


@pytest.fixture
def token_client(make_client, tmp_path, issuer):
    """``await token_client(anonymous_pull=..., **token settings)``."""

    async def make(anonymous_pull=("127.0.0.0/8",), **token):
        auth = AuthSettings(
            anonymous_pull=list(anonymous_pull), token=token_settings(tmp_path, issuer, **token)
        )
        return await make_client(auth=auth)

    return make


def challenge(response) -> dict[str, str]:
    header = response.headers["WWW-Authenticate"]
    assert header.startswith("Bearer "), header
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


async def assert_invalid_token(response) -> None:
    await assert_error(response, 401, "UNAUTHORIZED")
    params = challenge(response)
    assert params["error"] == "invalid_token", params
    assert (params["realm"], params["service"]) == (REALM, SERVICE)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict, payload: dict, signature: bytes = b"") -> str:
    text = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    return secret(text + "." + b64(signature))


def claims(access=PUSH_LIB_APP, **extra) -> dict:
    now = int(time.time())
    return {"iss": ISSUER, "aud": SERVICE, "sub": "ci", "exp": now + 300, "access": access, **extra}


# -- the good path and the challenge -------------------------------------------------------


async def test_a_token_granting_push_pushes(token_client, issuer):
    client = await token_client()

    response = await client.post(UPLOAD, data=DATA, headers=bearer(issuer.issue(PUSH_LIB_APP)))

    assert response.status == 201, await response.text()


async def test_no_token_is_401_with_a_challenge_naming_the_scope(token_client):
    client = await token_client()

    response = await client.post(UPLOAD, data=DATA)

    await assert_error(response, 401, "UNAUTHORIZED")
    assert response.headers["WWW-Authenticate"] == (
        f'Bearer realm="{REALM}",service="{SERVICE}",scope="repository:lib/app:pull,push"'
    )


async def test_base_check_challenges_without_scope_when_anonymous_pull_is_off(token_client):
    client = await token_client(anonymous_pull=[])

    response = await client.get("/v2/")

    await assert_error(response, 401, "UNAUTHORIZED")
    assert response.headers["WWW-Authenticate"] == f'Bearer realm="{REALM}",service="{SERVICE}"'


async def test_basic_credentials_are_not_a_token(token_client):
    client = await token_client()

    response = await client.post(UPLOAD, data=DATA, headers=basic("ci", "some-password"))

    await assert_error(response, 401, "UNAUTHORIZED")
    assert "error" not in challenge(response)


async def test_a_token_for_pull_only_is_insufficient_scope_for_push(token_client, issuer):
    client = await token_client()
    token = issuer.issue([repository("lib/app", "pull")])

    response = await client.post(UPLOAD, data=DATA, headers=bearer(token))

    await assert_error(response, 401, "UNAUTHORIZED")
    params = challenge(response)
    assert params["error"] == "insufficient_scope"
    assert params["scope"] == "repository:lib/app:pull,push"


async def test_a_token_for_another_repository_is_insufficient_scope(token_client, issuer):
    client = await token_client(anonymous_pull=[])
    token = issuer.issue([repository("lib/other", "*")])

    response = await client.get(f"/v2/lib/app/blobs/{DIGEST}", headers=bearer(token))

    assert response.status == 401
    assert challenge(response)["error"] == "insufficient_scope"


async def test_star_grants_every_action_including_delete(token_client, issuer):
    client = await token_client()
    token = bearer(issuer.issue([repository("lib/app", "*")]))

    assert (await client.post(UPLOAD, data=DATA, headers=token)).status == 201
    assert (await client.delete(f"/v2/lib/app/blobs/{DIGEST}", headers=token)).status == 202


async def test_delete_needs_the_delete_action(token_client, issuer):
    client = await token_client()
    token = bearer(issuer.issue(PUSH_LIB_APP))

    response = await client.delete(f"/v2/lib/app/blobs/{DIGEST}", headers=token)

    assert response.status == 401
    params = challenge(response)
    assert (params["error"], params["scope"]) == ("insufficient_scope", "repository:lib/app:delete")


async def test_catalog_needs_registry_catalog_star(token_client, issuer):
    client = await token_client()

    response = await client.get("/v2/_catalog", headers=bearer(issuer.issue(PUSH_LIB_APP)))
    assert response.status == 401
    assert challenge(response)["scope"] == "registry:catalog:*"

    catalog = [{"type": "registry", "name": "catalog", "actions": ["*"]}]
    response = await client.get("/v2/_catalog", headers=bearer(issuer.issue(catalog)))
    assert response.status == 200


async def test_mount_challenge_names_both_scopes(token_client):
    client = await token_client()

    response = await client.post(f"/v2/team/app/blobs/uploads/?mount={DIGEST}&from=lib/app")

    assert response.status == 401
    assert challenge(response)["scope"] == ("repository:team/app:pull,push repository:lib/app:pull")


async def test_mount_without_pull_on_the_source_is_a_plain_upload_session(token_client, issuer):
    client = await token_client()
    assert (
        await client.post(UPLOAD, data=DATA, headers=bearer(issuer.issue(PUSH_LIB_APP)))
    ).status == 201
    mount = f"/v2/team/app/blobs/uploads/?mount={DIGEST}&from=lib/app"

    narrow = bearer(issuer.issue([repository("team/app", "pull", "push")]))
    response = await client.post(mount, headers=narrow)
    assert response.status == 202, await response.text()

    wide = issuer.issue([repository("team/app", "pull", "push"), repository("lib/app", "pull")])
    response = await client.post(mount, headers=bearer(wide))
    assert response.status == 201


# -- tokens that do not hold -----------------------------------------------------------------


async def test_an_expired_token_is_invalid(token_client, issuer):
    client = await token_client()
    token = issuer.issue(PUSH_LIB_APP, expires_in=-120)  # beyond the 60 s leeway

    await assert_invalid_token(await client.post(UPLOAD, data=DATA, headers=bearer(token)))


async def test_a_token_just_expired_within_the_leeway_holds(token_client, issuer):
    client = await token_client()
    token = issuer.issue(PUSH_LIB_APP, expires_in=-10)

    assert (await client.post(UPLOAD, data=DATA, headers=bearer(token))).status == 201


async def test_a_token_not_yet_valid_is_invalid(token_client, issuer):
    client = await token_client()
    token = issuer.issue(PUSH_LIB_APP, not_before=time.time() + 600, expires_in=900)

    await assert_invalid_token(await client.post(UPLOAD, data=DATA, headers=bearer(token)))


@pytest.mark.parametrize("audience", ["other-registry", ["other", "another"], None])
async def test_a_token_for_another_audience_is_invalid(token_client, issuer, audience):
    client = await token_client()
    token = issuer.issue(PUSH_LIB_APP, audience=audience)

    await assert_invalid_token(await client.post(UPLOAD, data=DATA, headers=bearer(token)))


async def test_an_audience_list_naming_the_service_holds(token_client, issuer):
    client = await token_client()
    token = issuer.issue(PUSH_LIB_APP, audience=["other", SERVICE])

    assert (await client.post(UPLOAD, data=DATA, headers=bearer(token))).status == 201


@pytest.mark.parametrize("token_issuer", ["someone-else", None])
async def test_a_token_from_another_issuer_is_invalid(token_client, issuer, token_issuer):
    client = await token_client()
    token = issuer.issue(PUSH_LIB_APP, issuer=token_issuer)

    await assert_invalid_token(await client.post(UPLOAD, data=DATA, headers=bearer(token)))


async def test_an_unsigned_token_is_invalid(token_client, issuer):
    client = await token_client()
    token = unsigned({"alg": "none", "typ": "JWT", "kid": issuer.kid}, claims())

    await assert_invalid_token(await client.post(UPLOAD, data=DATA, headers=bearer(token)))


@pytest.mark.parametrize("configured", [None, ["RS256", "HS256"]])
async def test_hmac_keyed_with_the_public_key_is_invalid(token_client, issuer, configured):
    """The classic confusion: HS256 with the verifier's public key as the secret. Refused
    by default, and still refused with HS256 allowed: an RSA key never verifies HMAC."""
    extra = {"signing_algorithms": configured} if configured else {}
    client = await token_client(**extra)
    pem = issuer.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": issuer.kid}
    signing_input = (
        b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims()).encode())
    ).encode()
    mac = hmac.new(pem, signing_input, hashlib.sha256).digest()
    token = secret(signing_input.decode() + "." + b64(mac))

    await assert_invalid_token(await client.post(UPLOAD, data=DATA, headers=bearer(token)))


async def test_an_embedded_jwk_is_never_key_material(token_client, issuer):
    client = await token_client()
    attacker = new_key()
    jwk = RSAAlgorithm.to_jwk(attacker.public_key(), as_dict=True)
    for kid in (None, thumbprint(attacker.public_key())):
        token = issuer.issue(PUSH_LIB_APP, key=attacker, headers={"jwk": jwk, "kid": kid})
        await assert_invalid_token(await client.post(UPLOAD, data=DATA, headers=bearer(token)))


async def test_a_token_signed_by_another_key_is_invalid(token_client, issuer):
    client = await token_client()
    token = issuer.issue(PUSH_LIB_APP, key=new_key())  # kid names the trusted key

    await assert_invalid_token(await client.post(UPLOAD, data=DATA, headers=bearer(token)))


@pytest.mark.parametrize(
    "token",
    ["not-a-jwt", "a.b.c", "e30.e30."],
    ids=["garbage", "three-parts", "empty-json"],
)
async def test_garbage_is_an_invalid_token(token_client, token):
    client = await token_client()

    response = await client.post(UPLOAD, data=DATA, headers=bearer(token))

    await assert_invalid_token(response)


async def test_a_malformed_access_claim_is_an_invalid_token(token_client, issuer):
    client = await token_client()
    token = issuer.issue(claims={"access": {"type": "repository"}})

    await assert_invalid_token(await client.post(UPLOAD, data=DATA, headers=bearer(token)))


# -- naming the key -----------------------------------------------------------------------


async def test_kid_may_be_libtrusts_key_id(token_client, issuer):
    client = await token_client()
    token = issuer.issue(PUSH_LIB_APP, headers={"kid": libtrust_key_id(issuer.public_key)})

    assert (await client.post(UPLOAD, data=DATA, headers=bearer(token))).status == 201


async def test_a_token_without_kid_is_tried_against_the_trusted_keys(token_client, issuer):
    client = await token_client()
    token = issuer.issue(PUSH_LIB_APP, headers={"kid": None})

    assert (await client.post(UPLOAD, data=DATA, headers=bearer(token))).status == 201


async def test_an_x5c_chain_to_the_root_holds(token_client, issuer):
    client = await token_client()
    leaf_key = new_key()
    leaf = make_certificate(leaf_key, "signer", issuer=(issuer.certificate, issuer.key))
    chain = [base64.b64encode(leaf.public_bytes(serialization.Encoding.DER)).decode()]
    token = issuer.issue(PUSH_LIB_APP, key=leaf_key, headers={"kid": None, "x5c": chain})

    assert (await client.post(UPLOAD, data=DATA, headers=bearer(token))).status == 201


async def test_an_x5c_chain_through_a_non_ca_certificate_is_invalid(token_client, issuer):
    """A signing certificate the root issued cannot itself issue certificates."""
    client = await token_client()
    signer_key = new_key()
    signer = make_certificate(signer_key, "signer", issuer=(issuer.certificate, issuer.key))
    forged_key = new_key()
    forged = make_certificate(forged_key, "forged", issuer=(signer, signer_key))
    chain = [
        base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
        for c in (forged, signer)
    ]
    token = issuer.issue(PUSH_LIB_APP, key=forged_key, headers={"kid": None, "x5c": chain})

    await assert_invalid_token(await client.post(UPLOAD, data=DATA, headers=bearer(token)))


async def test_a_self_signed_x5c_is_invalid(token_client, issuer):
    client = await token_client()
    key = new_key()
    cert = make_certificate(key, "self", ca=True)
    chain = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
    token = issuer.issue(PUSH_LIB_APP, key=key, headers={"kid": None, "x5c": chain})

    await assert_invalid_token(await client.post(UPLOAD, data=DATA, headers=bearer(token)))


async def test_keys_from_a_jwks_file(make_client, tmp_path):
    jwks_issuer = TokenIssuer(kid="signing-key-2026")
    token_config = TokenSettings(
        realm=REALM,
        service=SERVICE,
        issuer=ISSUER,
        jwks=str(jwks_issuer.write_jwks(tmp_path / "jwks.json")),
    )
    client = await make_client(auth=AuthSettings(token=token_config))

    good = jwks_issuer.issue(PUSH_LIB_APP)
    assert (await client.post(UPLOAD, data=DATA, headers=bearer(good))).status == 201
    other = TokenIssuer(kid="signing-key-2026").issue(PUSH_LIB_APP)
    await assert_invalid_token(await client.post(UPLOAD, data=DATA, headers=bearer(other)))


@pytest.mark.parametrize("allowed", [True, False])
async def test_hmac_only_with_an_oct_key_and_only_when_listed(make_client, tmp_path, allowed):
    shared = secret("hmac-shared-secret-0123456789abcdef")
    jwk = {"kty": "oct", "k": base64.urlsafe_b64encode(shared.encode()).decode(), "kid": "h1"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    algorithms = ["RS256", "HS256"] if allowed else ["RS256"]
    token_config = TokenSettings(
        realm=REALM,
        service=SERVICE,
        issuer=ISSUER,
        jwks=str(tmp_path / "jwks.json"),
        signing_algorithms=algorithms,
    )
    if not allowed:
        with pytest.raises(ConfigError, match="no configured key can sign"):
            create_app(
                Settings(data_dir=str(tmp_path / "d"), auth=AuthSettings(token=token_config))
            )
        return
    client = await make_client(auth=AuthSettings(token=token_config))
    token = secret(jwt.encode(claims(), shared.encode(), algorithm="HS256", headers={"kid": "h1"}))

    assert (await client.post(UPLOAD, data=DATA, headers=bearer(token))).status == 201


async def test_a_rotated_signing_key_is_trusted_without_restart(token_client, tmp_path, issuer):
    client = await token_client()
    assert (
        await client.post(UPLOAD, data=DATA, headers=bearer(issuer.issue(PUSH_LIB_APP)))
    ).status == 201

    rotated = TokenIssuer()
    rotated.write_rootcertbundle(tmp_path / "root.pem")

    new = rotated.issue(PUSH_LIB_APP)
    assert (await client.post(UPLOAD, data=DATA, headers=bearer(new))).status == 201
    old = issuer.issue(PUSH_LIB_APP)
    await assert_invalid_token(await client.post(UPLOAD, data=DATA, headers=bearer(old)))

    (tmp_path / "root.pem").write_text("not a certificate")
    await assert_invalid_token(await client.post(UPLOAD, data=DATA, headers=bearer(new)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"signing_algorithms": ["none"]}, "never"),
        ({"signing_algorithms": ["RS256", "XX1"]}, "unknown algorithm"),
        ({"signing_algorithms": ["ES256"]}, "no configured key"),
        ({"service": None}, "auth.token.service"),
        ({"rootcertbundle": None}, "rootcertbundle or auth.token.jwks"),
    ],
)
def test_token_settings_that_cannot_work_are_refused(tmp_path, issuer, overrides, message):
    auth = AuthSettings(token=token_settings(tmp_path, issuer, **overrides))

    with pytest.raises(ConfigError, match=message):
        create_app(Settings(data_dir=str(tmp_path / "data"), auth=auth))


# -- the whole Bearer flow, against the token server ---------------------------------------


async def test_bearer_flow_against_the_token_server(make_client, tmp_path, issuer):
    ci_password = "ci-token-Pa55"
    users = {"ci": User(ci_password, {"lib/*": ["pull", "push"]})}
    with run_token_server(issuer, users) as server:
        auth = AuthSettings(
            anonymous_pull=[], token=token_settings(tmp_path, issuer, realm=server.url)
        )
        client = await make_client(auth=auth)

        response = await client.post(UPLOAD, data=DATA)
        params = challenge(response)
        async with aiohttp.ClientSession() as session:
            got = await session.get(
                params["realm"],
                params={"service": params["service"], "scope": params["scope"]},
                headers=basic("ci", ci_password),
            )
            token = (await got.json())["token"]
        response = await client.post(UPLOAD, data=DATA, headers=bearer(token))

    assert response.status == 201, await response.text()
    assert server.requests == [
        {"user": "ci", "service": SERVICE, "scopes": ["repository:lib/app:pull,push"]}
    ]


async def test_token_failures_are_counted_by_reason(token_client, issuer):
    client = await token_client()
    await client.post(UPLOAD, data=DATA, headers=bearer(issuer.issue(expires_in=-600)))
    await client.post(UPLOAD, data=DATA, headers=bearer(issuer.issue(audience="x")))

    text = await (await client.get("/metrics")).text()

    assert 'regmirror_auth_failures_total{reason="expired",scheme="bearer"} 1.0' in text
    assert 'regmirror_auth_failures_total{reason="wrong_audience",scheme="bearer"} 1.0' in text


def test_jwt_library_refuses_to_sign_hmac_with_a_pem_key(issuer):
    """Guards the HMAC test above: it builds its token by hand because PyJWT will not."""
    pem = issuer.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(jwt.InvalidKeyError):
        jwt.encode({"a": 1}, pem, algorithm="HS256")
