"""A Registry v2 client for one upstream registry, and the router that picks one.

:class:`Upstream` fetches manifests and streams blobs from one upstream (Docker Hub or
any distribution-spec registry) through an ``aiohttp.ClientSession`` the app owns. It
authenticates as the upstream asks: anonymously, with Basic credentials, or by the
Bearer token flow (distribution's "token authentication specification": a 401 carries
``WWW-Authenticate: Bearer realm=…,service=…,scope=…``; a token fetched from the realm
is cached per scope until it expires and the request is retried once with it).

Redirects (blob storage, CDNs) are followed here, not by aiohttp, so credentials go
to the upstream's own origin only, never to the host a redirect points at.

Configured credentials go to a token realm only on the upstream's own origin or one
listed in its ``token_realms`` (Docker Hub's ``auth.docker.io`` is built in): a challenge
naming any other realm is refused, with nothing sent to it (CVE-2026-33540 was a registry
that handed its upstream password to whatever realm a challenge named). An upstream
without credentials may fetch its anonymous tokens from any realm: there is nothing of
ours to leak, and Docker Hub, GitLab and NGC all keep their token service elsewhere.

Errors are ours at this boundary: 404 is :class:`ManifestUnknown` / :class:`BlobUnknown`,
401/403 after authenticating is :class:`UpstreamDenied`, 429 is :class:`TooManyRequests`,
and connection errors, timeouts, 5xx and malformed answers are
:class:`UpstreamUnavailable`, each raised ``from`` the aiohttp error behind it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import aiohttp
from yarl import URL

from regmirror.config import UpstreamSettings
from regmirror.digest import Digest
from regmirror.errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestTooLarge,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    UpstreamDenied,
    UpstreamUnavailable,
)
from regmirror.logs.redact import without_secrets
from regmirror.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from regmirror.numbers import content_range_total

DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DOCKER_HUB_URL = "https://registry-1.docker.io"
# Bodies are kept as they come (the session does not decompress: digests are of the bytes
# as stored), so no server may be invited to compress them (aiohttp asks for gzip unless
# told otherwise, and nginx or a CDN in front of a registry honours that).
IDENTITY = {"Accept-Encoding": "identity"}
DOCKER_HUB_NAME = "docker.io"  # how containerd's ?ns= names Docker Hub
DOCKER_HUB_TOKEN_REALM = "https://auth.docker.io"
DEFAULT_ACCEPT = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
DEFAULT_TOKEN_TTL = 60.0  # the token spec's default when expires_in is absent
MAX_REDIRECTS = 5
CHUNK = 256 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
log = logging.getLogger(__name__)
_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')
# A tag list is followed through at most this many pages, of at most this many bytes
# each, to at most this many tags: bounded work and memory whatever the upstream sends.
MAX_TAG_PAGES = 1000
MAX_TAG_PAGE_BYTES = 16 * 1024 * 1024
MAX_TAGS = 100_000
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
_NEXT_LINK = re.compile(r'<([^>]*)>\s*;[^,]*?\brel="?next"?', re.IGNORECASE)


class ManifestHead(NamedTuple):
    digest: Digest
    media_type: str
    size: int


class FetchedManifest(NamedTuple):
    raw: bytes
    media_type: str
    digest: Digest


class BlobStream(NamedTuple):
    """``size`` is the blob's full size; ``chunks`` yields its bytes from the offset asked.

    Iterate ``chunks`` to the end or ``await chunks.aclose()``: it holds a connection.
    """

    size: int
    chunks: BlobBody


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """``Bearer realm="…",service="…",scope="…"`` → Challenge; None when unparseable."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {}
    for key, value in _PARAM.findall(rest):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[key.lower()] = value
    return Challenge(scheme.lower(), params)


def basic_authorization(username: str, password: str) -> str:
    """An ``Authorization: Basic`` value (RFC 7617, UTF-8)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def is_docker_hub(host: str) -> bool:
    return host.lower() in DOCKER_HUB_HOSTS


def _parse_url(url: str) -> URL:
    return URL(url if "://" in url else f"https://{url}")


def _base_url(url: str) -> URL:
    """The upstream's base URL, without credentials: ``self.url`` goes into log lines and
    error messages that clients read (credentials in the URL: :func:`_url_credentials`)."""
    parsed = _parse_url(url).with_user(None)
    if parsed.host and is_docker_hub(parsed.host):
        return URL(DOCKER_HUB_URL)
    return parsed.with_path(parsed.path.rstrip("/")).with_query(None).with_fragment(None)


def _url_credentials(settings: UpstreamSettings) -> tuple[str | None, str | None]:
    """``username``/``password``, else those written into the URL (``https://u:p@host``),
    which then follow the same rules (sent to the upstream's origin and trusted realms)."""
    if settings.username is not None:
        return settings.username, settings.password
    parsed = _parse_url(settings.url)
    return parsed.user, parsed.password


@dataclass(slots=True)
class _Token:
    value: str
    expires: float  # on the upstream's clock (monotonic)


class Upstream:
    """One upstream registry. ``repo`` arguments are names *on the upstream* (the
    router has already stripped our prefix); Docker Hub's implicit ``library/`` is
    added here."""

    def __init__(
        self,
        settings: UpstreamSettings,
        session: aiohttp.ClientSession,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        query: Mapping[str, str] | None = None,
    ):
        self.settings = settings
        username, password = _url_credentials(settings)
        # Sent with every /v2/ request: ``{"ns": "docker.io"}`` when the registry is a
        # mirror that routes by containerd's ?ns= (regmirror warm talking to regmirror).
        self.query = dict(query or {})
        self.session = session
        self.url = _base_url(settings.url)
        self.docker_hub = self.url.host is not None and is_docker_hub(self.url.host)
        # How containerd's ?ns= would name this registry.
        host = self.url.host or ""
        if self.url.explicit_port is not None:
            host = f"{host}:{self.url.explicit_port}"
        self.registry_host = DOCKER_HUB_NAME if self.docker_hub else host
        # Where what this upstream pulled is recorded (pullthrough.cache_name): its registry
        # host, and what else decides what it can read. Two upstreams share those records
        # only when they see the same repositories: same host, same base path, same
        # account (anonymous, or the same user). Without that, what a credentialed upstream
        # fetched would be served through an anonymous route to the same host.
        self.cache_key = self.registry_host.lower().replace(":", "-")
        identity = (self.url.path.strip("/"), username or "")
        if any(identity):
            tag = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:16]
            self.cache_key += f"~{tag}"
        self._origin = self.url.origin()
        self._timeout = aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=read_timeout)
        self._clock = clock
        self._basic: str | None = None
        if username is not None:
            self._basic = basic_authorization(username, password or "")
        self._use_basic = False  # the upstream asked for Basic (learnt from a challenge)
        self._bearer: Challenge | None = None  # the upstream's token realm, once seen
        self._tokens: dict[str, _Token] = {}
        self._token_locks: dict[str, asyncio.Lock] = {}
        realms = list(settings.token_realms)
        if self.docker_hub:
            realms.append(DOCKER_HUB_TOKEN_REALM)
        self._trusted_realms = [_realm_origin(entry) for entry in realms]
        self._refused_realms: set[str] = set()  # each logged once

    def __repr__(self) -> str:
        return f"Upstream({str(self.url)!r})"

    @property
    def stall_timeout(self) -> float:
        """The longest one request may go without progress before it fails: connecting,
        then waiting for its next bytes."""
        return (self._timeout.sock_connect or 0.0) + (self._timeout.sock_read or 0.0)

    def remote_name(self, repo: str) -> str:
        """Docker Hub's official images live under ``library/``: ``nginx`` is ``library/nginx``."""
        if self.docker_hub and "/" not in repo:
            return f"library/{repo}"
        return repo

    # -- manifests -----------------------------------------------------------

    async def head_manifest(
        self, repo: str, reference: str, accept: Sequence[str] = DEFAULT_ACCEPT
    ) -> ManifestHead:
        """Digest, media type and size of ``reference`` (tag or digest) without its body."""
        headers = {"Accept": ", ".join(accept or DEFAULT_ACCEPT)}
        response = await self._request("HEAD", repo, f"manifests/{reference}", headers)
        async with response:
            self._expect_ok(response, ManifestUnknown, f"manifest {repo}:{reference}")
            header = response.headers.get("Docker-Content-Digest")
            size = response.content_length
            media_type = _media_type(response)
        if header is None or size is None:  # some registries only say it on GET
            raw, media_type, digest = await self.get_manifest(repo, reference, accept)
            return ManifestHead(digest, media_type, len(raw))
        digest = self._parse_digest(header)
        if ":" in reference and str(digest) != reference:
            raise UpstreamUnavailable(f"{self.url}: HEAD {reference} answered digest {digest}")
        return ManifestHead(digest, media_type, size)

    async def get_manifest(
        self, repo: str, reference: str, accept: Sequence[str] = DEFAULT_ACCEPT
    ) -> FetchedManifest:
        """The manifest's bytes, media type and digest; at most 4 MiB. By digest, the
        bytes are verified against it; by tag, against ``Docker-Content-Digest``."""
        headers = {"Accept": ", ".join(accept or DEFAULT_ACCEPT)}
        response = await self._request("GET", repo, f"manifests/{reference}", headers)
        async with response:
            self._expect_ok(response, ManifestUnknown, f"manifest {repo}:{reference}")
            if (response.content_length or 0) > MAX_MANIFEST_BYTES:
                raise ManifestTooLarge(f"upstream manifest {repo}:{reference} exceeds 4 MiB")
            try:
                raw = await response.content.read(MAX_MANIFEST_BYTES + 1)
                while len(raw) <= MAX_MANIFEST_BYTES and (
                    more := await response.content.read(MAX_MANIFEST_BYTES + 1 - len(raw))
                ):
                    raw += more
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise self._unavailable(f"reading manifest {repo}:{reference}", exc) from exc
            if len(raw) > MAX_MANIFEST_BYTES:
                raise ManifestTooLarge(f"upstream manifest {repo}:{reference} exceeds 4 MiB")
            media_type = _media_type(response)
            header = response.headers.get("Docker-Content-Digest")
        claimed = reference if ":" in reference else header
        algorithm = self._parse_digest(claimed).algorithm if claimed else "sha256"
        digest = Digest.of(raw, algorithm)
        if claimed and str(digest) != claimed:
            raise UpstreamUnavailable(
                f"{self.url}: manifest {repo}:{reference} has digest {digest}, not {claimed}"
            )
        return FetchedManifest(raw, media_type, digest)

    # -- tags ----------------------------------------------------------------

    async def list_tags(self, repo: str) -> list[str]:
        """Every tag of ``repo``, following the upstream's ``Link: <…>; rel="next"`` pages
        (distribution-spec, "Listing Tags"); :class:`NameUnknown` when it has no such
        repository. Only pages of the same repository on the upstream's own origin are
        followed; strings that are not tags are dropped."""
        name = self.remote_name(repo)
        expected = URL(f"{self.url}/v2/{name}/tags/list")
        path: str | None = "tags/list"
        seen = {path}
        tags: list[str] = []
        while path is not None:
            if len(seen) > MAX_TAG_PAGES:
                raise UpstreamUnavailable(f"{self.url}: {repo} has over {MAX_TAG_PAGES} tag pages")
            response = await self._request("GET", repo, path, {"Accept": "application/json"})
            async with response:
                self._expect_ok(response, NameUnknown, f"repository {repo}")
                raw = await self._read_page(response, f"tags of {repo}")
                link, url = response.headers.get("Link", ""), response.url
            tags += self._tag_page(raw, repo)
            if len(tags) > MAX_TAGS:
                raise UpstreamUnavailable(f"{self.url}: {repo} has more than {MAX_TAGS} tags")
            path = self._next_page(link, url, expected)
            if path in seen:
                raise UpstreamUnavailable(f"{self.url}: the tag pages of {repo} loop at {path}")
            seen.add(path)
        return tags

    async def _read_page(self, response: aiohttp.ClientResponse, what: str) -> bytes:
        if (response.content_length or 0) > MAX_TAG_PAGE_BYTES:
            raise UpstreamUnavailable(f"{self.url}: {what} exceed {MAX_TAG_PAGE_BYTES} bytes")
        raw = b""
        try:
            while len(raw) <= MAX_TAG_PAGE_BYTES and (
                more := await response.content.read(MAX_TAG_PAGE_BYTES + 1 - len(raw))
            ):
                raw += more
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unavailable(f"reading {what}", exc) from exc
        if len(raw) > MAX_TAG_PAGE_BYTES:
            raise UpstreamUnavailable(f"{self.url}: {what} exceed {MAX_TAG_PAGE_BYTES} bytes")
        return raw

    def _tag_page(self, raw: bytes, repo: str) -> list[str]:
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise UpstreamUnavailable(f"{self.url}: tags of {repo} are not JSON") from exc
        page = body.get("tags") if isinstance(body, dict) else None
        if page is None and isinstance(body, dict):
            return []  # registry:2 says "tags": null for a repository without tags
        if not isinstance(page, list):
            raise UpstreamUnavailable(f"{self.url}: tags of {repo} are not a list")
        return [tag for tag in page if isinstance(tag, str) and _TAG.match(tag)]

    def _next_page(self, link: str, url: URL, expected: URL) -> str | None:
        """The next page's path below ``/v2/<name>/`` (with its query), from a ``Link``
        header; None on the last page."""
        match = _NEXT_LINK.search(link)
        if match is None:
            return None
        target = url.join(URL(match[1]))
        if target.origin() != self._origin or target.path != expected.path:
            raise UpstreamUnavailable(f"{self.url}: a tag page links outside the list: {target}")
        return f"tags/list?{target.raw_query_string}" if target.raw_query_string else "tags/list"

    # -- blobs ---------------------------------------------------------------

    async def stat_blob(self, repo: str, digest: Digest) -> int:
        """The size of blob ``digest`` in ``repo``."""
        response = await self._request("HEAD", repo, f"blobs/{digest}", {})
        async with response:
            self._expect_ok(response, BlobUnknown, f"blob {digest} in {repo}")
            if response.content_length is None:
                raise UpstreamUnavailable(f"{self.url}: HEAD blob {digest} has no Content-Length")
            return response.content_length

    async def open_blob(self, repo: str, digest: Digest, offset: int = 0) -> BlobStream:
        """Stream blob ``digest`` from ``offset``; the bytes are not verified here (the
        fill verifies the whole blob). Follows redirects to blob storage."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = await self._request("GET", repo, f"blobs/{digest}", headers)
        try:
            self._expect_ok(response, BlobUnknown, f"blob {digest} in {repo}")
            length = response.content_length
            if length is None:
                raise UpstreamUnavailable(f"{self.url}: blob {digest} has no Content-Length")
            skip = 0
            if response.status == 206:
                total = content_range_total(response.headers.get("Content-Range", ""))
                size = total if total is not None else offset + length
            else:  # 200: the upstream ignored Range; drop the bytes before the offset
                size, skip = length, offset
            body = BlobBody(response, expected=length, skip=skip, upstream=self)
        except BaseException:
            response.release()
            raise
        return BlobStream(size, body)

    # -- requests and auth ---------------------------------------------------

    async def _request(
        self, method: str, repo: str, path: str, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """An authenticated request for ``/v2/<repo>/<path>``; never a 401/403/429/5xx."""
        name = self.remote_name(repo)
        url = URL(f"{self.url}/v2/{name}/{path}").update_query(self.query)
        scope = f"repository:{name}:pull"
        sent: str | None = None
        for attempt in range(2):
            sent = await self._credential(scope)
            response = await self._follow(method, url, headers, sent)
            if response.status != 401 or attempt == 1:
                break
            challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
            response.release()
            if not await self._answer(challenge, scope, sent):
                raise UpstreamDenied(
                    f"{self.url} requires credentials for {scope}"
                    + ("" if self._basic else " and none are configured")
                )
        if response.status in (401, 403):
            response.release()
            how = "with our credentials" if sent else "anonymously"
            raise UpstreamDenied(f"{self.url} refused {method} {url.path} {how} ({scope})")
        if response.status == 429:
            retry = response.headers.get("Retry-After")
            response.release()
            raise TooManyRequests(
                f"{self.url} is rate-limiting us", headers={"Retry-After": retry} if retry else None
            )
        if response.status >= 500:
            response.release()
            raise UpstreamUnavailable(f"{self.url}: {method} {url.path} answered {response.status}")
        return response

    async def _follow(
        self, method: str, url: URL, headers: dict[str, str], authorization: str | None
    ) -> aiohttp.ClientResponse:
        for _ in range(MAX_REDIRECTS + 1):
            sent = {**IDENTITY, **headers}
            if authorization and url.origin() == self._origin:
                sent["Authorization"] = authorization
            try:
                response = await self.session.request(
                    method, url, headers=sent, allow_redirects=False, timeout=self._timeout
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                # A redirect's URL may be presigned: its query string is a credential.
                raise self._unavailable(f"{method} {without_secrets(url)}", exc, url) from exc
            location = response.headers.get("Location")
            if response.status not in _REDIRECTS or not location:
                return response
            response.release()
            url = response.url.join(URL(location))
            if response.status == 303 and method != "HEAD":
                method = "GET"
        raise UpstreamUnavailable(
            f"{self.url}: more than {MAX_REDIRECTS} redirects for {without_secrets(url)}"
        )

    async def _credential(self, scope: str) -> str | None:
        if self._use_basic:
            return self._basic
        token = self._tokens.get(scope)
        if token is not None and token.expires > self._clock():
            return f"Bearer {token.value}"
        if self._bearer is not None:  # we know the realm: skip the 401 round trip
            return f"Bearer {await self._token(self._bearer, scope, stale=None)}"
        return None

    async def _answer(self, challenge: Challenge | None, scope: str, sent: str | None) -> bool:
        """Prepare credentials for a retry after a 401; False when we have none to offer."""
        if challenge is None:
            return False
        if challenge.scheme == "bearer" and challenge.params.get("realm"):
            # Remembered without its scope, which names this request's repository only.
            params = {k: v for k, v in challenge.params.items() if k != "scope"}
            self._bearer = Challenge(challenge.scheme, params)
            stale = sent.removeprefix("Bearer ") if sent and sent.startswith("Bearer ") else None
            await self._token(challenge, scope, stale=stale)
            return True
        if challenge.scheme == "basic" and self._basic and not self._use_basic:
            self._use_basic = True
            return True
        return False

    async def _token(self, challenge: Challenge, scope: str, *, stale: str | None) -> str:
        """A token for ``scope``: the cached one unless it is ``stale`` or expired; one
        fetch per scope at a time, however many requests need it."""
        lock = self._token_locks.setdefault(scope, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(scope)
            if cached and cached.value != stale and cached.expires > self._clock():
                return cached.value
            self._tokens.pop(scope, None)
            token = await self._fetch_token(challenge, scope)
            self._tokens[scope] = token
            return token.value

    def trusts_realm(self, realm: URL) -> bool:
        """May our credentials go to token realm ``realm``: on our own origin, or one
        in ``token_realms`` (scheme, host and port all match)?"""
        origin = _origin(realm)
        return origin == _origin(self.url) or any(
            trusted == origin or trusted == ("", *origin[1:]) for trusted in self._trusted_realms
        )

    async def _fetch_token(self, challenge: Challenge, scope: str) -> _Token:
        realm = URL(challenge.params["realm"])
        if realm.scheme not in ("http", "https"):
            raise UpstreamUnavailable(f"{self.url}: token realm {realm} is not an http(s) URL")
        if self._basic and not self.trusts_realm(realm):
            reason = (
                f"{self.url}: refusing to send its credentials to token realm {realm} (not "
                f"its own host; list that host in the upstream's token_realms to trust it)"
            )
            if str(realm) not in self._refused_realms:
                self._refused_realms.add(str(realm))
                log.warning("%s", reason)
            raise UpstreamDenied(reason)
        query: list[tuple[str, str]] = []
        if "service" in challenge.params:
            query.append(("service", challenge.params["service"]))
        # The challenge names the scope the request needs; ask for it, or ours without one.
        scopes = challenge.params.get("scope", "").split() or [scope]
        query += [("scope", s) for s in scopes]
        headers = {**IDENTITY, "Authorization": self._basic} if self._basic else dict(IDENTITY)
        started = self._clock()
        try:
            async with self.session.get(
                realm.extend_query(query), headers=headers, timeout=self._timeout
            ) as response:
                if response.status in (401, 403):
                    raise UpstreamDenied(
                        f"token service {realm} refused "
                        + ("our credentials" if self._basic else "an anonymous token")
                        + f" for {' '.join(scopes)}"
                    )
                if response.status != 200:
                    raise UpstreamUnavailable(f"token service {realm} answered {response.status}")
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise self._unavailable(f"token service {realm}", exc) from exc
        value = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise UpstreamUnavailable(f"token service {realm} answered no token")
        ttl = body.get("expires_in")
        ttl = float(ttl) if isinstance(ttl, int | float) and ttl > 0 else DEFAULT_TOKEN_TTL
        # Renew a little early so a token does not expire between our check and its use.
        return _Token(value, started + ttl - min(5.0, ttl / 10))

    # -- answers -------------------------------------------------------------

    def _expect_ok(
        self, response: aiohttp.ClientResponse, unknown: type[RegistryError], what: str
    ) -> None:
        if response.status == 404:
            raise unknown(f"{what} is not known upstream ({self.url})")
        if response.status not in (200, 206):
            raise UpstreamUnavailable(f"{self.url}: {what} answered {response.status}")

    def _parse_digest(self, text: str) -> Digest:
        try:
            return Digest.parse(text)
        except DigestInvalid as exc:
            raise UpstreamUnavailable(f"{self.url} sent an invalid digest {text[:150]!r}") from exc

    def _unavailable(
        self, what: str, exc: BaseException, url: URL | None = None
    ) -> UpstreamUnavailable:
        reason = "timed out" if isinstance(exc, TimeoutError) else (str(exc) or type(exc).__name__)
        if url is not None and url.raw_query_string:  # aiohttp's errors may quote the URL
            reason = reason.replace(str(url), without_secrets(url))
            reason = reason.replace(url.raw_query_string, "…")
        return UpstreamUnavailable(f"{self.url}: {what}: {reason}")


class BlobBody:
    """The bytes of one upstream blob response; an async iterator that owns the response.

    Raises :class:`UpstreamUnavailable` when the connection fails or ends short of the
    ``Content-Length``: a truncated blob never ends cleanly.
    """

    def __init__(
        self, response: aiohttp.ClientResponse, *, expected: int, skip: int, upstream: Upstream
    ):
        self._response = response
        self._remaining = expected
        self._skip = skip
        self._upstream = upstream

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._remaining <= 0:
                await self.aclose()
                raise StopAsyncIteration
            try:
                chunk = await self._response.content.read(min(CHUNK, self._remaining))
            except (aiohttp.ClientError, TimeoutError) as exc:
                await self.aclose()
                raise self._upstream._unavailable("reading a blob", exc) from exc
            if not chunk:
                await self.aclose()
                raise UpstreamUnavailable(
                    f"{self._upstream.url}: blob body ended {self._remaining} bytes short"
                )
            self._remaining -= len(chunk)
            if self._skip:
                dropped = min(self._skip, len(chunk))
                self._skip -= dropped
                chunk = chunk[dropped:]
                if not chunk:
                    continue
            return chunk

    async def aclose(self) -> None:
        self._response.release()


def _origin(url: URL) -> tuple[str, str, int | None]:
    return (url.scheme.lower(), (url.host or "").lower().rstrip("."), url.port)


def _realm_origin(entry: str) -> tuple[str, str, int | None]:
    """A ``token_realms`` entry as (scheme, host, port); scheme "" when the entry has none
    (``auth.example.com`` and ``host:5001`` match http and https, on 443 when no port)."""
    if "://" in entry:
        return _origin(URL(entry))
    return ("", *_origin(URL(f"https://{entry}"))[1:])


def _media_type(response: aiohttp.ClientResponse) -> str:
    return response.headers.get("Content-Type", "").split(";")[0].strip()


# -- routing ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    upstream: Upstream
    name: str  # the repository name on the upstream (our prefix stripped)


class UpstreamRouter:
    """Chooses the upstream for a repository name and containerd's ``?ns=`` value.

    - With ``ns`` (containerd names the registry it wants): the upstream whose ``ns``
      setting equals it, or whose own host is it (``docker.io`` for Docker Hub); the
      name is used as is. No match is None: a name in one registry must never be
      answered from another.
    - Without ``ns``: the upstream whose ``prefix`` is the name's leading component(s),
      the prefix stripped (``ghcr/foo/bar`` → ``foo/bar``); else the default upstream
      (the first without a prefix, preferring one without ``ns``); else None.

    With no upstreams configured every route is None: the registry never reaches out.
    """

    def __init__(self, upstreams: Sequence[Upstream]):
        self.upstreams = list(upstreams)
        prefixed = [u for u in self.upstreams if u.settings.prefix]
        # Longest prefix first, so "ghcr/team" wins over "ghcr".
        self._prefixed = sorted(prefixed, key=lambda u: -len((u.settings.prefix or "").strip("/")))
        # The default: the first with no prefix, preferring one not bound to an ns.
        unprefixed = [u for u in self.upstreams if not u.settings.prefix]
        self._default = next((u for u in unprefixed if not u.settings.ns), None) or next(
            iter(unprefixed), None
        )

    @classmethod
    def from_settings(
        cls, settings: Sequence[UpstreamSettings], session: aiohttp.ClientSession
    ) -> UpstreamRouter:
        return cls([Upstream(s, session) for s in settings])

    def route(self, name: str, ns: str | None = None) -> Route | None:
        if ns:
            wanted = DOCKER_HUB_NAME if is_docker_hub(ns) else ns.lower()
            for upstream in self.upstreams:
                if (upstream.settings.ns or "").lower() == wanted:
                    return Route(upstream, name)
            for upstream in self.upstreams:
                if upstream.registry_host.lower() == wanted:
                    return Route(upstream, name)
            return None
        for upstream in self._prefixed:
            prefix = (upstream.settings.prefix or "").strip("/") + "/"
            if name.startswith(prefix) and len(name) > len(prefix):
                return Route(upstream, name[len(prefix) :])
        if self._default is not None:
            return Route(self._default, name)
        return None
