"""Property-based attacks on access control, against a running ``regmirror serve``.

The server has htpasswd auth, trusts X-Forwarded-For from 127.0.0.1 only (every test
request comes from there: it is the "proxy") and lets 10.0.0.0/8 pull anonymously; one
upstream (down) serves the ``up/`` prefix. Generated: methods, paths (names, routes,
encoded slashes, dot segments, the catalog), queries (``mount``/``from``/``ns``/``digest``),
``Authorization`` values (Basic of arbitrary bytes, Bearer garbage, other schemes, the
real user with wrong passwords) and ``X-Forwarded-For`` chains. Properties:

- a request without valid credentials whose client (the rightmost hop) is not in
  10.0.0.0/8 never reaches a handler: 401 with the Basic challenge, or 400
  NAME_INVALID for a name no repository can have; never a 2xx, never a 5xx;
- from 10.0.0.0/8 without credentials, nothing but a read succeeds;
- whatever the input, no 500 and every error is the JSON envelope (503 is allowed for
  the upstream that is down);
- no secret (the password, an Authorization value) is in the server's log.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.auth import bcrypt_hash
from tests.support.processes import ServerProcess, free_port, run_regmirror
from tests.test_properties import DIGESTS, NAMES, PROPERTY, REFERENCES, REQUEST_LINE_LIMIT

USER, PASSWORD = "ci", "review-Pa55:with:colons"
GOOD = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
ANONYMOUS_NETWORK = ipaddress.ip_network("10.0.0.0/8")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("review-auth-properties")
    htpasswd = base / "htpasswd"
    htpasswd.write_text(f"{USER}:{bcrypt_hash(PASSWORD)}\n")
    config = {
        "auth": {
            "htpasswd": str(htpasswd),
            "anonymous_pull": ["10.0.0.0/8"],
            "trusted_proxies": ["127.0.0.1/32"],
        },
        "upstreams": [{"url": f"http://127.0.0.1:{free_port()}", "prefix": "up"}],
    }
    with run_regmirror(base, config=config, log_level="DEBUG", ready_status=401) as process:
        yield process
    log = Path(process.log_path).read_text(errors="replace")
    for leaked in (PASSWORD, GOOD.removeprefix("Basic ")):
        assert leaked not in log, f"{leaked!r} in the server log"


def request(
    server: ServerProcess, method: str, path: str, headers: dict[str, str], body: bytes | None
) -> tuple[int, dict[str, str], bytes]:
    path = path[: REQUEST_LINE_LIMIT - len(method) - 10]
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for key, value in headers.items():
            connection.putheader(key, value.encode("latin-1"))
        connection.putheader("Content-Length", str(len(body or b"")))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def client_of(forwarded: list[str]) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Who the server must take the client to be: the peer 127.0.0.1 is the only trusted
    proxy, so the rightmost hop that is not 127.0.0.1 (None when it is not an address)."""
    hops = [h.strip() for value in forwarded for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        if hop.startswith("[") and "]" in hop:  # [v6]:port, as the server reads it
            hop = hop[1 : hop.index("]")]
        elif hop.count(":") == 1:  # v4:port
            hop = hop.split(":", 1)[0]
        try:
            address = ipaddress.ip_address(hop.split("%", 1)[0])
        except ValueError:
            return None  # not an address: nobody may pull anonymously
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address != ipaddress.ip_address("127.0.0.1"):
            return address
    return ipaddress.ip_address("127.0.0.1")


_LATIN1 = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=40,
)
AUTHORIZATIONS = st.one_of(
    st.none(),
    st.just(GOOD),
    st.binary(max_size=40).map(lambda b: "Basic " + base64.b64encode(b).decode()),
    st.text(max_size=20).map(
        lambda p: "Basic " + base64.b64encode(f"{USER}:{p}".encode()).decode()
    ),
    st.sampled_from(["Basic", "Basic ", "basic ====", "Bearer", "Bearer a.b.c", "Negotiate x"]),
    _LATIN1,
)
HOPS = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(["10.1.2.3", "::ffff:10.0.0.1", "127.0.0.1", "garbage", "", "[::1]:80"]),
    _LATIN1.filter(lambda s: "," not in s),
)
FORWARDED = st.lists(st.lists(HOPS, max_size=4).map(", ".join), max_size=2)
ROUTES = st.sampled_from(
    [
        "manifests/{reference}",
        "blobs/{digest}",
        "blobs/uploads/",
        "blobs/uploads/{session}",
        "tags/list",
        "referrers/{digest}",
    ]
)
QUERIES = st.dictionaries(
    st.sampled_from(["mount", "from", "ns", "digest", "n", "last"]),
    st.one_of(NAMES, DIGESTS, st.sampled_from(["ghcr.io", "docker.io", "up/x"])),
    max_size=3,
)


@PROPERTY
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    name=st.one_of(NAMES, NAMES.map(lambda n: "up/" + n), st.just("_catalog")),
    route=ROUTES,
    reference=REFERENCES,
    digest=DIGESTS,
    session=st.text(max_size=12).map(lambda s: quote(s, safe="")),
    query=QUERIES,
    authorization=AUTHORIZATIONS,
    forwarded=FORWARDED,
    encode_slashes=st.booleans(),
    catalog=st.booleans(),
)
@example(
    method="POST",
    name="team/app",
    route="blobs/uploads/",
    reference="latest",
    digest="sha256:" + "0" * 64,
    session="",
    query={"mount": "sha256:" + "0" * 64, "from": "team/app"},
    authorization=None,
    forwarded=["127.0.0.1, 10.0.0.5"],
    encode_slashes=False,
    catalog=False,
)
@example(
    method="GET",
    name="team/app",
    route="tags/list",
    reference="latest",
    digest="sha256:" + "0" * 64,
    session="",
    query={},
    authorization=None,
    forwarded=["10.0.0.5, 192.0.2.1"],  # a client claiming to come via 10.0.0.5
    encode_slashes=False,
    catalog=True,
)
def test_access_is_decided_before_any_handler_and_never_fails_the_server(
    server: ServerProcess,
    method: str,
    name: str,
    route: str,
    reference: str,
    digest: str,
    session: str,
    query: dict[str, str],
    authorization: str | None,
    forwarded: list[str],
    encode_slashes: bool,
    catalog: bool,
) -> None:
    if catalog:
        path = "/v2/_catalog"
    else:
        if encode_slashes:
            name = name.replace("/", "%2F")
        suffix = route.format(reference=reference, digest=digest, session=session or "x")
        path = f"/v2/{name}/{suffix}"
    if query:
        path += "?" + urlencode(query)
    headers = {"X-Forwarded-For": forwarded[-1]} if forwarded else {}
    if authorization is not None:
        headers["Authorization"] = authorization
    body = b"x" if method in ("PUT", "PATCH", "POST") else None
    status, answer_headers, answer = request(server, method, path, headers, body)

    assert status != 500 and status < 600, (status, answer[:300])
    if status >= 400 and method != "HEAD":
        errors = json.loads(answer)["errors"]
        assert errors and all("code" in e and "message" in e for e in errors), answer
    if authorization == GOOD:
        return
    client = client_of(forwarded[-1:])
    anonymous = client is not None and client in ANONYMOUS_NETWORK
    if anonymous:
        # May pull: a read gets whatever the handler says (well formed); anything else
        # is refused (401), or a method no route has (405): never a success.
        if method not in ("GET", "HEAD") or catalog:
            assert status >= 400, (method, path, headers, status, answer[:300])
        return
    assert status in (400, 401), (method, path, headers, status, answer[:300])
    if status == 401:
        assert answer_headers.get("WWW-Authenticate", "").startswith("Basic realm="), answer_headers
    elif method != "HEAD":
        assert json.loads(answer)["errors"][0]["code"] == "NAME_INVALID", answer
