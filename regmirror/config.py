"""Typed settings: embedded defaults, then a YAML file, then ``REGMIRROR_*`` variables.

Every key can be set from the environment: ``REGMIRROR_<KEY>``, nested keys
joined by ``__`` (``REGMIRROR_S3__BUCKET``, ``REGMIRROR_CACHE__MAX_BYTES``), list
items by index (``REGMIRROR_UPSTREAMS__0__URL``). Values are read as YAML
scalars, so ``true`` and ``30`` have their types, except for string settings,
which take the text as it is (a password ``0123`` stays ``0123``, not 83).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from regmirror.numbers import ascii_int

ENV_PREFIX = "REGMIRROR_"
MAX_INDEX_DIGITS = 3  # REGMIRROR_UPSTREAMS__<i>__...: i from 0 to 999, never a huge list
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}


class ConfigError(ValueError):
    """A setting that cannot be used, named by its path (``cache.max_bytes``)."""


def parse_size(value: int | str) -> int:
    """``10GiB``, ``512MB``, ``1.5G`` or a plain number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size like 10GiB, 512MB or 1048576")
    number, unit = float(match[1]), (match[2] or "").upper().rstrip("B")
    prefix = unit.rstrip("I")
    scale = 1024 ** ("KMGTP".index(prefix) + 1) if unit.endswith("I") else _UNITS[prefix]
    return int(number * scale)


def _size(**kwargs: Any) -> Any:
    return field(metadata={"parse": parse_size}, **kwargs)


def default_data_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/regmirror"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "regmirror")


@dataclass
class CacheSettings:
    max_bytes: int | None = _size(default=None)
    min_free_bytes: int = _size(default=1024**3)
    fill_timeout: float = 3600.0  # seconds one fill from S3 or an upstream may take
    fill_idle_timeout: float = 60.0  # seconds without a byte from the source before it fails
    # Seconds a blob no link references (a crash between its rename and its link) is kept
    # after its last use before it is deleted; leaves a push in flight time to link it.
    unreferenced_grace: float = 3600.0


@dataclass
class S3Settings:
    bucket: str | None = None
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None
    path_style: bool = False
    multipart_threshold: int = _size(default=64 * 1024**2)
    part_size: int = _size(default=16 * 1024**2)
    tag_ttl: float = 5.0  # seconds a link read from S3 is trusted before asking again
    write_back: bool = False  # also store what upstreams served in S3, for the other hosts


@dataclass
class UpstreamSettings:
    url: str
    prefix: str | None = None
    ns: str | None = None
    username: str | None = None
    password: str | None = None
    tag_ttl: float = 300.0
    # Repository globs (fnmatch, ``*`` crosses ``/``) this upstream never hears of: names
    # only ever pushed here. ``REGMIRROR_UPSTREAMS__0__PUSH_ONLY='[ci/*, team/*]'``.
    push_only: list[str] = field(default_factory=list)
    # Token realms on other hosts this upstream's challenges may name (``auth.docker.io``
    # or ``https://auth.example.com``); our credentials go nowhere else.
    token_realms: list[str] = field(default_factory=list)


@dataclass
class RuleSettings:
    """Who (an htpasswd user, or ``*``) may do what (pull, push, delete) where (globs)."""

    user: str
    repositories: list[str]
    actions: list[str]


@dataclass
class TokenSettings:
    """Docker token auth, with registry:2's keys (``auth.token`` in its config)."""

    realm: str | None = None  # the token service's URL clients are sent to
    service: str | None = None  # this registry's name: tokens must carry it in ``aud``
    issuer: str | None = None  # the token service's name: tokens must carry it in ``iss``
    rootcertbundle: str | None = None  # PEM certificates whose keys may sign tokens
    jwks: str | None = None  # a JWKS file of keys that may sign tokens
    signing_algorithms: list[str] = field(
        default_factory=lambda: [
            *("RS256", "RS384", "RS512", "ES256", "ES384", "ES512"),
            *("PS256", "PS384", "PS512", "EdDSA"),
        ]
    )


@dataclass
class AuthSettings:
    htpasswd: str | None = None
    realm: str = "regmirror"  # the Basic challenge's realm
    anonymous_pull: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    trusted_proxies: list[str] = field(default_factory=list)
    rules: list[RuleSettings] = field(default_factory=list)
    token: TokenSettings = field(default_factory=TokenSettings)

    @property
    def enabled(self) -> bool:
        """Whether requests are checked at all: an htpasswd file or a token service is set."""
        return self.htpasswd is not None or self.token != TokenSettings()


@dataclass
class TLSSettings:
    cert: str | None = None  # PEM certificate chain; with ``key``, serve HTTPS
    key: str | None = None
    client_ca: str | None = None  # PEM CAs; set: clients must present a certificate


@dataclass
class UploadSettings:
    ttl: float = 24 * 3600.0  # idle seconds after which a session is dropped
    idle_timeout: float = 60.0  # seconds without a byte of a request body before it is cut
    # A request body slower than this many bytes a second, averaged over each
    # min_rate_window, is cut too (a trickle never goes idle); 0: no minimum.
    min_rate: int = _size(default=1024)
    min_rate_window: float = 60.0
    max_blob_bytes: int = _size(default=10 * 1024**3)  # the largest blob one may push
    max_sessions: int = 1000  # open upload sessions in all
    max_sessions_per_client: int = 250  # open upload sessions per client address
    # IPv6 clients count per network of this many leading bits (one host often holds a
    # whole /64); 128: per address.
    client_ipv6_prefix: int = 64

    def __post_init__(self) -> None:
        for key in ("idle_timeout", "max_blob_bytes", "max_sessions", "max_sessions_per_client"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"uploads.{key}: must be more than 0")
        if not 1 <= self.client_ipv6_prefix <= 128:
            raise ConfigError("uploads.client_ipv6_prefix: must be from 1 to 128")
        if self.min_rate < 0:
            raise ConfigError("uploads.min_rate: must be 0 (no minimum) or more")
        if self.min_rate_window <= 0:
            raise ConfigError("uploads.min_rate_window: must be more than 0")


def _one_of(*choices: str) -> Any:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    return parse


@dataclass
class LogSettings:
    format: str = field(default="text", metadata={"parse": _one_of("text", "json")})
    access: bool = True  # one line per request on the registry port


@dataclass
class FleetSettings:
    """Fleet-wide single-flight through the S3 bucket (see :mod:`regmirror.fleet`)."""

    # How the other hosts reach this one (http://10.0.3.7:5000); set, with s3.bucket and
    # s3.write_back, it turns fleet mode on.
    advertise_url: str | None = None
    # Shared by every host of the fleet: peer requests are signed with it (HMAC); required
    # with advertise_url.
    secret: str | None = None
    lease_ttl: float = 30.0  # seconds a fill's lease holds without being renewed
    peer_timeout: float = 10.0  # seconds without a byte from a peer before taking over
    tag_wait: float = 5.0  # seconds to wait for another host's tag revalidation


@dataclass
class ServerSettings:
    """How the listening ports treat clients and how SIGTERM ends the process."""

    drain_timeout: float = 30.0  # seconds SIGTERM waits for requests in flight, in total
    header_timeout: float = 15.0  # seconds a client has to send a request's headers
    keepalive_timeout: float = 75.0  # seconds an idle keep-alive connection is kept
    # Open connections per port, for the host (each worker gets a share: server.py);
    # beyond it the longest idle one is closed (or, with none idle, the new one).
    # Lowered at startup to leave room under the fd limit.
    max_connections: int = 2048
    max_loop_lag: float = 5.0  # seconds the event loop may stall before /readyz fails
    # Seconds a response may wait on a client that acknowledges none of its bytes (it
    # stopped reading) before the connection is cut; cut within twice this.
    send_timeout: float = 60.0
    # An internal nginx location over the data directory's blobs (``/_regmirror_blobs/``):
    # set, a stored blob's GET is answered with X-Accel-Redirect there, after the same
    # checks, and nginx sends the bytes. Only behind deploy/nginx/regmirror-accel.conf.
    accel_redirect: str | None = None
    # Serving processes on the one port, over the one data directory (regmirror.workers):
    # 0, one per CPU this process may use (within its cgroup's CPU quota); 1, this
    # process alone. README ("Every core") says what differs across workers.
    workers: int = 0
    # Manifests held in memory answered below aiohttp (regmirror.lean): the same
    # responses, metrics and access lines for a fraction of the CPU. false: all by aiohttp.
    fast_path: bool = True

    def __post_init__(self) -> None:
        for name in (
            "drain_timeout",
            "header_timeout",
            "keepalive_timeout",
            "max_loop_lag",
            "send_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if not 0 <= self.workers <= 256:
            raise ValueError(f"workers: {self.workers} is not 0..256 (0: one per CPU)")
        location = self.accel_redirect
        if location is not None and (
            not location.startswith("/") or any(c in location for c in "?#\r\n ")
        ):
            raise ValueError(
                f"accel_redirect: {location!r} is not a location path like /_regmirror_blobs/"
            )


@dataclass
class Settings:
    listen: str = "127.0.0.1:5000"
    data_dir: str = field(default_factory=default_data_dir)
    cache: CacheSettings = field(default_factory=CacheSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    upstreams: list[UpstreamSettings] = field(default_factory=list)
    auth: AuthSettings = field(default_factory=AuthSettings)
    uploads: UploadSettings = field(default_factory=UploadSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    log: LogSettings = field(default_factory=LogSettings)
    # HOST:PORT serving /metrics, /healthz and /readyz (plain HTTP); the registry port
    # then stops serving /metrics. None: everything on ``listen``.
    metrics_listen: str | None = None

    def host_port(self) -> tuple[str, int]:
        return _host_port(self.listen, "listen")

    def metrics_host_port(self) -> tuple[str, int] | None:
        if self.metrics_listen is None:
            return None
        return _host_port(self.metrics_listen, "metrics_listen")


def _host_port(value: str, key: str) -> tuple[str, int]:
    host, sep, text = value.rpartition(":")
    port = ascii_int(text, max_digits=5)
    if not sep or port is None or not 0 < port < 65536:
        raise ConfigError(f"{key}: {value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", port


def load(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings from the file at ``path``, the environment and ``overrides`` (CLI flags)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings")
        data = loaded or {}
    for key, value in sorted((os.environ if environ is None else environ).items()):
        if key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX):
            _set_path(data, key[len(ENV_PREFIX) :].lower().split("__"), _EnvText(value), key)
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return _build(Settings, data, "")


class _EnvText(str):
    """A value from the environment, typed only once the setting it goes to is known."""


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(data: Any, parts: list[str], value: Any, origin: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(data, list):
        index = ascii_int(head, max_digits=MAX_INDEX_DIGITS)
        if index is None:
            raise ConfigError(f"{origin}: {head!r} is not a list index (0 to 999)")
        while len(data) <= index:
            data.append({})
        if rest:
            _set_path(data[index], rest, value, origin)
        else:
            data[index] = value
        return
    if not rest:
        data[head] = value
        return
    child = data.get(head)
    if not isinstance(child, dict | list):
        child = data[head] = [] if ascii_int(rest[0]) is not None else {}
    _set_path(child, rest, value, origin)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'settings'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = sorted(set(data) - set(fields), key=str)
    unknown = [f"{where}.{key}" if where else str(key) for key in extra]
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        parse = fields[name].metadata.get("parse")
        try:
            values[name] = _convert(hints[name], value, path, parse)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{path}: {exc}") from exc
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where or 'settings'}: {exc}") from exc


def _convert(hint: Any, value: Any, path: str, parse: Any = None) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    union = origin in (typing.Union, types.UnionType)
    if isinstance(value, _EnvText):
        value = str(value) if hint is str or (union and str in args) else _scalar(value)
    if union:
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if parse is not None:
        return parse(value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list")
        return [_convert(args[0], item, f"{path}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if hint is str and not isinstance(value, str | int | float):
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return hint(value)
