"""Real container engines for tests: a Docker engine (``dockerd``) and containerd, each
with its own root, state and socket, started and stopped by the test; and podman
(daemonless, :class:`Podman` / the ``podman`` fixture), with its own store and config.

Each engine runs in a private mount namespace (``unshare -m``) in which

- ``/etc/hosts`` maps ``registry-1.docker.io`` (and the rest of Docker Hub's names) to
  127.0.0.1, so an engine's fallback to the real registry stays on this machine and
  fails fast instead of reaching the internet;
- ``/etc/docker`` is a temp directory: ``certs.d/<host:port>/`` (``ca.crt``,
  ``client.cert``, ``client.key``) is the test's, and nothing is written to the host's
  (dockerd writes ``/etc/docker/key.json``); ``/opt`` and ``/run`` are empty tmpfs
  (containerd creates ``/opt/containerd``, dockerd ``/run/docker``).

Docker treats every registry on 127.0.0.0/8 as insecure: it skips certificate checks
there and never reads ``certs.d``. To test TLS as a remote host sees it, a test names the
registry by a host name that the namespace's /etc/hosts maps to ``::1`` (``extra_hosts``)
and :func:`loopback6_forwarder` relays ``[::1]:PORT`` to regmirror on 127.0.0.1 byte for
byte, TLS included.

``dockerd`` runs with ``--iptables=false --ip6tables=false --bridge=none
--storage-driver=vfs`` (no network setup, no overlay mounts); it starts its own
containerd under its exec root. The standalone containerd has the CRI plugin disabled;
``ctr images pull --hosts-dir`` reads ``hosts.toml`` files the way the CRI does from
``config_path``.

Usage::

    from tests.support.engines import docker_engine, containerd_engine  # noqa: F401

    def test_pull(docker_engine, regmirror_server):
        docker = docker_engine()                     # or docker_engine(daemon_json={...})
        docker.run("pull", f"{server.host_port}/team/app:v1")

    def test_podman(podman, regmirror_server):       # from tests.support.engines import podman
        podman.registries_conf.write_text(...)       # CONTAINERS_REGISTRIES_CONF
        podman.run("pull", "--tls-verify=false", f"{server.host_port}/team/app:v1")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import HOST, REPO_ROOT

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
COMMAND_TIMEOUT = 180.0
DOCKER_HUB_NAMES = ("registry-1.docker.io", "index.docker.io", "auth.docker.io", "docker.io")
SHIPPED_DAEMON_JSON = REPO_ROOT / "deploy" / "docker" / "daemon.json"
SHIPPED_HOSTS_TOML = REPO_ROOT / "deploy" / "containerd" / "docker.io" / "hosts.toml"
SHIPPED_MIRROR = "localhost:5000"  # the address the shipped snippets point at
TMPFS = ("/opt", "/run")  # containerd creates /opt/containerd, dockerd /run/docker/plugins


class EngineError(RuntimeError):
    """An engine that would not start, or a command that failed."""


def shipped_daemon_json(mirror: str) -> dict[str, Any]:
    """deploy/docker/daemon.json with ``localhost:5000`` replaced by ``mirror`` (host:port)."""
    text = SHIPPED_DAEMON_JSON.read_text().replace(SHIPPED_MIRROR, mirror)
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def shipped_hosts_toml(mirror: str) -> str:
    """deploy/containerd/docker.io/hosts.toml pointing at ``mirror`` (host:port)."""
    return SHIPPED_HOSTS_TOML.read_text().replace(SHIPPED_MIRROR, mirror)


def _missing(*programs: str) -> str | None:
    for program in programs:
        if shutil.which(program) is None:
            return program
    return None


def _run_client(
    argv: list[str],
    shown: list[str],
    *,
    env: dict[str, str],
    check: bool,
    timeout: float,
    input: str | None,
    context: Callable[[], str] = lambda: "",
) -> subprocess.CompletedProcess[str]:
    """Run an engine's client (``shown``: the command as the failure names it); with
    ``check``, a non-zero exit fails the test with its output and ``context()``."""
    result = subprocess.run(
        argv,
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        input=input if input is not None else "",
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(shown)} exited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n"
            f"stderr:\n{result.stderr[-4000:]}{context()}"
        )
    return result


@dataclass
class _Namespace:
    """The files the private mount namespace binds over /etc/hosts and /etc/docker (and,
    for podman, over /etc/containers and /var/lib/containers), and the tmpfs it mounts."""

    hosts: Path
    etc_docker: Path
    binds: tuple[tuple[Path, str], ...] = ()  # (directory, mount point): more bind mounts
    tmpfs: tuple[str, ...] = TMPFS

    @classmethod
    def create(
        cls,
        base: Path,
        extra_hosts: Mapping[str, str],
        *,
        binds: Sequence[tuple[Path, str]] = (),
        tmpfs: Sequence[str] = TMPFS,
    ) -> _Namespace:
        hosts = base / "hosts"
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        lines += [f"127.0.0.1 {name}" for name in DOCKER_HUB_NAMES]
        lines += [f"{address} {name}" for name, address in extra_hosts.items()]
        hosts.write_text("\n".join(lines) + "\n")
        etc_docker = base / "etc-docker"
        (etc_docker / "certs.d").mkdir(parents=True, exist_ok=True)
        return cls(hosts, etc_docker, tuple(binds), tuple(tmpfs))

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` in a new private mount namespace: ``sh -c`` binds the directories
        (its ``$0``, ``$1``, ...) over their mount points, mounts the tmpfs, then execs."""
        # Every mount point must exist: /etc/docker (docker-registry and docker.io create
        # it), /etc/containers (skopeo, podman), /var/lib/containers (the podman fixture).
        binds = [(self.hosts, "/etc/hosts"), (self.etc_docker, "/etc/docker"), *self.binds]
        steps = [f'mount --bind "${{{i}}}" {target}' for i, (_, target) in enumerate(binds)]
        steps += [f"mount -t tmpfs tmpfs {target}" for target in self.tmpfs]
        steps += [f"shift {len(binds) - 1}", 'exec "$@"']
        shell = ["sh", "-c", " && ".join(steps), *(str(source) for source, _ in binds)]
        return ["unshare", "--mount", "--propagation", "private", *shell, *command]

    def certs_d(self, host_port: str) -> Path:
        """``/etc/docker/certs.d/<host:port>`` as the engine sees it."""
        path = self.etc_docker / "certs.d" / host_port
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class Engine:
    """A running engine process, its log, and the environment its client runs with."""

    name: str
    base: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    namespace: _Namespace
    client_env: dict[str, str] = field(default_factory=dict)

    def logs(self, lines: int = 200) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def certs_d(self, host_port: str) -> Path:
        return self.namespace.certs_d(host_port)

    def _run(
        self, argv: list[str], check: bool, timeout: float, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return _run_client(
            argv,
            argv,
            env=self.client_env,
            check=check,
            timeout=timeout,
            input=input,
            context=lambda: f"\n--- {self.name} log ---\n{self.logs(60)}",
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)


@dataclass
class Docker(Engine):
    socket: Path = Path()

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``docker -H unix://<socket> ARGS`` with this test's client config directory
        (``DOCKER_CONFIG``: what ``docker login`` stores); ``input`` goes to its stdin."""
        argv = ["docker", "-H", f"unix://{self.socket}", *args]
        return self._run(argv, check, timeout, input)


@dataclass
class Containerd(Engine):
    socket: Path = Path()
    hosts_dir: Path = Path()

    def ctr(
        self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """``ctr --address <socket> --namespace regmirror-test ARGS``, inside the private
        namespace (ctr itself resolves and fetches; containerd stores)."""
        argv = ["ctr", "--address", str(self.socket), "--namespace", "regmirror-test", *args]
        return self._run(self.namespace.argv(argv), check, timeout)

    def hosts_toml(self, registry: str, text: str) -> Path:
        """Write ``<hosts_dir>/<registry>/hosts.toml`` (``registry``: docker.io, host:port)."""
        directory = self.hosts_dir / registry
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "hosts.toml"
        path.write_text(text)
        return path


def _wait(engine: Engine, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if engine.process.poll() is not None:
            raise EngineError(
                f"{engine.name} exited with {engine.process.returncode}\n{engine.logs()}"
            )
        if ready():
            return
        time.sleep(0.1)
    raise EngineError(f"{engine.name} not ready after {READY_TIMEOUT:.0f}s\n{engine.logs()}")


@contextlib.contextmanager
def _serving(engine: Engine, ready: Callable[[], bool]) -> Iterator[None]:
    """Until ``ready()``, then the caller's block; the engine is stopped after it and its
    log's tail printed (pytest shows it with a failure)."""
    try:
        _wait(engine, ready)
        yield
    finally:
        engine.stop()
        print(f"--- {engine.name} log ({engine.log_path}) ---\n{engine.logs(80)}", file=sys.stderr)


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=log_path.parent,
        )


def _preflight(*programs: str) -> None:
    missing = _missing("unshare", *programs)
    if missing is not None:
        pytest.skip(
            f"{missing} not installed (Debian packages docker.io containerd podman; tests/run.sh)"
        )
    if os.geteuid() != 0:
        pytest.skip("container engines need root here (dockerd, containerd, unshare --mount)")
    if not Path("/etc/docker").is_dir():
        pytest.skip("/etc/docker is missing: it is the mount point for the test's certs.d")


@contextlib.contextmanager
def run_dockerd(
    base: Path,
    *,
    daemon_json: Mapping[str, Any] | None = None,
    extra_hosts: Mapping[str, str] | None = None,
) -> Iterator[Docker]:
    """``dockerd`` with its own data root, exec root, socket and pid file in ``base``.
    ``daemon_json``: its ``--config-file`` (e.g. :func:`shipped_daemon_json`)."""
    _preflight("dockerd", "docker")
    base.mkdir(parents=True, exist_ok=True)
    namespace = _Namespace.create(base, extra_hosts or {})
    config = base / "daemon.json"
    config.write_text(json.dumps(dict(daemon_json or {}), indent=2))
    socket = base / "docker.sock"
    client_config = base / "client"
    client_config.mkdir(exist_ok=True)
    argv = [
        "dockerd",
        "--config-file", str(config),
        "--data-root", str(base / "data"),
        "--exec-root", str(base / "exec"),
        "--host", f"unix://{socket}",
        "--pidfile", str(base / "docker.pid"),
        "--iptables=false", "--ip6tables=false", "--bridge=none",
        "--storage-driver=vfs",
    ]  # fmt: skip
    log_path = base / "dockerd.log"
    engine = Docker(
        name="dockerd",
        base=base,
        process=_spawn(namespace.argv(argv), log_path),
        log_path=log_path,
        namespace=namespace,
        client_env={**os.environ, "DOCKER_CONFIG": str(client_config)},
        socket=socket,
    )
    with _serving(engine, lambda: engine.run("version", check=False, timeout=10).returncode == 0):
        yield engine


@contextlib.contextmanager
def run_containerd(base: Path) -> Iterator[Containerd]:
    """A standalone containerd (CRI disabled) with its own root, state and socket, and an
    empty ``hosts_dir`` for ``ctr images pull --hosts-dir``."""
    _preflight("containerd", "ctr")
    base.mkdir(parents=True, exist_ok=True)
    namespace = _Namespace.create(base, {})
    state = base / "state"
    socket = state / "containerd.sock"
    hosts_dir = base / "certs.d"
    hosts_dir.mkdir(exist_ok=True)
    config = base / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{base / "root"}"\n'
        f'state = "{state}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{socket}"\n'
        f'[ttrpc]\n  address = "{state / "containerd.sock.ttrpc"}"\n'
    )
    log_path = base / "containerd.log"
    engine = Containerd(
        name="containerd",
        base=base,
        process=_spawn(namespace.argv(["containerd", "--config", str(config)]), log_path),
        log_path=log_path,
        namespace=namespace,
        client_env=dict(os.environ),
        socket=socket,
        hosts_dir=hosts_dir,
    )
    with _serving(engine, lambda: engine.ctr("version", check=False, timeout=10).returncode == 0):
        yield engine


def _factory(
    run: Callable[..., contextlib.AbstractContextManager[Any]],
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
) -> Iterator[Callable[..., Any]]:
    with contextlib.ExitStack() as stack:

        def start(**kwargs: Any) -> Any:
            try:
                return stack.enter_context(run(tmp_path_factory.mktemp(name), **kwargs))
            except EngineError as exc:
                if "operation not permitted" in str(exc).lower():
                    pytest.skip(f"{name} cannot run here: {str(exc).splitlines()[0]}")
                raise

        yield start


@pytest.fixture
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Docker]]:
    """A factory: ``docker_engine(daemon_json=..., extra_hosts=...)`` starts a dockerd
    (keywords of :func:`run_dockerd`); all are stopped after the test."""
    yield from _factory(run_dockerd, tmp_path_factory, "dockerd")


@pytest.fixture
def containerd_engine(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Containerd]]:
    """A factory: ``containerd_engine()`` starts a containerd; stopped after the test."""
    yield from _factory(run_containerd, tmp_path_factory, "containerd")


# -- podman ---------------------------------------------------------------------------

PODMAN_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


@dataclass
class Podman:
    """Rootful podman isolated from the host: its own image store (``--root``,
    ``--runroot``, vfs), containers.conf, storage.conf, ``registries.conf``, auth file
    and XDG directories, run in the private mount namespace (Docker Hub's names on
    127.0.0.1, and /etc/containers, /var/lib/containers and /dev/shm private: podman's
    policy, blob-info cache and lock segment stay in ``base``). Daemonless: nothing to
    start; it only pulls, pushes and logs in (no container is ever run)."""

    base: Path
    namespace: _Namespace
    env: dict[str, str]
    registries_conf: Path  # CONTAINERS_REGISTRIES_CONF
    auth_file: Path  # REGISTRY_AUTH_FILE: what ``podman login`` writes

    @classmethod
    def create(cls, base: Path) -> Podman:
        base.mkdir(parents=True, exist_ok=True)
        etc_containers = base / "etc-containers"
        etc_containers.mkdir()
        (etc_containers / "policy.json").write_text(json.dumps(PODMAN_POLICY))
        (etc_containers / "registries.conf").write_text("")
        var_lib = base / "var-lib-containers"
        var_lib.mkdir()
        namespace = _Namespace.create(
            base,
            {},
            binds=[(etc_containers, "/etc/containers"), (var_lib, "/var/lib/containers")],
            tmpfs=(*TMPFS, "/dev/shm"),
        )
        (base / "containers.conf").write_text(
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'events_logfile_path = "{base / "events.log"}"\n'
        )
        (base / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{base / "root"}"\n'
            f'runroot = "{base / "runroot"}"\n'
        )
        registries_conf = base / "registries.conf"
        registries_conf.write_text("")
        auth_file = base / "auth.json"
        auth_file.write_text("{}")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTAINERS_", "XDG_"))}
        env.update(
            CONTAINERS_CONF=str(base / "containers.conf"),
            CONTAINERS_STORAGE_CONF=str(base / "storage.conf"),
            CONTAINERS_REGISTRIES_CONF=str(registries_conf),
            REGISTRY_AUTH_FILE=str(auth_file),
            TMPDIR=str(base / "tmp"),
        )
        for name in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
            directory = base / name.lower()
            directory.mkdir(mode=0o700)
            env[name] = str(directory)
        (base / "tmp").mkdir()
        return cls(base, namespace, env, registries_conf, auth_file)

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``podman <isolating flags> ARGS`` in the private namespace; ``input`` to stdin."""
        argv = [
            "podman",
            "--root", str(self.base / "root"),
            "--runroot", str(self.base / "runroot"),
            "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
            "--tmpdir", str(self.base / "libpod-tmp"),
            *args,
        ]  # fmt: skip
        return _run_client(
            self.namespace.argv(argv), argv, env=self.env, check=check, timeout=timeout, input=input
        )

    def diff_ids(self, reference: str) -> list[str]:
        """The uncompressed layer digests of a stored image (what was pulled)."""
        inspected = json.loads(self.run("image", "inspect", reference).stdout)
        layers: list[str] = inspected[0]["RootFS"]["Layers"]
        return layers


@pytest.fixture
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    """An isolated rootful :class:`Podman` with an empty store, no registries.conf
    entries and no credentials; skips (saying why) where podman cannot run."""
    _preflight("podman")
    if not Path("/etc/containers").is_dir():
        pytest.skip("/etc/containers is missing: it is the mount point for podman's policy")
    # The mount point for podman's blob-info cache; rootful podman and skopeo create it.
    Path("/var/lib/containers").mkdir(parents=True, exist_ok=True)
    client = Podman.create(tmp_path_factory.mktemp("podman"))
    probe = client.run("info", "--format", "{{.Store.GraphDriverName}}", check=False)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run here: {probe.stderr.strip().splitlines()[-1:]}")
    assert probe.stdout.strip() == "vfs"
    return client


@contextlib.contextmanager
def loopback6_forwarder(target_port: int) -> Iterator[int]:
    """Relay TCP from ``[::1]:<port>`` to ``127.0.0.1:<target_port>``; yields the port."""
    loop = asyncio.new_event_loop()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()  # a reset on one side is a reset on the other

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(HOST, target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, target_writer), pipe(target_reader, writer))
        writer.close()
        target_writer.close()

    server = loop.run_until_complete(asyncio.start_server(relay, "::1", 0))
    port = int(server.sockets[0].getsockname()[1])
    thread = threading.Thread(target=loop.run_forever, name="forwarder", daemon=True)
    thread.start()
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
