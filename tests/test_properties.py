"""Property-based tests of the whole API surface against a running regmirror process.

Generated names, references, digests, query strings, headers, Content-Range values and
manifest bodies (deep nesting, huge numbers, non-UTF-8). Properties, whatever the input:

- no 5xx;
- every error answer (but HEAD's, which has no body) is the spec's JSON envelope;
- no file outside the data directory appears or changes;
- afterwards every stored blob re-hashes to its name.

The example budget is fixed for CI (``REGMIRROR_PROPERTY_EXAMPLES``, default 300 per
test); ``bench/properties.py`` runs the longer profile.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.processes import ServerProcess, run_regmirror

EXAMPLES = int(os.environ.get("REGMIRROR_PROPERTY_EXAMPLES", "300"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- a server shared by the module ---------------------------------------------


# A blob the server holds from the start, so that generated reads reach Range handling.
KNOWN = b"a blob pushed the ordinary way" * 100
KNOWN_DIGEST = "sha256:" + hashlib.sha256(KNOWN).hexdigest()
KNOWN_NAME = "props/known"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("properties")
    # Every example opens a session from 127.0.0.1; the caps are tested elsewhere.
    caps = {"REGMIRROR_UPLOADS__MAX_SESSIONS": "1000000"}
    caps["REGMIRROR_UPLOADS__MAX_SESSIONS_PER_CLIENT"] = "1000000"
    with run_regmirror(base, log_level="WARNING", env=caps) as process:
        query = {"digest": KNOWN_DIGEST}
        status, _ = request(process, "POST", _path(KNOWN_NAME, "blobs/uploads/", query), body=KNOWN)
        assert status == 201
        yield process


@pytest.fixture(scope="module")
def outside(server: ServerProcess) -> Iterator[None]:
    """Every file beside the data directory, unchanged by anything the tests send."""
    base = server.data_dir.parent
    before = _snapshot(base, server.data_dir)
    yield
    assert _snapshot(base, server.data_dir) == before


def _snapshot(base: Path, data_dir: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for path in base.rglob("*"):
        if data_dir in path.parents or path == data_dir or not path.is_file():
            continue
        if path.suffix == ".log":
            continue  # the server's own log grows
        stat = path.stat()
        found[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return found


# aiohttp answers a request line longer than this with its own plain 400 before any
# handler runs; the spec's envelope cannot apply there.
REQUEST_LINE_LIMIT = 8190


def request(
    server: ServerProcess,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    if len(path) > REQUEST_LINE_LIMIT - len(method) - 10:
        path = path[: REQUEST_LINE_LIMIT - len(method) - 10]
    headers = {k: v[: REQUEST_LINE_LIMIT - len(k) - 4] for k, v in (headers or {}).items()}
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def assert_well_formed(method: str, status: int, body: bytes) -> None:
    assert status < 500, (status, body[:300])
    if status < 400 or method == "HEAD":
        return
    envelope = json.loads(body)
    errors = envelope["errors"]
    assert errors and all(isinstance(e["code"], str) and "message" in e for e in errors), envelope


# -- what clients send -----------------------------------------------------------

_PATH_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=40
)
_COMPONENT = st.from_regex(r"[a-z0-9]+(?:[._-][a-z0-9]+)*", fullmatch=True).filter(
    lambda s: len(s) < 30
)
NAMES = st.one_of(
    st.lists(_COMPONENT, min_size=1, max_size=4).map("/".join),
    _PATH_TEXT.map(lambda s: quote(s, safe="/")),
    st.sampled_from(["..", "a/../../etc", "a//b", "%2e%2e/x", "_catalog", "a/_uploads", "A"]),
    st.just(KNOWN_NAME),
)
DIGESTS = st.one_of(
    st.just(KNOWN_DIGEST),
    st.binary(max_size=8).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest()),
    st.from_regex(r"(sha256|sha512|md5|SHA256):[0-9a-fA-F]{0,130}", fullmatch=True),
    _PATH_TEXT.map(lambda s: quote(s, safe=":")),
)
TAGS = st.one_of(
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", fullmatch=True),
    _PATH_TEXT.map(lambda s: quote(s, safe="")).filter(bool),
)
REFERENCES = st.one_of(TAGS, DIGESTS)
NUMBERS = st.one_of(
    st.integers(min_value=-10, max_value=10**6).map(str),
    st.just("9" * 4400),  # past int()'s 4300-digit limit
    st.sampled_from(["²", "٣", "1e3", "0x10", " 1", "", "-0", "+5"]),
)
QUERIES = st.dictionaries(
    st.sampled_from(["n", "last", "digest", "mount", "from", "ns", "artifactType", "x"]),
    st.one_of(NUMBERS, TAGS, DIGESTS, NAMES),
    max_size=4,
)


def _latin1(text: str) -> bool:
    """What an HTTP header can carry at all."""
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


CONTENT_RANGES = st.one_of(
    st.tuples(NUMBERS, NUMBERS).map(lambda t: f"{t[0]}-{t[1]}"),
    st.tuples(NUMBERS, NUMBERS).map(lambda t: f"bytes {t[0]}-{t[1]}/*"),
    _PATH_TEXT.filter(lambda s: s.isprintable() and s.isascii()),
).filter(_latin1)
RANGES = st.one_of(
    st.tuples(NUMBERS, NUMBERS).map(lambda t: f"bytes={t[0]}-{t[1]}"),
    st.sampled_from(["bytes=-0", "bytes=0-", "bytes=5-2", "items=0-1", "bytes=0-1,4-5", ""]),
).filter(_latin1)


def _nested(depth: int) -> bytes:
    return b'{"schemaVersion":2,"a":' + b"[" * depth + b"]" * depth + b"}"


MANIFEST_BODIES = st.one_of(
    st.binary(max_size=200),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
        lambda children: st.one_of(
            st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children)
        ),
        max_leaves=20,
    ).map(lambda v: json.dumps({"schemaVersion": 2, "config": v, "layers": v}).encode()),
    st.integers(min_value=1, max_value=5000).map(_nested),
    st.just(b'{"schemaVersion": 2, "config": {"size": 1' + b"0" * 5000 + b"}}"),
)
MEDIA_TYPES = st.one_of(
    st.sampled_from(
        [
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            "text/plain; charset=\u00ff",
        ]
    ),
    _PATH_TEXT.filter(lambda s: s.isprintable() and s.isascii()),
)


def _path(name: str, suffix: str, query: dict[str, str] | None = None) -> str:
    path = f"/v2/{name}/{suffix}"
    return f"{path}?{urlencode(query)}" if query else path


# -- the properties ----------------------------------------------------------------


@PROPERTY
@given(method=st.sampled_from(["GET", "HEAD", "DELETE"]), name=NAMES, reference=REFERENCES)
def test_manifest_reads_and_deletes_never_fail_the_server(
    server: ServerProcess, outside: None, method: str, name: str, reference: str
) -> None:
    status, body = request(server, method, _path(name, f"manifests/{reference}"))
    assert_well_formed(method, status, body)


@PROPERTY
@given(name=NAMES, reference=REFERENCES, body=MANIFEST_BODIES, media_type=MEDIA_TYPES)
def test_manifest_puts_never_fail_the_server(
    server: ServerProcess, outside: None, name: str, reference: str, body: bytes, media_type: str
) -> None:
    headers = {"Content-Type": media_type}
    status, answer = request(
        server, "PUT", _path(name, f"manifests/{reference}"), body=body, headers=headers
    )
    assert_well_formed("PUT", status, answer)


@PROPERTY
@given(
    method=st.sampled_from(["GET", "HEAD", "DELETE"]),
    name=NAMES,
    digest=DIGESTS,
    range_=st.none() | RANGES,
)
def test_blob_reads_never_fail_the_server(
    server: ServerProcess, outside: None, method: str, name: str, digest: str, range_: str | None
) -> None:
    headers = {"Range": range_} if range_ is not None else {}
    status, body = request(server, method, _path(name, f"blobs/{digest}"), headers=headers)
    assert_well_formed(method, status, body)


@PROPERTY
@given(name=NAMES, query=QUERIES, body=st.binary(max_size=64))
def test_upload_starts_never_fail_the_server(
    server: ServerProcess, outside: None, name: str, query: dict[str, str], body: bytes
) -> None:
    status, answer = request(server, "POST", _path(name, "blobs/uploads/", query), body=body)
    assert_well_formed("POST", status, answer)


@PROPERTY
@given(
    method=st.sampled_from(["PATCH", "PUT", "GET", "DELETE"]),
    content_range=st.none() | CONTENT_RANGES,
    content_type=st.none() | MEDIA_TYPES,
    query=QUERIES,
    body=st.binary(max_size=64),
    session=st.one_of(st.none(), _PATH_TEXT.map(lambda s: quote(s, safe=""))),
)
@example(
    method="PATCH",
    content_range="9" * 5000 + "-1",
    content_type=None,
    query={},
    body=b"x",
    session=None,
)
def test_upload_sessions_never_fail_the_server(
    server: ServerProcess,
    outside: None,
    method: str,
    content_range: str | None,
    content_type: str | None,
    query: dict[str, str],
    body: bytes,
    session: str | None,
) -> None:
    name = "props/uploads"
    if session is None:  # a real session, so the chunk checks are reached
        status, _ = request(server, "POST", _path(name, "blobs/uploads/"))
        assert status == 202
        connection_path = _location(server, name)
    else:
        connection_path = _path(name, f"blobs/uploads/{session}")
    headers = {}
    if content_range is not None:
        headers["Content-Range"] = content_range
    if content_type is not None:
        headers["Content-Type"] = content_type
    if query:
        connection_path += "?" + urlencode(query)
    status, answer = request(
        server,
        method,
        connection_path,
        body=body if method in ("PATCH", "PUT") else None,
        headers=headers,
    )
    assert_well_formed(method, status, answer)


def _location(server: ServerProcess, name: str) -> str:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", _path(name, "blobs/uploads/"))
        response = connection.getresponse()
        response.read()
        location = response.getheader("Location")
        assert location is not None
        return location
    finally:
        connection.close()


@PROPERTY
@given(name=NAMES, query=QUERIES, catalog=st.booleans(), digest=DIGESTS)
@example(name="a", query={"n": "²"}, catalog=True, digest="sha256:" + "0" * 64)
@example(name="a", query={"n": "9" * 4400}, catalog=True, digest="sha256:" + "0" * 64)
def test_listings_never_fail_the_server(
    server: ServerProcess,
    outside: None,
    name: str,
    query: dict[str, str],
    catalog: bool,
    digest: str,
) -> None:
    if catalog:
        path = "/v2/_catalog" + (f"?{urlencode(query)}" if query else "")
        status, body = request(server, "GET", path)
        assert_well_formed("GET", status, body)
    for suffix in ("tags/list", f"referrers/{digest}"):
        status, body = request(server, "GET", _path(name, suffix, query))
        assert_well_formed("GET", status, body)


@PROPERTY
@given(
    method=st.sampled_from(["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "BREW"]),
    path=_PATH_TEXT.map(lambda s: "/" + quote(s, safe="/?&=")),
    header=st.tuples(
        st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
    ),
)
def test_any_path_and_header_never_fail_the_server(
    server: ServerProcess, outside: None, method: str, path: str, header: tuple[str, str]
) -> None:
    status, body = request(server, method, path, headers={header[0]: header[1]})
    assert status < 500, (status, body[:300])


def test_the_store_rehashes_clean_after_everything(server: ServerProcess, outside: None) -> None:
    """Runs last in this module: what the generated traffic stored is what it claims."""
    blobs = server.data_dir / "docker" / "registry" / "v2" / "blobs"
    checked = 0
    for data in blobs.rglob("data"):
        algorithm, hex_ = data.parent.parent.parent.name, data.parent.name
        assert hashlib.new(algorithm, data.read_bytes()).hexdigest() == hex_, data
        checked += 1
    assert checked >= 1
