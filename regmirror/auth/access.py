"""The access a request needs, derived from its route and method in this one place.

As registry:2 defines it (distribution, ``registry/handlers/app.go``): GET and HEAD
pull; POST, PUT and PATCH pull and push; DELETE deletes; the catalog needs
``registry:catalog:*``. Every request of an upload session needs push whatever its
method (it is a push in progress; registry:2 would ask GET for pull only and DELETE for
delete). A cross-repository mount also asks pull on the source repository, optionally:
without it the request is a plain upload session (:attr:`Needed.optional`). A request
that containerd's ``?ns=`` routes to an upstream behind a prefix also needs the access
the prefixed name needs (:func:`_behind_prefix`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from aiohttp import web

from regmirror.api.keys import REGISTRY
from regmirror.names import check_name

PULL, PUSH, DELETE, ANY = "pull", "push", "delete", "*"
REPOSITORY_ACTIONS = frozenset({PULL, PUSH, DELETE})

# Routes anyone may reach: probes and metrics (bind them elsewhere with metrics_listen).
# The fleet's peer endpoint checks its own credential (fleet.secret), not auth's.
OPEN_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", "/-/status", "/-/fleet/blobs/{digest}"})
CATALOG = "/v2/_catalog"
_UPLOAD_SESSION = "/v2/{name}/blobs/uploads/{uuid}"
_BY_METHOD = {
    "GET": (PULL,),
    "HEAD": (PULL,),
    "POST": (PULL, PUSH),
    "PUT": (PULL, PUSH),
    "PATCH": (PULL, PUSH),
    "DELETE": (DELETE,),
}


@dataclass(frozen=True)
class Access:
    """Actions on one resource: ``repository:library/app:pull,push``, ``registry:catalog:*``."""

    type: str
    name: str
    actions: tuple[str, ...]

    @property
    def scope(self) -> str:
        """The token scope that asks for it (the challenge's ``scope``)."""
        return f"{self.type}:{self.name}:{','.join(self.actions)}"

    @property
    def pull_only(self) -> bool:
        return self.type == "repository" and set(self.actions) <= {PULL}


@dataclass(frozen=True)
class Needed:
    """What a request needs: ``required`` or it is refused; ``optional`` or it is served
    as if it had not asked for it (a mount without pull on its source)."""

    required: tuple[Access, ...]
    optional: tuple[Access, ...] = field(default=())

    @property
    def all(self) -> tuple[Access, ...]:
        return self.required + self.optional

    @property
    def pull_only(self) -> bool:
        """Nothing beyond pulling repositories (``/v2/`` itself needs nothing at all)."""
        return all(access.pull_only for access in self.required)


def scopes(accesses: Iterable[Access]) -> str:
    """Space-separated scopes, as registry:2's challenge and token requests carry them."""
    return " ".join(access.scope for access in accesses)


def needed(request: web.Request) -> Needed | None:
    """What ``request`` needs; None for the routes anyone may reach.

    Requests that match no route need credentials (or anonymous pull) like ``/v2/``.
    """
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else None
    if route in OPEN_ROUTES:
        return None
    if route == CATALOG:
        return Needed((Access("registry", "catalog", (ANY,)),))
    raw_name = request.match_info.get("name")
    if raw_name is None:
        return Needed(())
    name = check_name(raw_name)  # NAME_INVALID before anything else, as the handler would
    actions = (PULL, PUSH) if route == _UPLOAD_SESSION else _BY_METHOD.get(request.method, (PULL,))
    required = (Access("repository", name, actions), *_behind_prefix(request, name, actions))
    source = request.query.get("from")
    if request.method == "POST" and "mount" in request.query and source is not None:
        return Needed(required, (Access("repository", check_name(source), (PULL,)),))
    return Needed(required)


def _behind_prefix(request: web.Request, name: str, actions: tuple[str, ...]) -> tuple[Access, ...]:
    """containerd's ``?ns=<registry>`` routes ``name`` to that registry's upstream even
    when it is one behind a ``prefix``: such a request also needs what ``prefix/name``
    needs, so that rules (and token scopes) written for the prefix hold whichever way
    the upstream is reached."""
    ns = request.query.get("ns")
    registry = request.app.get(REGISTRY) if ns else None
    route = registry.route(name, ns) if registry is not None else None
    prefix = (route.upstream.settings.prefix or "").strip("/") if route is not None else ""
    if route is None or not prefix:
        return ()
    return (Access("repository", f"{prefix}/{route.name}", actions),)
