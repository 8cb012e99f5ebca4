"""Which peer's bytes failed a fill of a blob here: the next fill of that blob takes the
peer's lease over (``If-Match``) rather than following it again.

A peer is named by its lease's ``instance`` (one per process of the fleet), remembered
per blob: distrusting a host for every blob would let one bad read cut it out of the
fleet. With several workers (``server.workers``) the host remembers, not the worker
whose fill failed: otherwise the next pull of the blob, reaching another worker, would
follow the same peer once more (a second client cut mid-blob). The host's memory is a
directory in the supervisor's run directory, one small file per blob holding the
instance (written then renamed: a reader sees the whole of it or nothing), read when a
fill meets another host's lease; at most :data:`REMEMBERED` files, the oldest removed
first. One process alone keeps it in memory (an LRU cache as large).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from cachetools import LRUCache

from regmirror.digest import Digest
from regmirror.logs.throttle import Throttled

log = logging.getLogger(__name__)

DIRECTORY = "fleet-distrust"  # in the run directory (regmirror.workers.Worker.run_dir)
REMEMBERED = 1024  # blobs whose failing peer is remembered
MAX_INSTANCE = 1024  # bytes of an instance read back (ours are a few dozen)


class Distrust:
    """Peers not to follow again, by blob: this process's (``directory`` None), or the
    host's, in ``directory``."""

    def __init__(self, directory: Path | None = None, *, remembered: int = REMEMBERED):
        self.directory = directory
        self._remembered = remembered
        self._memory: LRUCache[Digest, str] = LRUCache(remembered)
        self._broken = Throttled(log)

    def add(self, digest: Digest, instance: str) -> None:
        """``instance``'s bytes of ``digest`` failed a fill here."""
        self._memory[digest] = instance  # also the answer should the directory fail
        if self.directory is None:
            return
        path = self._path(digest)
        temp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            self.directory.mkdir(exist_ok=True)
            temp.write_bytes(instance.encode("utf-8", "surrogatepass"))
            os.replace(temp, path)
            self._prune()
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            self._unusable(exc)

    def get(self, digest: Digest) -> str | None:
        """The instance whose bytes of ``digest`` failed a fill here, if any."""
        if self.directory is None:
            return self._memory.get(digest)
        try:
            with open(self._path(digest), "rb") as file:
                return file.read(MAX_INSTANCE).decode("utf-8", "surrogatepass")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:  # not written by us
            return self._memory.get(digest)
        except OSError as exc:
            self._unusable(exc)
            return self._memory.get(digest)

    def _path(self, digest: Digest) -> Path:
        assert self.directory is not None
        return self.directory / f"{digest.algorithm}-{digest.hex}"

    def _prune(self) -> None:
        """Remove the oldest files past :data:`REMEMBERED` (any worker may: each holds
        the same limit; removing one already gone is no matter)."""
        assert self.directory is not None
        entries = [e for e in os.scandir(self.directory) if not e.name.startswith(".")]
        if len(entries) <= self._remembered:
            return
        aged = []
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                aged.append((entry.stat().st_mtime_ns, entry.path))
        aged.sort()
        for _, path in aged[: len(aged) - self._remembered]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _unusable(self, exc: OSError) -> None:
        self._broken.warning(
            "distrust",
            "%s: %s; a peer whose bytes failed a fill is remembered by this worker only",
            self.directory,
            exc,
        )
