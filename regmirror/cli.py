"""The ``regmirror`` command."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from aiohttp import web

from regmirror import __version__
from regmirror.app import create_app
from regmirror.config import ConfigError, load

log = logging.getLogger("regmirror")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regmirror", description=__doc__)
    parser.add_argument("--version", action="version", version=f"regmirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the registry")
    serve.add_argument("--config", help="YAML config file (keys: listen, data_dir, cache, ...)")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:5000)")
    serve.add_argument("--data-dir", help="directory for blobs, links and uploads")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load(args.config, overrides={"listen": args.listen, "data_dir": args.data_dir})
        host, port = settings.host_port()
        app = create_app(settings)
    except (ConfigError, OSError) as exc:
        print(f"regmirror: {exc}", file=sys.stderr)
        return 2
    log.info("regmirror %s serving http://%s:%d/v2/", __version__, host, port)
    log.info("data directory: %s", settings.data_dir)
    if not _is_loopback(host):
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
