"""``server.accel_redirect``: regmirror behind a real nginx running the shipped
deploy/nginx/regmirror-accel.conf. regmirror checks, nginx sends the stored bytes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from regmirror.config import ConfigError, load
from tests.support.api import blob_bytes, sha256
from tests.support.processes import HOST, free_port, poll_ready, run_regmirror

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "regmirror-accel.conf"
LOCATION = "/_regmirror_blobs/"
DATA = blob_bytes(3 * 1024 * 1024 + 17, seed=5)
REPO = "team/app"

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")


@contextlib.contextmanager
def nginx_in_front(work: Path, backend: str, data_dir: Path) -> Iterator[str]:
    """nginx running the shipped snippet, pointed at ``backend`` and ``data_dir``."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    snippet = DEPLOY.read_text()
    snippet = snippet.replace("listen 5080;", f"listen {HOST}:{port};")
    snippet = snippet.replace("listen [::]:5080;", "")
    snippet = snippet.replace("http://127.0.0.1:5000", backend)
    snippet = snippet.replace("/var/lib/regmirror/", f"{data_dir}/")
    (work / "regmirror-accel.conf").write_text(snippet)
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers read our 0700 temp dirs
    temp = "".join(
        f"    {kind}_temp_path {work}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (work / "nginx.conf").write_text(
        f"daemon off;\n{user}worker_processes 1;\npid {work}/nginx.pid;\n"
        f"error_log {work}/error.log warn;\nevents {{}}\n"
        f"http {{\n    access_log off;\n{temp}    include {work}/regmirror-accel.conf;\n}}\n"
    )
    command = ["nginx", "-p", str(work), "-c", str(work / "nginx.conf"), "-e", str(work / "e.log")]
    with open(work / "stderr.log", "ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    url = f"http://{HOST}:{port}"
    try:
        poll_ready(f"{url}/v2/", process, lambda: (work / "error.log").read_text(), 20.0)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def request(
    url: str, method: str = "GET", data: bytes | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def push(base: str, repo: str, data: bytes) -> str:
    digest = sha256(data)
    status, headers, _ = request(f"{base}/v2/{repo}/blobs/uploads/", "POST", b"")
    assert status == 202, status
    location = headers["Location"]
    url = (base + location if location.startswith("/") else location) + (
        ("&" if "?" in location else "?") + f"digest={digest}"
    )
    status, _, body = request(url, "PUT", data, **{"Content-Type": "application/octet-stream"})
    assert status == 201, body
    return digest


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(regmirror's URL, nginx's URL): nginx in front, regmirror redirecting to it."""
    with (
        run_regmirror(
            tmp_path / "regmirror", config={"server": {"accel_redirect": LOCATION}}
        ) as server,
        nginx_in_front(tmp_path / "nginx", server.url, server.data_dir) as front,
    ):
        yield server.url, front


def test_stored_blob_bytes_come_from_nginx_with_regmirrors_headers(stack) -> None:
    backend, front = stack
    digest = push(front, REPO, DATA)
    hexdigest = digest.split(":")[1]

    # regmirror itself answers with the redirect and no body ...
    status, headers, body = request(f"{backend}/v2/{REPO}/blobs/{digest}")
    assert status == 200 and body == b""
    assert headers["X-Accel-Redirect"] == f"{LOCATION}sha256/{hexdigest[:2]}/{hexdigest}/data"

    # ... which nginx turns into the bytes, with the registry's headers.
    status, headers, body = request(f"{front}/v2/{REPO}/blobs/{digest}")
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == hexdigest
    assert headers["Content-Length"] == str(len(DATA))
    assert headers["Docker-Content-Digest"] == digest
    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert headers["ETag"] == f'"{digest}"'
    assert headers["Content-Type"] == "application/octet-stream"
    assert "X-Accel-Redirect" not in headers


def test_range_is_answered_by_nginx(stack) -> None:
    _, front = stack
    digest = push(front, REPO, DATA)

    status, headers, body = request(
        f"{front}/v2/{REPO}/blobs/{digest}", Range="bytes=1048576-2097151"
    )

    assert status == 206
    assert body == DATA[1048576:2097152]
    assert headers["Content-Range"] == f"bytes 1048576-2097151/{len(DATA)}"
    status, _, body = request(f"{front}/v2/{REPO}/blobs/{digest}", Range="bytes=-17")
    assert status == 206 and body == DATA[-17:]
    # An unsatisfiable range is refused by regmirror, in the registry's envelope.
    status, headers, body = request(f"{front}/v2/{REPO}/blobs/{digest}", Range="bytes=999999999-")
    assert status == 416 and b"BLOB_UNKNOWN" in body


def test_an_unlinked_name_is_still_refused_and_the_internal_location_is_closed(stack) -> None:
    backend, front = stack
    digest = push(front, REPO, DATA)
    hexdigest = digest.split(":")[1]

    status, headers, body = request(f"{front}/v2/other/app/blobs/{digest}")
    assert status == 404 and b"BLOB_UNKNOWN" in body
    status, headers, _ = request(f"{backend}/v2/other/app/blobs/{digest}")
    assert status == 404 and "X-Accel-Redirect" not in headers
    # The data directory is not reachable by URL, only through regmirror's redirect.
    status, _, body = request(f"{front}{LOCATION}sha256/{hexdigest[:2]}/{hexdigest}/data")
    assert status == 404 and body != DATA


def test_head_and_manifest_requests_are_regmirrors_own_answers(stack) -> None:
    backend, front = stack
    digest = push(front, REPO, DATA)

    status, headers, body = request(f"{front}/v2/{REPO}/blobs/{digest}", "HEAD")
    assert status == 200 and body == b""
    assert headers["Content-Length"] == str(len(DATA))
    assert headers["Docker-Content-Digest"] == digest
    status, headers, _ = request(f"{backend}/v2/{REPO}/blobs/{digest}", "HEAD")
    assert status == 200 and "X-Accel-Redirect" not in headers


def test_accel_redirect_must_be_a_location_path() -> None:
    assert (
        load(environ={"REGMIRROR_SERVER__ACCEL_REDIRECT": "/_b/"}).server.accel_redirect == "/_b/"
    )
    for bad in ("_b/", "/_b/?x", "http://x/_b/"):
        with pytest.raises(ConfigError, match="accel_redirect"):
            load(environ={"REGMIRROR_SERVER__ACCEL_REDIRECT": bad})
