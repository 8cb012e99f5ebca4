"""The flag of every command that talks to a running regmirror: where it is."""

from __future__ import annotations

import argparse

DEFAULT_URL = "http://127.0.0.1:5000"


def add_url(parser: argparse.ArgumentParser) -> None:
    """``--url``: the running regmirror (the address ``serve`` listens on by default)."""
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the regmirror (default {DEFAULT_URL})")
