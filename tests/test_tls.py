"""HTTPS on the registry port (``tls.cert`` / ``tls.key``), mutual TLS (``tls.client_ca``)
and certificate renewal without a restart, against a real regmirror process with real
clients: skopeo (``--cert-dir``), aiohttp and the standard library's ssl."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from tests.support.certs import Issued, TestCA
from tests.support.oci_layout import build_image, read_layout, write_image_layout
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    HOST,
    REPO_ROOT,
    ServerProcess,
    free_port,
    regmirror_server,
)
from tests.support.skopeo import Skopeo

Start = Callable[..., ServerProcess]
# New connections a test makes when a line must be logged once per process, not per
# connection: more than the workers (one per CPU at most) that take them.
CONNECTIONS = 2 * len(os.sched_getaffinity(0)) + 2


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


def trusting(ca: TestCA, client: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert))
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    return context


def start_tls(
    start: Start, ca: TestCA, server: Issued, client: Issued | None = None, **tls: Any
) -> ServerProcess:
    config = {"tls": {"cert": str(server.cert), "key": str(server.key), **tls}}
    return start(config=config, ssl_context=trusting(ca, client))


@contextlib.contextmanager
def connect(server: ServerProcess, context: ssl.SSLContext) -> Iterator[ssl.SSLSocket]:
    """A TLS connection to ``server``, handshake done."""
    raw = socket.create_connection((HOST, server.port), timeout=10)
    with raw, context.wrap_socket(raw, server_hostname=HOST) as tls:
        yield tls


def served_serial(server: ServerProcess, ca: TestCA) -> int:
    """The serial number of the certificate a new connection is shown."""
    context = trusting(ca)
    with connect(server, context) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def assert_logged_once_per_worker(server: ServerProcess, line: str) -> None:
    """Each serving process watches the files on its own (server.workers) and says so
    once, however many connections it took since: at least one, at most one each."""
    count = server.logs().count(line)
    assert 1 <= count <= len(server.serving_pids()) < CONNECTIONS, server.logs()


def cert_dir(path: Path, ca: TestCA, client: Issued | None = None) -> Path:
    """A docker/containers ``certs.d`` directory: ``ca.crt``, and ``client.cert`` /
    ``client.key`` for mutual TLS."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca.cert, path / "ca.crt")
    if client is not None:
        shutil.copy(client.cert, path / "client.cert")
        shutil.copy(client.key, path / "client.key")
    return path


async def get_status(url: str, context: ssl.SSLContext | bool) -> int:
    async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as response:
        return response.status


# -- HTTPS ------------------------------------------------------------------------------


async def test_https_is_served_with_the_configured_certificate(
    regmirror_server: Start,  # noqa: F811
    ca: TestCA,
) -> None:
    issued = ca.server()
    server = start_tls(regmirror_server, ca, issued)
    assert server.url.startswith("https://")
    assert await get_status(f"{server.url}/v2/", trusting(ca)) == 200
    assert served_serial(server, ca) == issued.serial
    with pytest.raises(aiohttp.ClientError):  # plain HTTP on the HTTPS port
        await get_status(f"http://{server.host_port}/v2/", False)


async def test_tls_before_1_2_is_refused(regmirror_server: Start, ca: TestCA) -> None:  # noqa: F811
    server = start_tls(regmirror_server, ca, ca.server())
    old = trusting(ca)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(aiohttp.ClientError):
        await get_status(f"{server.url}/v2/", old)
    modern = trusting(ca)
    with connect(server, modern) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_skopeo_pushes_and_pulls_over_https_trusting_the_test_ca(
    regmirror_server: Start,  # noqa: F811
    ca: TestCA,
    tmp_path: Path,
) -> None:
    server = start_tls(regmirror_server, ca, ca.server())
    skopeo = Skopeo(tmp_path / "skopeo")
    image = build_image(seed=31, layers=({"etc/a": 100, "usr/b": 70000},))
    source = write_image_layout(tmp_path / "source", image, "v1")
    certs = cert_dir(tmp_path / "certs", ca)
    target = f"docker://{server.host_port}/team/secure:v1"
    skopeo.run("copy", "--dest-cert-dir", str(certs), f"oci:{source.path}:v1", target)
    skopeo.run("copy", "--src-cert-dir", str(certs), target, f"oci:{tmp_path / 'back'}:v1")
    assert read_layout(tmp_path / "back").blobs.keys() >= image.blobs.keys()
    # Verification is on: without the CA skopeo refuses the server.
    refused = skopeo.run("inspect", "--raw", target, check=False)
    assert refused.returncode != 0
    assert "certificate" in refused.stderr


# -- mutual TLS -------------------------------------------------------------------------


async def test_mutual_tls_refuses_a_client_without_a_certificate(
    regmirror_server: Start,  # noqa: F811
    ca: TestCA,
) -> None:
    client = ca.client()
    server = start_tls(regmirror_server, ca, ca.server(), client, client_ca=str(ca.cert))
    assert await get_status(f"{server.url}/v2/", trusting(ca, client)) == 200
    with pytest.raises(aiohttp.ClientError):
        await get_status(f"{server.url}/v2/", trusting(ca))
    # A certificate from another CA is no better than none.
    stranger = TestCA(ca.cert.parent / "other", "stranger").client("stranger")
    with pytest.raises(aiohttp.ClientError):
        await get_status(f"{server.url}/v2/", trusting(ca, stranger))


def test_skopeo_with_a_client_certificate_passes_mutual_tls(
    regmirror_server: Start,  # noqa: F811
    ca: TestCA,
    tmp_path: Path,
) -> None:
    client = ca.client()
    server = start_tls(regmirror_server, ca, ca.server(), client, client_ca=str(ca.cert))
    skopeo = Skopeo(tmp_path / "skopeo")
    image = build_image(seed=32, layers=({"etc/a": 100},))
    source = write_image_layout(tmp_path / "source", image, "v1")
    target = f"docker://{server.host_port}/team/mtls:v1"
    with_cert = cert_dir(tmp_path / "with-cert", ca, client)
    skopeo.run("copy", "--dest-cert-dir", str(with_cert), f"oci:{source.path}:v1", target)
    without = cert_dir(tmp_path / "ca-only", ca)
    refused = skopeo.run("inspect", "--raw", "--cert-dir", str(without), target, check=False)
    assert refused.returncode != 0, refused.stdout
    accepted = skopeo.run("inspect", "--raw", "--cert-dir", str(with_cert), target)
    assert accepted.stdout.encode() == image.manifest.data


# -- renewal ----------------------------------------------------------------------------


def replace(target: Issued, new: Issued) -> None:
    """Install ``new`` over ``target``'s files the way renewal tools do: write, rename."""
    for source, path in ((new.cert, target.cert), (new.key, target.key)):
        staged = path.with_suffix(".new")
        shutil.copy(source, staged)
        staged.replace(path)


def test_a_renewed_certificate_is_served_to_the_next_connection(
    regmirror_server: Start,  # noqa: F811
    ca: TestCA,
) -> None:
    first = ca.server("first")
    server = start_tls(regmirror_server, ca, first)
    assert served_serial(server, ca) == first.serial
    second = ca.server("second")
    replace(first, second)
    assert served_serial(server, ca) == second.serial
    assert "loaded the renewed certificate" in server.logs()


def test_a_half_written_renewal_keeps_the_previous_certificate(
    regmirror_server: Start,  # noqa: F811
    ca: TestCA,
) -> None:
    first = ca.server("first")
    server = start_tls(regmirror_server, ca, first)
    second = ca.server("second")
    shutil.copy(second.cert, first.cert)  # the certificate is new, its key not yet
    for _ in range(CONNECTIONS):
        assert served_serial(server, ca) == first.serial
    assert_logged_once_per_worker(server, "keeping the previous certificate")
    shutil.copy(second.key, first.key)
    assert served_serial(server, ca) == second.serial


def test_a_file_missing_mid_rotation_keeps_the_previous_certificate(
    regmirror_server: Start,  # noqa: F811
    ca: TestCA,
) -> None:
    first = ca.server("first")
    server = start_tls(regmirror_server, ca, first)
    first.key.unlink()  # a renewal tool between its unlink and its rename
    for _ in range(CONNECTIONS):
        assert served_serial(server, ca) == first.serial
    assert_logged_once_per_worker(server, "keeping the previous certificate")
    second = ca.server("second")
    replace(first, second)
    assert served_serial(server, ca) == second.serial


def test_a_renewed_client_ca_applies_to_the_next_connection(
    regmirror_server: Start,  # noqa: F811
    ca: TestCA,
) -> None:
    client = ca.client()
    server = start_tls(regmirror_server, ca, ca.server(), client, client_ca=str(ca.cert))
    other = TestCA(ca.cert.parent / "next", "next")
    newcomer = trusting(ca, other.client("newcomer"))
    assert not first_line(server, newcomer).startswith(b"HTTP/1.1 200")
    staged = ca.cert.with_suffix(".new")
    staged.write_bytes(ca.cert.read_bytes() + other.cert.read_bytes())
    staged.replace(ca.cert)
    assert first_line(server, newcomer).startswith(b"HTTP/1.1 200")
    assert first_line(server, trusting(ca, client)).startswith(b"HTTP/1.1 200")


def first_line(server: ServerProcess, context: ssl.SSLContext) -> bytes:
    """What ``GET /v2/`` on a new connection gets; b"" when the server refuses the client
    (with TLS 1.3 a client learns that only after its handshake, on its first read)."""
    try:
        with connect(server, context) as tls:
            tls.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return tls.recv(100)
    except (ssl.SSLError, ConnectionError):
        return b""


# -- configuration errors ---------------------------------------------------------------


def serve_exits(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``regmirror serve`` with ``env`` (REGMIRROR_TLS__* ...), expected to refuse to start."""
    environ = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), **env}
    argv = [sys.executable, "-m", "regmirror", "serve", "--listen", f"{HOST}:{free_port()}"]
    argv += ["--data-dir", str(tmp_path / "data")]
    return subprocess.run(
        argv, env=environ, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"CERT": "{cert}"}, "tls.key is required"),
        ({"KEY": "{key}"}, "tls.cert is required"),
        ({"CERT": "{cert}", "KEY": "{missing}"}, "No such file"),
        ({"CERT": "{key}", "KEY": "{key}"}, "tls.cert / tls.key"),
        ({"CERT": "{cert}", "KEY": "{other_key}"}, "tls.cert / tls.key"),
        ({"CERT": "{cert}", "KEY": "{key}", "CLIENT_CA": "{missing}"}, "No such file"),
        ({"CERT": "{cert}", "KEY": "{key}", "CLIENT_CA": "{key}"}, "tls.client_ca"),
        ({"CLIENT_CA": "{cert}"}, "tls.client_ca needs tls.cert"),
    ],
)
def test_unusable_tls_settings_stop_startup_with_a_clear_error(
    ca: TestCA, tmp_path: Path, tls: dict[str, str], message: str
) -> None:
    issued, other = ca.server(), ca.server("other")
    names = {
        "cert": issued.cert,
        "key": issued.key,
        "other_key": other.key,
        "missing": tmp_path / "missing.pem",
    }
    env = {f"REGMIRROR_TLS__{k}": v.format(**names) for k, v in tls.items()}
    result = serve_exits(tmp_path, env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
