"""Real server processes for tests: regmirror itself and the CNCF distribution registry.

Both are started on 127.0.0.1 with a free port, waited for by polling ``GET /v2/``
with a bounded deadline, and stopped on teardown with SIGTERM (then SIGKILL after
``STOP_TIMEOUT`` seconds). Each process writes its stderr and stdout to a log file in
its temp directory; a process that dies or never becomes ready raises
:class:`ServerError` carrying the tail of that log, and on teardown the tail is
printed so pytest shows it next to a failing test.

Use them from a test module by importing the fixtures::

    from tests.support.processes import distribution_registry, regmirror_server  # noqa: F401

    def test_something(regmirror_server):
        server = regmirror_server(env={"REGMIRROR_CACHE__MAX_BYTES": "1GiB"})
        urllib.request.urlopen(f"{server.url}/v2/")

or, outside function scope (a module-scoped fixture, a benchmark), the context
managers :func:`run_regmirror` and :func:`run_distribution` directly.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

HOST = "127.0.0.1"
READY_TIMEOUT = 30.0  # seconds from spawn to a 200 on /v2/
STOP_TIMEOUT = 10.0  # seconds from SIGTERM to SIGKILL
DISTRIBUTION_BINARY = "/usr/bin/docker-registry"
REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_TAIL_LINES = 200
_START_ATTEMPTS = 3  # a free port can be taken by another process before we bind it


class ServerError(RuntimeError):
    """A server process that failed to start, died, or would not stop."""


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A running server: where it listens, where it keeps its data, and its process."""

    url: str  # http://127.0.0.1:PORT (https:// with TLS), no trailing slash
    host_port: str  # 127.0.0.1:PORT, as skopeo and docker want it
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path | None = None
    ssl_context: ssl.SSLContext | None = None  # what the readiness poll trusted (TLS)
    stopped: bool = False  # stop() was called: an exit is expected

    @property
    def port(self) -> int:
        return int(self.host_port.rpartition(":")[2])

    def serving_pids(self) -> list[int]:
        """The processes that serve requests: the workers ``regmirror serve`` forked
        (``server.workers``), or the process itself when it serves alone. What a test
        measures of "the server" (memory, open files, limits) is theirs."""
        pid = self.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:  # it exited
            children = []
        return [int(child) for child in children] or [pid]

    def logs(self, lines: int | None = LOG_TAIL_LINES) -> str:
        """The process's combined stdout/stderr (the last ``lines`` lines; all if None)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        if lines is None:
            return text
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; its exit code."""
        self.stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
                raise ServerError(
                    f"{self.url}: did not exit {timeout:.0f}s after SIGTERM; killed\n" + self.logs()
                ) from None
        return int(self.process.returncode)


def wait_ready(
    server: ServerProcess, timeout: float = READY_TIMEOUT, *, ready_status: int = 200
) -> None:
    """Poll ``GET /v2/`` until it answers ``ready_status``; raise with the log if the
    process dies or the deadline passes."""
    poll_ready(
        f"{server.url}/v2/",
        server.process,
        server.logs,
        timeout,
        ready_status,
        ssl_context=server.ssl_context,
    )


def poll_ready(
    url: str,
    process: subprocess.Popen[bytes],
    logs: Callable[[], str],
    timeout: float,
    ready_status: int = 200,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Poll ``url`` until it answers ``ready_status``; ServerError, with ``logs()``, if
    ``process`` dies or ``timeout`` seconds pass first. ``ssl_context``: for https URLs."""
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(
                f"{url}: exited with {process.returncode} before becoming ready\n" + logs()
            )
        try:
            with urllib.request.urlopen(url, timeout=2.0, context=ssl_context) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            status, last_error = None, str(exc)
        if status == ready_status:
            return
        if status is not None:
            last_error = f"HTTP {status}"
        time.sleep(0.05)
    raise ServerError(f"{url}: not ready after {timeout:.0f}s ({last_error})\n" + logs())


def _spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path,
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
        )


@contextlib.contextmanager
def _running(
    make_argv: Callable[[int], tuple[Sequence[str], Path | None]],
    *,
    env: Mapping[str, str],
    work_dir: Path,
    data_dir: Path,
    ready_timeout: float,
    ready_status: int = 200,
    ssl_context: ssl.SSLContext | None = None,
) -> Iterator[ServerProcess]:
    """Spawn on a free port, retrying when the port is taken before the server binds it.
    With ``ssl_context`` the server speaks HTTPS and is polled trusting that context."""
    server: ServerProcess | None = None
    for attempt in range(_START_ATTEMPTS):
        port = free_port()
        argv, config_path = make_argv(port)
        log_path = work_dir / f"server-{port}.log"
        # "{port}" in a value stands for the port this attempt listens on.
        env_now = {k: v.replace("{port}", str(port)) for k, v in env.items()}
        process = _spawn(argv, env=env_now, log_path=log_path, cwd=work_dir)
        server = ServerProcess(
            url=f"{'https' if ssl_context else 'http'}://{HOST}:{port}",
            host_port=f"{HOST}:{port}",
            data_dir=data_dir,
            process=process,
            log_path=log_path,
            config_path=config_path,
            ssl_context=ssl_context,
        )
        try:
            wait_ready(server, ready_timeout, ready_status=ready_status)
            break
        except ServerError:
            server.stop()
            in_use = "address already in use" in server.logs().lower()
            if not in_use or attempt == _START_ATTEMPTS - 1:
                raise
    assert server is not None
    try:
        yield server
    finally:
        died = None if server.stopped else server.process.poll()
        code = server.stop()
        if died is not None:
            # Printed so pytest shows it with the failure; raised so a crash is not missed.
            print(server.logs(), file=sys.stderr)
            raise ServerError(f"{server.url}: exited with {code} during the test")
        print(f"--- {argv[0]} log ({server.log_path}) ---\n{server.logs()}", file=sys.stderr)


def _clean_env(prefix: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    """This process's environment without inherited ``prefix*`` variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    env.update(extra or {})
    return env


def _regmirror_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """The server runs the code of this checkout, whatever checkout pip last installed."""
    env = _clean_env("REGMIRROR_", extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def run_regmirror(
    base_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    data_dir: Path | None = None,
    args: Sequence[str] = (),
    log_level: str = "INFO",
    ready_timeout: float = READY_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
    ready_status: int = 200,
    command_prefix: Sequence[str] = (),
    module: str = "regmirror",
) -> Iterator[ServerProcess]:
    """Run ``python -m regmirror serve`` on a free port of 127.0.0.1.

    - ``base_dir``: an empty directory the server may own (logs, config, data).
    - ``env``: extra environment (``REGMIRROR_S3__BUCKET``, ``AWS_ACCESS_KEY_ID``, ...).
      Inherited ``REGMIRROR_*`` variables are dropped so the host cannot leak settings in.
      ``{port}`` in a value becomes the server's port (``REGMIRROR_FLEET__ADVERTISE_URL``).
    - ``config``: a mapping (written to ``base_dir/regmirror.yml``) or the path of a YAML
      file, passed as ``--config``. ``--listen`` and ``--data-dir`` are always passed and
      win over the file.
    - ``data_dir``: defaults to ``base_dir/data``; pass the same one to a second server
      to test restarts or processes sharing a cache.
    - ``args``: more CLI arguments; ``log_level`` goes to ``--log-level`` (DEBUG shows
      what clients send).
    - ``ssl_context``: the server is configured for TLS (``tls`` in ``config``); its URL
      is ``https://`` and readiness is polled through this client context.
    - ``ready_status``: what ``GET /v2/`` answers once it is up (401 with ``auth``).
    - ``command_prefix``: run under it, e.g. ``["prlimit", "--nofile=1024:1024", "--"]``.
    - ``module``: run as ``python -m MODULE serve``: a wrapper of regmirror's command line
      (``tests.support.crashpoint`` injects faults).
    """
    base_dir.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or base_dir / "data"
    config_path: Path | None = None
    if isinstance(config, Mapping):
        config_path = base_dir / "regmirror.yml"
        config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    elif config is not None:
        config_path = Path(config)

    def argv(port: int) -> tuple[list[str], Path | None]:
        command = [*command_prefix, sys.executable, "-m", module, "serve"]
        if config_path is not None:
            command += ["--config", str(config_path)]
        command += ["--listen", f"{HOST}:{port}", "--data-dir", str(data_dir)]
        command += ["--log-level", log_level, *args]
        return command, config_path

    with _running(
        argv,
        env=_regmirror_env(env),
        work_dir=base_dir,
        data_dir=data_dir,
        ready_timeout=ready_timeout,
        ready_status=ready_status,
        ssl_context=ssl_context,
    ) as server:
        yield server


def distribution_config(
    port: int,
    root: Path,
    *,
    storage: Mapping[str, Any] | None = None,
    proxy_url: str | None = None,
    proxy_username: str | None = None,
    proxy_password: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A registry:2 ``config.yml`` as a mapping (see :func:`run_distribution`)."""
    driver = dict(storage) if storage is not None else {"filesystem": {"rootdirectory": str(root)}}
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            **driver,
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"{HOST}:{port}", "secret": secrets.token_hex(16)},
    }
    if proxy_url is not None:
        config["proxy"] = {"remoteurl": proxy_url}
        if proxy_username is not None:
            config["proxy"].update(username=proxy_username, password=proxy_password or "")
    return _merge(config, extra or {})


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


@contextlib.contextmanager
def run_distribution(
    base_dir: Path,
    *,
    storage: Mapping[str, Any] | None = None,
    proxy_url: str | None = None,
    proxy_username: str | None = None,
    proxy_password: str | None = None,
    extra: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    binary: str = DISTRIBUTION_BINARY,
    ready_timeout: float = READY_TIMEOUT,
    ready_status: int = 200,
) -> Iterator[ServerProcess]:
    """Run the CNCF distribution registry (registry:2) on a free port of 127.0.0.1.

    - ``base_dir``: an empty directory it may own; ``config.yml`` and the log go there,
      and by default the filesystem storage root ``base_dir/storage`` (``.data_dir``).
    - ``storage``: the storage driver section replacing the filesystem one, e.g.
      ``{"s3": {"bucket": "b", "regionendpoint": "http://127.0.0.1:9000",
      "region": "us-east-1", "forcepathstyle": True, "rootdirectory": "/prefix",
      "accesskey": "x", "secretkey": "y"}}``. Deletes stay enabled whatever the driver.
    - ``proxy_url`` (+ ``proxy_username`` / ``proxy_password``): run it as a
      pull-through cache of that registry (``proxy.remoteurl``).
    - ``extra``: deep-merged into the generated config last (``{"log": {"level": "debug"}}``).
    - ``env``: extra environment; inherited ``REGISTRY_*`` variables (which registry:2
      reads as config overrides) are dropped.
    - ``ready_status``: what ``GET /v2/`` answers once it is up (401 with ``auth``).
    - ``module``: run as ``python -m MODULE serve``: a wrapper of regmirror's command line
      (``tests.support.crashpoint`` injects faults).
    """
    if not os.access(binary, os.X_OK):
        pytest.skip(f"{binary} not installed (Debian package docker-registry)")
    base_dir.mkdir(parents=True, exist_ok=True)
    root = base_dir / "storage"
    root.mkdir(exist_ok=True)
    config_path = base_dir / "config.yml"

    def argv(port: int) -> tuple[list[str], Path]:
        config = distribution_config(
            port,
            root,
            storage=storage,
            proxy_url=proxy_url,
            proxy_username=proxy_username,
            proxy_password=proxy_password,
            extra=extra,
        )
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return [binary, "serve", str(config_path)], config_path

    with _running(
        argv,
        env=_clean_env("REGISTRY_", env),
        work_dir=base_dir,
        data_dir=root,
        ready_timeout=ready_timeout,
        ready_status=ready_status,
    ) as server:
        yield server


def _factory(
    run: Callable[..., contextlib.AbstractContextManager[ServerProcess]],
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
) -> Iterator[Callable[..., ServerProcess]]:
    with contextlib.ExitStack() as stack:

        def start(**kwargs: Any) -> ServerProcess:
            base_dir = tmp_path_factory.mktemp(name)
            return stack.enter_context(run(base_dir, **kwargs))

        yield start


@pytest.fixture
def regmirror_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ServerProcess]]:
    """A factory: ``regmirror_server(**kwargs)`` starts a server (keywords of
    :func:`run_regmirror`) in its own temp directory; all are stopped after the test."""
    yield from _factory(run_regmirror, tmp_path_factory, "regmirror")


@pytest.fixture
def distribution_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ServerProcess]]:
    """A factory: ``distribution_registry(**kwargs)`` starts registry:2 (keywords of
    :func:`run_distribution`) in its own temp directory; all are stopped after the test."""
    yield from _factory(run_distribution, tmp_path_factory, "distribution")


def which_or_skip(program: str, package: str | None = None) -> str:
    """The path of ``program``, or skip the test saying which package provides it."""
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} not installed (Debian package {package or program}; tests/run.sh)")
    return path
