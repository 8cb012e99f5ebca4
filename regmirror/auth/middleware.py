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

import logging
import re
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from regmirror.auth import rules as rules_
from regmirror.auth.access import Needed, needed
from regmirror.auth.clients import Address, Network, client_address, networks, within
from regmirror.auth.controllers import (
    AccessController,
    BasicController,
    LoginFailed,
    Principal,
    TokenController,
    detail,
)
from regmirror.auth.htpasswd import Htpasswd
from regmirror.auth.token import TokenVerifier
from regmirror.config import AuthSettings, ConfigError, TokenSettings
from regmirror.errors import Unauthorized
from regmirror.logs import served

log = logging.getLogger(__name__)
_QUOTABLE = re.compile(r'[^"\\\x00-\x1f\x7f]*')

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Called on every refused login or permission: (scheme, reason). Bounded values only.
OnFailure = Callable[[str, str], None]


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
                [detail(a) for a in needs.all],
                headers={"WWW-Authenticate": controller.challenge(needs.all, exc.error)},
            ) from None
        if principal is None:
            if anonymous_ok:
                return None
            raise Unauthorized(
                "authentication required",
                [detail(a) for a in needs.all],
                headers={"WWW-Authenticate": controller.challenge(needs.all)},
            )
        if all(principal.grants(a) for a in needs.required) or anonymous_ok:
            return principal  # credentials never give less than anonymous pull
        log.warning(
            "refused %s %s to %r from %s: not granted",
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
        if principal is not None:
            served.identify(request, principal.name)
        if needs.optional and not (principal and all(map(principal.grants, needs.optional))):
            # A mount from a repository the client may not pull: a plain upload session.
            request = request.clone(rel_url=request.rel_url.without_query_params("from"))
        return await handler(request)


# The application's policy, when access control is configured (the fast path asks it).
ACCESS_POLICY = web.AppKey("access_policy", AccessPolicy)


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
    for setting, value in (
        ("auth.realm", settings.realm),
        ("auth.token.realm", settings.token.realm),
        ("auth.token.service", settings.token.service),
    ):
        if value is not None and not _QUOTABLE.fullmatch(value):
            raise ConfigError(f"{setting}: {value!r} cannot go in a challenge (quotes, controls)")
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
