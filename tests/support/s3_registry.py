"""regmirror and registry:2 on one moto bucket, and what tests need to compare them.

- :func:`regmirror_env` / :func:`registry2_storage`: the settings that put regmirror
  (``REGMIRROR_S3__*``) and registry:2 (its ``s3`` storage driver) on the same bucket
  under the same ``rootdirectory``, so each reads what the other wrote.
- :func:`pull_layout`: skopeo pulls a reference into an OCI layout and the test gets
  every blob back by digest, to compare byte for byte.
- :func:`request` / :func:`push_blob` / :func:`put_manifest`: the registry HTTP API by
  hand, where a test needs to see the status of one step (a 201, a 503).
- :func:`bucket_problems`: what in a bucket would be half-written: blob data whose
  bytes do not hash to its name, links that do not hold a digest, and tag or revision
  links pointing at a manifest the bucket does not hold.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.support.oci_layout import read_layout, sha256
from tests.support.processes import ServerProcess
from tests.support.s3 import REGION, MotoS3

PREFIX = "shared/registry"  # registry:2's rootdirectory, regmirror's s3.prefix
HTTP_TIMEOUT = 60.0  # seconds; outage assertions bound their own waits more tightly
BLOBS = "docker/registry/v2/blobs/"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
T = TypeVar("T")


def regmirror_env(moto: MotoS3, bucket: str, **s3: str) -> dict[str, str]:
    """regmirror's environment for ``bucket`` under :data:`PREFIX` (``s3`` adds keys:
    ``tag_ttl="1"`` becomes ``REGMIRROR_S3__TAG_TTL=1``)."""
    env = {
        "REGMIRROR_S3__BUCKET": bucket,
        "REGMIRROR_S3__ENDPOINT_URL": moto.endpoint_url,
        "REGMIRROR_S3__PATH_STYLE": "true",
        "REGMIRROR_S3__PREFIX": PREFIX,
        "REGMIRROR_S3__REGION": REGION,
    }
    env.update({f"REGMIRROR_S3__{key.upper()}": value for key, value in s3.items()})
    return env


def registry2_storage(moto: MotoS3, bucket: str, prefix: str = PREFIX) -> dict[str, Any]:
    """registry:2's ``storage`` section for ``bucket`` under ``prefix``."""
    return {
        "s3": {
            "accesskey": "testing",
            "secretkey": "testing",
            "region": REGION,
            "regionendpoint": moto.endpoint_url,
            "bucket": bucket,
            "secure": False,
            "v4auth": True,
            "rootdirectory": f"/{prefix}",
        }
    }


def pull_layout(skopeo: Any, source: str, out: Path, *flags: str) -> tuple[str, dict[str, bytes]]:
    """``skopeo copy source oci:out:pulled``: the digest of what was pulled, and every
    blob of the layout by digest (manifests included), each checked against its digest."""
    skopeo.copy(source, f"oci:{out}:pulled", "--preserve-digests", *flags)
    layout = read_layout(out)
    return layout.ref("pulled")["digest"], layout.blobs


def request(
    method: str,
    url: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def timed(call: Callable[[], T]) -> tuple[T, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def start_upload(server: ServerProcess, repo: str) -> str:
    status, headers, body = request("POST", f"{server.url}/v2/{repo}/blobs/uploads/")
    assert status == 202, body
    location = headers["Location"]
    return server.url + location if location.startswith("/") else location


def finish_upload(
    location: str, data: bytes, digest: str | None = None, timeout: float = HTTP_TIMEOUT
) -> tuple[int, dict[str, str], bytes]:
    """PUT the last chunk ``data`` (all of it by default) with ``?digest=``."""
    separator = "&" if "?" in location else "?"
    return request(
        "PUT",
        f"{location}{separator}digest={digest or sha256(data)}",
        data,
        {"Content-Type": "application/octet-stream"},
        timeout,
    )


def push_blob(server: ServerProcess, repo: str, data: bytes) -> None:
    status, _, body = finish_upload(start_upload(server, repo), data)
    assert status == 201, body


def put_manifest(
    server: ServerProcess, repo: str, reference: str, raw: bytes, timeout: float = HTTP_TIMEOUT
) -> tuple[int, dict[str, str], bytes]:
    media_type = json.loads(raw)["mediaType"]
    return request(
        "PUT",
        f"{server.url}/v2/{repo}/manifests/{reference}",
        raw,
        {"Content-Type": media_type},
        timeout,
    )


def error_codes(body: bytes) -> list[str]:
    """The spec's error codes in an error envelope."""
    return [entry["code"] for entry in json.loads(body)["errors"]]


def bucket_problems(moto: MotoS3, bucket: str) -> list[str]:
    """Everything half-written under :data:`PREFIX` in ``bucket`` (empty when whole)."""
    client = moto.client()
    root = f"{PREFIX}/"
    keys = set(moto.keys(bucket))
    problems = []

    def read(key: str) -> bytes:
        return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def blob_key(digest: str) -> str:
        hex_digest = digest.split(":", 1)[1]
        return f"{root}{BLOBS}sha256/{hex_digest[:2]}/{hex_digest}/data"

    for key in sorted(keys):
        if key.startswith(root + BLOBS) and key.endswith("/data"):
            digest = "sha256:" + key.split("/")[-2]
            if "sha256:" + hashlib.sha256(read(key)).hexdigest() != digest:
                problems.append(f"{key}: content does not match its digest")
        elif key.endswith("/link"):
            link = read(key).decode(errors="replace").strip()
            if not _DIGEST.match(link):
                problems.append(f"{key}: holds {link[:80]!r}, not a digest")
            elif blob_key(link) not in keys:
                problems.append(f"{key}: points at {link}, which the bucket does not hold")
    return problems
