"""A real S3 for tests: a ``moto_server`` process on 127.0.0.1.

Use it from a test module by importing the fixture::

    from tests.support.s3 import moto_s3  # noqa: F401

    def test_something(moto_s3):
        bucket = moto_s3.new_bucket()
        ...S3Settings(bucket=bucket, endpoint_url=moto_s3.endpoint_url, path_style=True)

The fixture is module-scoped: one server per test module, one bucket created up front
(``moto_s3.bucket``); :meth:`MotoS3.new_bucket` gives a test a bucket of its own. The
AWS variables are set to dummy values for the module (and the credential files, the
instance metadata service and proxies are kept out), so the standard AWS credential
chain finds them and nothing leaves 127.0.0.1.

Outages, two ways, with different trade-offs:

- :meth:`MotoS3.pause` / :meth:`MotoS3.resume` (SIGSTOP / SIGCONT): the data survives,
  but the kernel still accepts connections on the listening socket, so clients connect
  and then wait: this is the *hung* S3 case, bounded by the client's read timeout.
- :meth:`MotoS3.stop` / :meth:`MotoS3.start` (kill, then a new process on the same
  port): connections are refused at once, the *down* S3 case; moto keeps its state in
  memory, so a restart comes back empty (the bucket is created again, its objects are
  gone). Use it last in a test, or put back what the test needs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.support.processes import HOST, ServerError, free_port, poll_ready

REGION = "us-east-1"
READY_TIMEOUT = 20.0  # seconds from spawn to a first answer
STOP_TIMEOUT = 5.0
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
# AWS_CA_BUNDLE: registry:2.8's s3 driver (aws-sdk-go) panics at startup when it is set
# ("LoadCustomCABundleError: ... HTTPClient's transport unsupported type"); moto is
# plain HTTP, so no bundle is needed by anyone here.
UNSET_ENV = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
)


class MotoError(RuntimeError):
    """moto_server failed to start, died, or would not answer."""


@dataclass
class MotoS3:
    """A running moto S3 server: where it listens, its first bucket, its process."""

    port: int
    log_path: Path
    bucket: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client(self) -> Any:
        """A plain boto3 S3 client on this server (path-style), to look at raw keys."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def new_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str | None = None) -> list[str]:
        """Every object key in ``bucket`` (the first bucket by default), sorted."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket or self.bucket)
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))

    def start(self) -> None:
        """Start moto_server on ``port`` (again, after :meth:`stop`: empty but for ``bucket``)."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*moto_command(), "-H", HOST, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()
        if self.bucket:
            with contextlib.suppress(self.client().exceptions.BucketAlreadyOwnedByYou):
                self.client().create_bucket(Bucket=self.bucket)

    def stop(self) -> None:
        """Kill the server: connections to the port are refused until :meth:`start`."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused process cannot exit
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        self.process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it accepts connections but never answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def logs(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-100:])
        except FileNotFoundError:
            return ""

    def _wait_ready(self) -> None:
        assert self.process is not None
        try:
            poll_ready(f"{self.endpoint_url}/", self.process, self.logs, READY_TIMEOUT)
        except ServerError as exc:
            self.stop()
            raise MotoError(f"moto_server: {exc}") from exc


def moto_command() -> list[str]:
    script = shutil.which("moto_server")
    return [script] if script else [sys.executable, "-m", "moto.server"]


@contextlib.contextmanager
def run_moto(work_dir: Path) -> Iterator[MotoS3]:
    """A moto S3 server on a free port with one bucket, the AWS variables set to dummies."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in DUMMY_ENV.items():
            patch.setenv(name, value)
        for name in UNSET_ENV:
            patch.delenv(name, raising=False)
        server = MotoS3(port=free_port(), log_path=work_dir / "moto.log")
        server.start()
        try:
            server.bucket = server.new_bucket("regmirror")
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """A moto S3 server for the module: ``.endpoint_url``, ``.bucket``, ``.new_bucket()``,
    ``.keys()``, ``.pause()`` / ``.resume()``, ``.stop()`` / ``.start()``."""
    with run_moto(tmp_path_factory.mktemp("moto")) as server:
        yield server
