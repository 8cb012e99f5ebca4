"""The access controllers: one per credential scheme, behind one small interface.

A controller turns a request's credentials into a :class:`Principal` (who, and what
they may do), says how to challenge for credentials, and what to answer credentials
that do not grant what a request needs. :class:`BasicController` checks Basic
credentials against an htpasswd file and grants by ``auth.rules``;
:class:`TokenController` checks Bearer tokens and grants by their ``access`` claim.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from regmirror.auth import rules as rules_
from regmirror.auth.access import Access, Needed
from regmirror.auth.htpasswd import Htpasswd
from regmirror.auth.token import InvalidToken, TokenVerifier
from regmirror.errors import Denied, RegistryError, Unauthorized


@dataclass(frozen=True)
class Principal:
    """Who a request authenticated as, and what they may do."""

    name: str
    scheme: str
    grants: Callable[[Access], bool]


class LoginFailed(Exception):
    def __init__(self, reason: str, user: str | None = None, *, error: str | None = None):
        super().__init__(reason)
        self.reason, self.user, self.error = reason, user, error


class AccessController(Protocol):
    """One way of checking credentials (Basic against htpasswd, Bearer tokens)."""

    scheme: str

    async def authenticate(self, request: web.Request) -> Principal | None:
        """The principal of the request's credentials; None when it carries none of this
        scheme; LoginFailed when they do not hold."""

    def challenge(self, accesses: Sequence[Access], error: str | None = None) -> str:
        """The ``WWW-Authenticate`` value asking for credentials that grant ``accesses``."""

    def refuse(self, principal: Principal, needs: Needed) -> RegistryError:
        """What to answer good credentials that do not grant what is needed."""


class BasicController:
    scheme = "basic"

    def __init__(self, htpasswd: Htpasswd, rules: Sequence[rules_.Rule], realm: str) -> None:
        self.htpasswd, self.rules, self.realm = htpasswd, tuple(rules), realm

    async def authenticate(self, request: web.Request) -> Principal | None:
        header = request.headers.get("Authorization", "")
        if header[:6].lower() != "basic ":
            return None
        user, password = basic_credentials(header)
        verdict = await self.htpasswd.verify(user, password)
        if not verdict.ok:
            raise LoginFailed(verdict.reason, user)
        return Principal(user, self.scheme, lambda access: rules_.grants(self.rules, user, access))

    def challenge(self, accesses: Sequence[Access], error: str | None = None) -> str:
        return f'Basic realm="{self.realm}"'

    def refuse(self, principal: Principal, needs: Needed) -> RegistryError:
        refused = [a.scope for a in needs.required if not principal.grants(a)]
        return Denied(
            f"{principal.name} may not {' '.join(refused)}",
            [detail(a) for a in needs.required],
        )


def basic_credentials(header: str) -> tuple[str, str]:
    """``(user, password)`` of an ``Authorization: Basic`` value (RFC 7617, UTF-8)."""
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoginFailed("malformed") from exc
    user, sep, password = decoded.partition(":")
    if not sep:
        raise LoginFailed("malformed")
    return user, password


class TokenController:
    scheme = "bearer"

    def __init__(self, verifier: TokenVerifier) -> None:
        self.verifier = verifier

    async def authenticate(self, request: web.Request) -> Principal | None:
        header = request.headers.get("Authorization", "")
        if header[:7].lower() != "bearer ":
            return None
        try:
            token = self.verifier.verify(header[7:].strip())
        except InvalidToken as exc:
            raise LoginFailed(exc.reason, error="invalid_token") from exc
        return Principal(token.subject, self.scheme, token.grants)

    def challenge(self, accesses: Sequence[Access], error: str | None = None) -> str:
        return self.verifier.challenge(accesses, error)

    def refuse(self, principal: Principal, needs: Needed) -> RegistryError:
        return Unauthorized(
            "the token does not grant the access this request needs (insufficient_scope)",
            [detail(a) for a in needs.required],
            headers={"WWW-Authenticate": self.challenge(needs.all, "insufficient_scope")},
        )


def detail(access: Access) -> dict[str, str]:
    return {"Type": access.type, "Name": access.name, "Action": ",".join(access.actions)}
