"""``python -m tests.support.slow_workers serve ...``: regmirror whose workers each take
``SLOW_WORKER_START`` seconds (default 1) longer to build their application, so that a
test can signal the server while its workers start (``server.workers``). The process
serving alone (``workers: 1``) is not slowed. Otherwise it is regmirror, unchanged."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from regmirror.app import create_app
from regmirror.cli import main, serve
from regmirror.config import Settings

DELAY = float(os.environ.get("SLOW_WORKER_START", "1"))


def slow_create_app(settings: Settings, **kwargs: Any) -> object:
    if kwargs.get("worker") is not None:
        time.sleep(DELAY)
    return create_app(settings, **kwargs)


if __name__ == "__main__":
    serve.create_app = slow_create_app  # type: ignore[assignment]
    sys.exit(main(sys.argv[1:]))
