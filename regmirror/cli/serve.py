"""``regmirror serve``: run the registry."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from typing import Any

from regmirror import __version__
from regmirror.app import create_app
from regmirror.config import ConfigError, load
from regmirror.logs import formatting
from regmirror.logs.redact import without_secrets
from regmirror.server import Listen
from regmirror.server import run as run_server
from regmirror.tls import server_tls

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
        probes = settings.metrics_host_port()
        tls = server_tls(settings.tls)
        formatting.setup(settings.log.format, logging.getLogger().level)
        app = create_app(settings)
    except (ConfigError, OSError) as exc:
        print(f"regmirror: {exc}", file=sys.stderr)
        return 2
    log.info("regmirror %s", __version__)
    log.info("data directory: %s", settings.data_dir)
    if settings.s3.bucket:
        log.info(
            "shared store: s3 bucket %s%s%s",
            settings.s3.bucket,
            f", prefix {settings.s3.prefix}" if settings.s3.prefix else "",
            f", endpoint {without_secrets(settings.s3.endpoint_url)}"
            if settings.s3.endpoint_url
            else "",
        )
    if not settings.log.access:
        log.info("access log: off (log.access)")
    if tls is not None:
        log.info(
            "TLS: certificate %s, key %s (reloaded when they change)",
            tls.settings.cert,
            tls.settings.key,
        )
        if tls.settings.client_ca:
            log.info("mutual TLS: clients need a certificate from %s", tls.settings.client_ca)
    if settings.auth.enabled:
        log.info("access control: %s", "htpasswd" if settings.auth.htpasswd else "token service")
    elif not _is_loopback(host):
        who = "whoever reaches this port"
        if settings.tls.client_ca:
            who = "every client with a certificate from tls.client_ca"
        log.warning(
            "listening on %s with no authentication: %s can push and delete; firewall it, "
            "configure auth, or listen on 127.0.0.1",
            host,
            who,
        )
    try:
        run_server(
            app,
            Listen(host, port),
            tls=tls,
            probes=Listen(*probes) if probes is not None else None,
            settings=settings.server,
        )
    except OSError as exc:  # the port is taken, the address is not ours
        print(f"regmirror: cannot listen: {exc}", file=sys.stderr)
        return 2
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
