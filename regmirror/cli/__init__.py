"""The ``regmirror`` command: one module per subcommand, argparse only in this package.

Each subcommand module offers ``add_parser(commands)`` (declares its flags) and
``run(args) -> int`` (the exit status).
"""

from __future__ import annotations

import argparse
from types import ModuleType

from regmirror import __version__
from regmirror.cli import fsck, serve, status, warm
from regmirror.logs import formatting

# Subcommands in the order ``--help`` lists them.
COMMANDS: tuple[ModuleType, ...] = (serve, warm, status, fsck)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="regmirror",
        description="Host-local Docker/OCI registry mirror and pull-through cache.",
    )
    parser.add_argument("--version", action="version", version=f"regmirror {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands).set_defaults(run=command.run)
    args = parser.parse_args(argv)
    formatting.setup("text", args.log_level)  # serve switches to log.format once it is read
    status: int = args.run(args)
    return status
