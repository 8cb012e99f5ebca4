"""The middleware that applies access control to every request.

For each request: the access it needs (:mod:`~regmirror.auth.access`), where it comes
from (:mod:`~regmirror.auth.clients`), then :func:`AccessPolicy.authorize`: anonymous pull
from ``auth.anonymous_pull`` networks, else the credentials of the configured scheme must
hold (401 with the challenge if absent or bad) and grant the access (403 DENIED for
Basic users; for tokens 401 ``insufficient_scope``, as registry:2 answers, so the client
fetches a token with the scope the challenge names). Handlers never see credentials: a
mount whose source the client may not pull reaches the handler without ``from``, and is
then a plain upload session.

Failed logins are logged (user, client address, reason; never a password or token) and
counted by scheme and reason.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from regmirror.auth import rules as rules_
from regmirror.auth.access import Access, Needed, needed
from regmirror.auth.clients import Address, Network, client_address, networks, within
from regmirror.auth.htpasswd import Htpasswd
from regmirror.auth.token import InvalidToken, TokenVerifier
from regmirror.config import AuthSettings, ConfigError, TokenSettings
from regmirror.errors import Denied, RegistryError, Unauthorized

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Called on every refused login or permission: (scheme, reason). Bounded values only.
OnFailure = Callable[[str, str], None]


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
            [_detail(a) for a in needs.required],
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
            [_detail(a) for a in needs.required],
            headers={"WWW-Authenticate": self.challenge(needs.all, "insufficient_scope")},
        )


def _detail(access: Access) -> dict[str, str]:
    return {"Type": access.type, "Name": access.name, "Action": ",".join(access.actions)}


class AccessPolicy:
    """Who may do what: one controller, plus anonymous pull from some networks."""

    def __init__(
        self,
        controller: AccessController,
        *,
        anonymous_pull: Sequence[Network],
        trusted_proxies: Sequence[Network],
        on_failure: OnFailure | None = None,
    ) -> None:
        self.controller = controller
        self.anonymous_pull = tuple(anonymous_pull)
        self.trusted_proxies = tuple(trusted_proxies)
        self.on_failure = on_failure or (lambda scheme, reason: None)

    def client(self, request: web.Request) -> Address | None:
        forwarded = request.headers.getall("X-Forwarded-For", [])
        return client_address(request.remote, forwarded, self.trusted_proxies)

    async def authorize(self, request: web.Request, needs: Needed) -> Principal | None:
        """The principal (None: anonymous) if the request may have what it ``needs``;
        raises Unauthorized or Denied otherwise."""
        controller = self.controller
        client = self.client(request)
        anonymous_ok = needs.pull_only and within(client, self.anonymous_pull)
        try:
            principal = await controller.authenticate(request)
        except LoginFailed as exc:
            log.warning(
                "failed login (%s) for user %r from %s: %s",
                controller.scheme,
                "-" if exc.user is None else exc.user[:100],
                client,
                exc.reason,
            )
            self.on_failure(controller.scheme, exc.reason)
            raise Unauthorized(
                "authentication required: the credentials given do not hold",
                [_detail(a) for a in needs.all],
                headers={"WWW-Authenticate": controller.challenge(needs.all, exc.error)},
            ) from None
        if principal is None:
            if anonymous_ok:
                return None
            raise Unauthorized(
                "authentication required",
                [_detail(a) for a in needs.all],
                headers={"WWW-Authenticate": controller.challenge(needs.all)},
            )
        if all(principal.grants(a) for a in needs.required) or anonymous_ok:
            return principal  # credentials never give less than anonymous pull
        log.warning(
            "refused %s %s to %s from %s: not granted",
            request.method,
            " ".join(a.scope for a in needs.required)[:300],
            principal.name[:100],
            client,
        )
        self.on_failure(controller.scheme, "denied")
        raise controller.refuse(principal, needs)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        needs = needed(request)
        if needs is None:
            return await handler(request)
        principal = await self.authorize(request, needs)
        if needs.optional and not (principal and all(map(principal.grants, needs.optional))):
            # A mount from a repository the client may not pull: a plain upload session.
            request = request.clone(rel_url=request.rel_url.without_query_params("from"))
        return await handler(request)


def build(settings: AuthSettings, on_failure: OnFailure | None = None) -> AccessPolicy | None:
    """The policy ``settings`` describe; None when there is no ``auth`` (open, local use)."""
    if not settings.enabled:
        if settings != AuthSettings():
            raise ConfigError(
                "auth: set auth.htpasswd or auth.token (realm, service, issuer and keys); "
                "without either, nothing is checked"
            )
        return None
    if settings.htpasswd is not None and settings.token != TokenSettings():
        raise ConfigError("auth: set auth.htpasswd or auth.token, not both")
    controller: AccessController
    if settings.htpasswd is not None:
        rules = rules_.build(settings.rules)
        controller = BasicController(Htpasswd(settings.htpasswd), rules, settings.realm)
    else:
        if settings.rules:
            raise ConfigError("auth.rules apply to htpasswd users; the token service decides")
        controller = TokenController(TokenVerifier(settings.token))
    return AccessPolicy(
        controller,
        anonymous_pull=networks(settings.anonymous_pull, "auth.anonymous_pull"),
        trusted_proxies=networks(settings.trusted_proxies, "auth.trusted_proxies"),
        on_failure=on_failure,
    )
