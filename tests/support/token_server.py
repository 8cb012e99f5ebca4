"""A Docker token service the tests run themselves, and the keys it signs with.

- :class:`TokenIssuer`: an RSA key with a self-signed certificate (for ``rootcertbundle``)
  or a JWKS entry (for ``jwks``); :meth:`TokenIssuer.issue` signs RS256 JWTs with any
  claims and headers a test wants, including broken ones.
- :func:`run_token_server`: the token endpoint clients are sent to by a Bearer challenge
  (``GET /token?service=...&scope=...`` with Basic credentials), granting each user the
  intersection of what they ask and what :class:`User` allows. It runs on its own event
  loop in a thread, so blocking clients (skopeo) and in-process tests can both use it.
  It records every scope it was asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import RSAAlgorithm

from regmirror.auth.controllers import basic_credentials
from regmirror.auth.token import thumbprint
from tests.support.auth import secret

ISSUER = "test-token-issuer"
SERVICE = "regmirror-test"


def make_certificate(
    key: rsa.RSAPrivateKey,
    name: str,
    *,
    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None = None,
    ca: bool = False,
    days: float = 1.0,
) -> x509.Certificate:
    """A certificate for ``key``: self-signed, or issued by ``issuer`` (cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class TokenIssuer:
    """Signs tokens as a token service would (``iss`` ISSUER, ``aud`` SERVICE, RS256)."""

    def __init__(self, *, kid: str | None = None) -> None:
        self.key = new_key()
        self.certificate = make_certificate(self.key, "token issuer", ca=True)
        self.public_key = self.key.public_key()
        self.kid = kid if kid is not None else thumbprint(self.public_key)

    def write_rootcertbundle(self, path: Path) -> Path:
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def write_jwks(self, path: Path) -> Path:
        jwk = RSAAlgorithm.to_jwk(self.public_key, as_dict=True)
        path.write_text(json.dumps({"keys": [{**jwk, "kid": self.kid, "use": "sig"}]}))
        return path

    def issue(
        self,
        access: Sequence[Mapping[str, Any]] = (),
        *,
        subject: str = "ci",
        audience: str | list[str] | None = SERVICE,
        issuer: str | None = ISSUER,
        expires_in: float = 300.0,
        not_before: float | None = None,
        headers: Mapping[str, Any] | None = None,
        key: Any = None,
        algorithm: str = "RS256",
        claims: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed token; every part can be made wrong on purpose. Registered as a secret."""
        now = time.time()
        payload: dict[str, Any] = {
            "sub": subject,
            "iat": int(now),
            "exp": int(now + expires_in),
            "jti": uuid.uuid4().hex,
            "access": [dict(entry) for entry in access],
        }
        if audience is not None:
            payload["aud"] = audience
        if issuer is not None:
            payload["iss"] = issuer
        if not_before is not None:
            payload["nbf"] = int(not_before)
        payload.update(claims or {})
        header = {"kid": self.kid, **(headers or {})}
        header = {k: v for k, v in header.items() if v is not None}
        token = jwt.encode(payload, key or self.key, algorithm=algorithm, headers=header)
        return secret(token)


def repository(name: str, *actions: str) -> dict[str, Any]:
    return {"type": "repository", "name": name, "actions": list(actions)}


@dataclass
class User:
    password: str
    # repository glob -> actions granted; the first matching glob decides.
    grants: Mapping[str, Sequence[str]]


@dataclass
class TokenServer:
    url: str  # the realm: http://127.0.0.1:PORT/token
    requests: list[dict[str, Any]] = field(default_factory=list)


def _granted(user: User | None, scope: str) -> dict[str, Any] | None:
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if kind != "repository" or user is None:
        return None
    for pattern, allowed in user.grants.items():
        if fnmatchcase(name, pattern):
            given = [a for a in actions.split(",") if a in allowed or "*" in allowed]
            return repository(name, *given) if given else None
    return None


def _app(issuer: TokenIssuer, users: Mapping[str, User], server: TokenServer) -> web.Application:
    async def token(request: web.Request) -> web.Response:
        user: User | None = None
        name = ""
        header = request.headers.get("Authorization")
        if header:
            login, password = basic_credentials(header)
            user = users.get(login)
            if user is None or user.password != password:
                return web.json_response({"details": "bad credentials"}, status=401)
            name = login
        scopes = [s for value in request.query.getall("scope", []) for s in value.split()]
        server.requests.append(
            {"user": name, "service": request.query.get("service"), "scopes": scopes}
        )
        access = [g for g in (_granted(user, s) for s in scopes) if g is not None]
        signed = issuer.issue(access, subject=name or "anonymous")
        issued = datetime.datetime.now(datetime.UTC).isoformat()
        body = {"token": signed, "access_token": signed, "expires_in": 300, "issued_at": issued}
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/token", token)
    return app


@contextlib.contextmanager
def run_token_server(issuer: TokenIssuer, users: Mapping[str, User]) -> Iterator[TokenServer]:
    """The token endpoint on 127.0.0.1, served from a thread; stopped on exit."""
    for user in users.values():
        secret(user.password)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="token-server", daemon=True)
    thread.start()
    server = TokenServer(url="")
    runner = web.AppRunner(_app(issuer, users, server), access_log=None)

    def call(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=30)

    try:
        call(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        call(site.start())
        port = runner.addresses[0][1]
        server.url = f"http://127.0.0.1:{port}/token"
        yield server
    finally:
        call(runner.cleanup())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
