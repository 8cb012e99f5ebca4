"""The shipped nginx tier (deploy/nginx/regmirror-tier.conf) in front of test backends.

The ``tier`` fixture (``from tests.support.nginx import tier``): ``tier([port, ...])``
starts nginx in the foreground with the shipped config, its upstream servers
``regmirror-1..4.internal:5000`` replaced by these loopback ports (the ones beyond them
dropped) and everything it writes under the test's ``tmp_path``; its base URL. Every
nginx started is stopped after the test.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.support.processes import REPO_ROOT, STOP_TIMEOUT, free_port, poll_ready

TIER_CONF = REPO_ROOT / "deploy" / "nginx" / "regmirror-tier.conf"
SERVERS = 4  # regmirror-1.internal to regmirror-4.internal in the shipped config
READY_TIMEOUT = 30.0


def tier_conf(backends: Sequence[int], port: int, cache: Path) -> str:
    """The shipped tier config listening on 127.0.0.1:``port`` in front of ``backends``."""
    conf = TIER_CONF.read_text()
    for number in range(1, SERVERS + 1):
        if number <= len(backends):
            address = f"127.0.0.1:{backends[number - 1]}"
            conf = conf.replace(f"regmirror-{number}.internal:5000", address)
        else:
            conf = re.sub(rf"\n\s*server regmirror-{number}\.internal:5000[^;]*;", "", conf)
    conf = conf.replace("listen 5000;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("listen [::]:5000;", "")
    return conf.replace("/var/cache/nginx", str(cache))


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[Callable[[Sequence[int]], str]]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(backends: Sequence[int]) -> str:
        base = tmp_path / f"nginx-{len(processes)}"
        (base / "cache").mkdir(parents=True)
        port = free_port()
        (base / "tier.conf").write_text(tier_conf(backends, port, base / "cache"))
        (base / "nginx.conf").write_text(
            f"daemon off;\nuser root;\npid {base}/nginx.pid;\n"
            f"error_log {base}/error.log;\nevents {{}}\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {base}/body;\n"
            f"  proxy_temp_path {base}/proxy;\n  include {base}/tier.conf;\n}}\n"
        )
        process = subprocess.Popen(
            ["nginx", "-p", str(base), "-c", str(base / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"

        def logs() -> str:
            path = base / "error.log"
            return path.read_text() if path.exists() else ""

        poll_ready(f"{url}/healthz", process, logs, READY_TIMEOUT)
        return url

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)
