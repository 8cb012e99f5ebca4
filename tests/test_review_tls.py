"""Review attack on mutual TLS: a client CA taken out of ``tls.client_ca`` must not keep
letting in the clients it vouched for.

TLS session resumption skips the client certificate: a resumed session is trusted as
it was when it began. Contexts renewed from the files are switched in per connection,
but resumption is decided against the context the server started with (OpenSSL keeps a
connection's session cache and ticket keys with its first context), so sessions begun
under a revoked CA resumed after the rotation, with no certificate at all.
"""

from __future__ import annotations

import shutil
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.certs import TestCA
from tests.support.processes import HOST, ServerProcess, regmirror_server  # noqa: F401

Start = Callable[..., ServerProcess]


def get(
    server: ServerProcess, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """``GET /v2/`` on a new connection: (first line or b"", the session, reused?)."""
    raw = socket.create_connection((HOST, server.port), timeout=10)
    try:
        with context.wrap_socket(raw, server_hostname=HOST, session=session) as tls:
            tls.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            line = tls.recv(100)
            return line, tls.session, tls.session_reused
    except (ssl.SSLError, ConnectionError):
        return b"", None, False
    finally:
        raw.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_sessions_of_a_revoked_client_ca_do_not_resume(
    regmirror_server: Start,  # noqa: F811
    tmp_path: Path,
    version: ssl.TLSVersion,
) -> None:
    ca = TestCA(tmp_path / "pki")
    revoked = TestCA(tmp_path / "revoked", "revoked")
    client_ca = tmp_path / "client-ca.pem"
    shutil.copy(revoked.cert, client_ca)
    server_cert = ca.server()
    pulls = ssl.create_default_context(cafile=str(ca.cert))
    host = revoked.client("host")
    pulls.load_cert_chain(host.cert, host.key)
    pulls.minimum_version = pulls.maximum_version = version
    config = {
        "tls": {
            "cert": str(server_cert.cert),
            "key": str(server_cert.key),
            "client_ca": str(client_ca),
        }
    }
    server = regmirror_server(config=config, ssl_context=pulls)

    line, session, _ = get(server, pulls)
    assert line.startswith(b"HTTP/1.1 200"), line
    line, session2, _ = get(server, pulls, session)  # resumed on main; a full handshake now
    assert line.startswith(b"HTTP/1.1 200"), line

    # The operator revokes that CA: only another one's clients may come in now.
    staged = client_ca.with_suffix(".new")
    shutil.copy(ca.cert, staged)
    staged.replace(client_ca)
    assert not get(server, pulls)[0].startswith(b"HTTP/1.1 200")  # a full handshake fails

    # A resumed session shows no certificate: it must not stand in for one.
    line, _, reused = get(server, pulls, session2 or session)
    assert not line.startswith(b"HTTP/1.1 200"), f"resumed={reused}: {line!r}"
