"""What every bench script shares: where it runs, test content, process figures, percentiles.

Bench scripts start servers with ``tests.support.processes`` (the same fixtures the tests
use; :func:`quiet_stop` keeps their stop-time log tails out of a report), nginx with
:func:`nginx_config`, make content with :func:`make_blob`, sample a server's process tree
with :class:`TreeMemory` and :func:`open_fds`, and report nearest-rank :func:`percentile`s.
The pull benchmarks' own pieces (image, origin, counting proxy, clients) are in pulls.py.
Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

HOST = "127.0.0.1"  # the only address a bench script talks to or listens on
MIB = 1024 * 1024
RSS_INTERVAL = 0.05  # seconds between samples of a process tree's resident memory


def make_blob(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; their ``sha256:<hex>`` digest."""
    hasher = hashlib.sha256()
    with open(path, "wb") as out:
        left = size
        while left > 0:
            chunk = os.urandom(min(8 * MIB, left))
            hasher.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return "sha256:" + hasher.hexdigest()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def process_tree(root: int) -> list[int]:
    """A process and its descendants, from /proc."""
    pids, todo = [], [root]
    for _ in range(10_000):  # bounded walk
        if not todo:
            break
        pid = todo.pop()
        pids.append(pid)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU seconds of these processes (fields 14 and 15 of /proc/PID/stat)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeMemory:
    """Samples the summed VmRSS of a process and its descendants in a thread.

    ``peak`` is the largest sum seen (shared pages, e.g. nginx's cache zone, count once
    per process: an upper bound for multi-process servers); ``hwm()`` sums each process's
    own VmHWM (its peak since it started, so it includes earlier herds).
    """

    def __init__(self, root: int):
        self.root = root
        self.peak_kib = 0
        self.cpu_start = 0.0
        self.cpu = 0.0  # the tree's CPU seconds between enter and exit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self.cpu_start = cpu_seconds(process_tree(self.root))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.cpu = cpu_seconds(process_tree(self.root)) - self.cpu_start

    def _run(self) -> None:
        while not self._stop.is_set():
            total = sum(status_kib(pid, "VmRSS") for pid in process_tree(self.root))
            self.peak_kib = max(self.peak_kib, total)
            self._stop.wait(RSS_INTERVAL)

    def hwm_kib(self) -> int:
        return sum(status_kib(pid, "VmHWM") for pid in process_tree(self.root))


def open_fds(root: int) -> int:
    """File descriptors open in a process and its descendants."""
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def drop_page_cache() -> str | None:
    """Write back dirty pages and drop the page, dentry and inode caches (a cold start);
    None when done, else why not (it needs root, and a kernel that lets this container
    write ``/proc/sys/vm/drop_caches``)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"cannot drop the page cache: {exc.strerror}"
    return None


# nginx in the foreground with everything it writes (pid, logs, temp paths) under its
# prefix; ``http_extra`` goes in the http block, ``server`` in the one server block.
NGINX_CONF = """\
daemon off;
{user}worker_processes {workers};
worker_rlimit_nofile 16384;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 30s;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    types {{ }}
    default_type application/octet-stream;
{http_extra}
    server {{
        listen {host}:{port} backlog=4096;
{server}
    }}
}}
"""


def nginx_config(
    prefix: Path, port: int, *, server: str, http_extra: str = "", workers: int | None = None
) -> list[str]:
    """Write ``prefix``/nginx.conf listening on ``port`` (one worker per core unless
    ``workers`` says otherwise); the command line that runs it in the foreground. As
    root, workers would otherwise run as nobody and could not read a 0700 temp
    directory, so they stay root."""
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            user="user root;\n" if os.geteuid() == 0 else "",
            workers=workers or os.cpu_count() or 1,
            prefix=prefix,
            host=HOST,
            port=port,
            http_extra=http_extra,
            server=server,
        )
    )
    return ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]


def nginx_static(prefix: Path, root: Path, port: int, workers: int | None = None) -> list[str]:
    """nginx serving the files under ``root`` as they are on disk, with sendfile: the
    bound a static file server reaches on this machine (see :func:`nginx_config`)."""
    server = f'        root {root};\n        location = /v2/ {{ return 200 "{{}}"; }}'
    return nginx_config(prefix, port, server=server, workers=workers)


def http_status(url: str, timeout: float = 2.0) -> int:
    """The HTTP status ``url`` answers a GET with; 0 when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


@contextlib.contextmanager
def quiet_stop(server: contextlib.AbstractContextManager[Any], log: Path) -> Iterator[Any]:
    """Enter ``server``; on the way out send what tests.support prints (the server's log
    tail) to ``log`` instead of our stderr."""
    value = server.__enter__()
    try:
        yield value
    except BaseException:
        with open(log, "a") as out, contextlib.redirect_stderr(out):
            if not server.__exit__(*sys.exc_info()):
                raise
    else:
        with open(log, "a") as out, contextlib.redirect_stderr(out):
            server.__exit__(None, None, None)


@contextlib.contextmanager
def work_dir(prefix: str, parent: str | None, *, keep: bool = False) -> Iterator[Path]:
    """A fresh temporary directory (under ``parent``, default $TMPDIR) for a run's
    servers, caches and logs, named on stderr; deleted at the end unless ``keep``."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    print(f"# work dir {root}", file=sys.stderr)
    try:
        yield root
    finally:
        if keep:
            print(f"# kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
