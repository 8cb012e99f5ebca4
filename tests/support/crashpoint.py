"""``python -m tests.support.crashpoint serve ...``: regmirror that kills itself (SIGKILL)
at a chosen instant, for crash-consistency tests.

``CRASHPOINT=<point>:<n>`` in the environment: the process sends itself SIGKILL the
``n``-th time it reaches ``<point>``, exactly as a kill -9 from outside would land there
(no cleanup, no flush, no finally). The points are the instants a kill -9 can leave the
store inconsistent:

- ``renamed``: a blob was just renamed into the store (a push's verified upload, or a
  fill's partial file) and nothing after it has run: no link, no index entry;
- ``revision_link``: a manifest's bytes are stored, its revision link not yet written
  (pushes, and manifests pulled through);
- ``fill_write``: a fill has written a chunk to its partial file (mid-write).

Points count only once armed by SIGUSR1, so a test can check a restarted server (whose
reads may fill again) before the faults begin. Without ``CRASHPOINT`` it is regmirror,
unchanged.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from regmirror import fill
from regmirror.cli import main
from regmirror.links import LinkStore
from regmirror.storage.filesystem import FilesystemDriver

POINTS = ("renamed", "revision_link", "fill_write")


def _parse(spec: str) -> tuple[str, int]:
    point, _, count = spec.partition(":")
    if point not in POINTS or not count.isdigit() or int(count) < 1:
        raise SystemExit(f"CRASHPOINT={spec!r}: want one of {POINTS} and :N (N >= 1)")
    return point, int(count)


def install(point: str, count: int) -> None:
    """Patch the chosen point so that its ``count``-th hit once armed kills this process."""
    hits = 0
    armed = False

    def arm(signum: int, frame: object) -> None:
        nonlocal armed
        armed = True

    signal.signal(signal.SIGUSR1, arm)

    def reached(name: str) -> None:
        nonlocal hits
        if name != point or not armed:
            return
        hits += 1
        if hits == count:
            os.kill(os.getpid(), signal.SIGKILL)

    move_in = FilesystemDriver.move_in

    async def move_in_then(self: FilesystemDriver, key: str, source: Any) -> None:
        await move_in(self, key, source)
        if "/blobs/" in key:
            reached("renamed")

    write = LinkStore.write

    async def write_link(self: LinkStore, key: str, digest: Any) -> None:
        if "/_manifests/revisions/" in key:
            reached("revision_link")
        await write(self, key, digest)

    write_at: Callable[..., None] = fill._write_at

    def write_at_then(fd: int, chunk: bytes, offset: int, hasher: Any) -> None:
        write_at(fd, chunk, offset, hasher)
        reached("fill_write")

    FilesystemDriver.move_in = move_in_then  # type: ignore[method-assign]
    LinkStore.write = write_link  # type: ignore[method-assign]
    fill._write_at = write_at_then


if __name__ == "__main__":
    spec = os.environ.get("CRASHPOINT")
    if spec:
        install(*_parse(spec))
    sys.exit(main(sys.argv[1:]))
