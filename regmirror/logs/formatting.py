"""``log.format``: ``text`` (a line a person reads) or ``json`` (one object a line).

Structured fields travel in a record's ``fields`` extra (``log.info(..., extra={"fields":
{...}})``): the JSON formatter puts them beside ``time``, ``level``, ``logger`` and
``message``; the text formatter shows the message only, which already says the same.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def formatter(kind: str) -> logging.Formatter:
    return JsonFormatter() if kind == "json" else logging.Formatter(TEXT)


# Libraries whose DEBUG lines carry credentials (botocore logs each request's
# Authorization header and signature): never below INFO, whatever --log-level says.
QUIET = ("botocore", "boto3", "s3transfer", "urllib3", "aiobotocore")


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours: replaced by the next :func:`setup`; other handlers (a test's) are left."""


def setup(kind: str = "text", level: str | int = "INFO") -> None:
    """Log to stderr in ``kind`` (``text`` or ``json``) from ``level`` up."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(old)
    handler = _Stderr(sys.stderr)
    handler.setFormatter(formatter(kind))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    floor = max(root.level, logging.INFO)
    for name in QUIET:
        logging.getLogger(name).setLevel(floor)
