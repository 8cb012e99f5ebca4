"""``regmirror serve``: run the registry."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path
from typing import Any

from regmirror import __version__, datalock, workers
from regmirror.app import create_app
from regmirror.config import ConfigError, load
from regmirror.datalock import DataDirBusy
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
    count = settings.server.workers or workers.default_workers()  # 0: one per CPU
    try:
        if count == 1:
            run_server(
                app,
                Listen(host, port),
                tls=tls,
                probes=Listen(*probes) if probes is not None else None,
                settings=settings.server,
            )
            return 0
        # Checked here, once: the data directory is not under gc, the ports are ours
        # (reserved, not listening, until the workers listen beside the reservation).
        held = datalock.acquire(Path(settings.data_dir).expanduser().resolve(), exclusive=False)
        reserved = [workers.bind(host, port, listen=False)]
        if probes is not None:
            reserved.append(workers.bind(*probes, listen=False))
    except DataDirBusy as exc:
        print(f"regmirror: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, the address is not ours
        print(f"regmirror: cannot listen: {exc}", file=sys.stderr)
        return 2
    del app  # each worker builds its own (checked above: the settings are usable)
    ports = [sock.getsockname()[1] for sock in reserved]

    def serve_worker(index: int) -> int:
        held.release()  # the worker takes its own (the app's data directory lock)
        for sock in reserved:
            sock.close()
        run_server(
            create_app(settings, worker=index),
            Listen(host, ports[0]),
            tls=server_tls(settings.tls),
            probes=Listen(probes[0], ports[1]) if probes is not None else None,
            settings=settings.server,
            reuse_port=True,
        )
        return 0

    try:
        return workers.supervise(count, serve_worker, settings.server.drain_timeout)
    finally:
        held.release()
        for sock in reserved:
            sock.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
