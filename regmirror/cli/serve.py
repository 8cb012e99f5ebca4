"""``regmirror serve``: run the registry."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from typing import Any

from aiohttp import web

from regmirror import __version__
from regmirror.app import create_app
from regmirror.config import ConfigError, load

log = logging.getLogger("regmirror")


def add_parser(commands: Any) -> argparse.ArgumentParser:
    serve: argparse.ArgumentParser = commands.add_parser("serve", help="run the registry")
    serve.add_argument("--config", help="YAML config file (keys: listen, data_dir, cache, ...)")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:5000)")
    serve.add_argument("--data-dir", help="directory for blobs, links and uploads")
    # Also accepted after the subcommand, where earlier versions took it.
    serve.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return serve


def run(args: argparse.Namespace) -> int:
    if "log_level" in args:
        logging.getLogger().setLevel(args.log_level.upper())
    try:
        settings = load(args.config, overrides={"listen": args.listen, "data_dir": args.data_dir})
        host, port = settings.host_port()
        app = create_app(settings)
    except (ConfigError, OSError) as exc:
        print(f"regmirror: {exc}", file=sys.stderr)
        return 2
    log.info("regmirror %s serving http://%s:%d/v2/", __version__, host, port)
    log.info("data directory: %s", settings.data_dir)
    if settings.auth.enabled:
        log.info("access control: %s", "htpasswd" if settings.auth.htpasswd else "token service")
    elif not _is_loopback(host):
        log.warning(
            "listening on %s with no authentication: whoever reaches this port can push and "
            "delete; firewall it or listen on 127.0.0.1",
            host,
        )
    web.run_app(
        app,
        host=host,
        port=port,
        access_log=None,
        print=None,
        shutdown_timeout=30.0,
    )
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
