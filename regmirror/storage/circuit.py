"""The state of the S3 outage circuit (:class:`~regmirror.storage.counted.CountedDriver`):
this process's alone (:class:`LocalCircuit`), or the host's, shared by the workers of
``server.workers`` (:class:`HostCircuit`).

Per process, N workers would each find out on their own that S3 went down (N times the
failing calls, each waiting out a read deadline when S3 hangs) and, once it is back, each
keep failing reads at once until its own trial read got through: up to the backoff of
503s after another worker already saw S3 answer. Shared, one failure opens the circuit
for the host, one success closes it for the host, and one worker at a time makes the
trial read.

The host's circuit is one file in the supervisor's run directory, ``s3-down``, that
exists while S3 is down. Its mtime is the instant (wall clock, nanoseconds) before which
no read asks S3: a read looks at it with a ``stat``, no lock and no read of the file.
While S3 is up, a read costs the host two ``access`` calls (is there a file? before it
asks, and after the answer), about 2 µs. Its content (``since``, ``failures``) only
makes the log lines host-wide. Every change is made holding the file's
``flock`` for a few system calls, never across an await:

- a failure creates the file (if absent: that worker logs that S3 went down), counts
  itself and sets the mtime to now plus the backoff;
- a success deletes it (the worker that does logs that S3 is back);
- a read finding the backoff past claims the trial: under the lock (``LOCK_NB``: a busy
  lock means another worker is claiming, so this read fails at once), it moves the mtime
  on by the trial's own deadline, so every other read keeps failing at once while the
  trial runs and, should its worker die, another trial follows once that deadline passed.

A file whose mtime is further ahead than any window this process sets (the wall clock
was set back) counts as past. When the file cannot be used at all (the run directory is
gone while the host shuts down), reads ask S3, as if it were up.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from regmirror.logs.throttle import Throttled

log = logging.getLogger(__name__)

FILE = "s3-down"  # in the run directory (regmirror.workers.Worker.run_dir)
HORIZON_MARGIN = 1.0  # seconds past the longest window before a mtime counts as a clock jump
MAX_RECORD = 256  # the file's content is two numbers
NS = 1_000_000_000


class Turn(enum.Enum):
    """What a read may do now."""

    ASK = "ask"  # S3 is up: ask it
    TRIAL = "trial"  # down, its backoff past: this read finds out whether S3 is back
    REFUSE = "refuse"  # down: fail at once, without asking


@dataclass(frozen=True, slots=True)
class Recovery:
    """An outage that a success just ended: how long it lasted, how many calls failed."""

    seconds: float
    failures: int


class Circuit(Protocol):
    @property
    def down(self) -> bool:
        """Whether the last call failed and none has succeeded since."""
        ...

    def admit(self, deadline: float) -> Turn:
        """Whether a read may ask S3; ``deadline``: the most it will wait if it does."""
        ...

    def end_trial(self) -> None:
        """The read admitted as :attr:`Turn.TRIAL` is over (its outcome recorded)."""
        ...

    def failed(self) -> bool:
        """A call failed; whether it is the first since S3 went down."""
        ...

    def answered(self) -> Recovery | None:
        """A call succeeded; the outage it ended, if one was under way."""
        ...


class LocalCircuit:
    """The circuit of one process (``workers: 1``, or no run directory)."""

    def __init__(self, *, backoff: float, clock: Callable[[], float] = time.monotonic):
        self._backoff = backoff
        self._clock = clock
        self._open_until: float | None = None  # None: closed, reads ask S3
        self._trial = False  # a read is finding out whether S3 is back
        self._down_since = 0.0
        self._failures = 0  # calls failed since it went down

    @property
    def down(self) -> bool:
        return self._open_until is not None

    def admit(self, deadline: float) -> Turn:
        if self._open_until is None:
            return Turn.ASK
        if self._trial or self._clock() < self._open_until:
            return Turn.REFUSE
        self._trial = True
        return Turn.TRIAL

    def end_trial(self) -> None:
        self._trial = False

    def failed(self) -> bool:
        first = not self.down
        if first:
            self._down_since, self._failures = self._clock(), 0
        self._failures += 1
        self._open_until = self._clock() + self._backoff
        return first

    def answered(self) -> Recovery | None:
        if self._open_until is None:
            return None
        self._open_until = None
        return Recovery(self._clock() - self._down_since, self._failures)


class HostCircuit:
    """The circuit of every worker of a host: the file ``path`` (see the module)."""

    def __init__(
        self,
        path: Path,
        *,
        backoff: float,
        longest: float,
        clock: Callable[[], int] = time.time_ns,
    ):
        """``longest``: the longest deadline of a read (a trial's window)."""
        self.path = path
        self._name = os.fspath(path)  # what each stat takes: no conversion per read
        self._backoff = int(backoff * NS)
        self._horizon = int((max(backoff, longest) + HORIZON_MARGIN) * NS)
        self._clock = clock
        self._broken = Throttled(log)

    @property
    def down(self) -> bool:
        # access(), not stat(): no exception to raise when S3 is up (a microsecond less).
        return os.access(self._name, os.F_OK)

    def admit(self, deadline: float) -> Turn:
        try:
            for _ in range(3):  # the file replaced under us (closed, and down again): anew
                turn = self._admit(int(deadline * NS))
                if turn is not None:
                    return turn
        except OSError as exc:
            self._unusable(exc)
            return Turn.ASK
        return Turn.REFUSE

    def _admit(self, deadline: int) -> Turn | None:
        if not self.down:
            return Turn.ASK
        try:
            until = os.stat(self._name).st_mtime_ns
        except FileNotFoundError:
            return Turn.ASK
        if self._within(until):
            return Turn.REFUSE
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return Turn.ASK  # closed meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return Turn.REFUSE  # another worker is claiming the trial, or failing
            current = _current(fd, self.path)
            if current is not True:
                return Turn.ASK if current is None else None
            if self._within(os.fstat(fd).st_mtime_ns):
                return Turn.REFUSE  # another worker's trial
            claim = self._clock() + deadline
            os.utime(fd, ns=(claim, claim))
            return Turn.TRIAL
        finally:
            os.close(fd)

    def end_trial(self) -> None:
        """Nothing: the trial's outcome moved the mtime on (or deleted the file), and
        its claim runs out by itself."""

    def failed(self) -> bool:
        try:
            with self._locked(create=True) as fd:
                assert fd is not None
                state = _parse(os.pread(fd, MAX_RECORD, 0))
                first = state is None  # empty: this call created it
                since, failures = state or (time.time(), 0)
                record = json.dumps({"since": since, "failures": failures + 1}).encode()
                with contextlib.suppress(OSError):  # only the log lines need it
                    os.pwrite(fd, record, 0)
                    os.ftruncate(fd, len(record))
                until = self._clock() + self._backoff  # after the write, which set the mtime
                os.utime(fd, ns=(until, until))
                return first
        except OSError as exc:
            self._unusable(exc)
            return False

    def answered(self) -> Recovery | None:
        if not self.down:  # the common case: one access()
            return None
        try:
            with self._locked(create=False) as fd:
                if fd is None:
                    return None  # another worker closed it
                state = _parse(os.pread(fd, MAX_RECORD, 0))
                os.unlink(self.path)
        except OSError as exc:
            self._unusable(exc)
            return None
        since, failures = state or (time.time(), 0)
        return Recovery(max(0.0, time.time() - since), failures)

    def _within(self, until: int) -> bool:
        """Whether ``until`` (a mtime) is still ahead, and not by more than any window
        this circuit sets."""
        now = self._clock()
        return now < until <= now + self._horizon

    @contextlib.contextmanager
    def _locked(self, *, create: bool) -> Iterator[int | None]:
        """The file's descriptor, locked, while it is still the path's; None when there
        is no file (``create`` False). The lock is held for a few system calls only, so
        waiting for it blocks nobody for long."""
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        while True:
            try:
                fd = os.open(self.path, flags, 0o600)
            except FileNotFoundError:
                if create:
                    raise
                yield None
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                current = _current(fd, self.path)
                if current:
                    yield fd
                    return
                if current is None and not create:
                    yield None  # deleted while we waited for the lock: closed
                    return
            finally:
                os.close(fd)

    def _unusable(self, exc: OSError) -> None:
        self._broken.warning(
            "circuit", "%s: %s; S3 reads are asked as if it were up", self.path, exc
        )


def _current(fd: int, path: Path) -> bool | None:
    """Whether the open ``fd`` is still ``path``'s file: True, False (another file is
    there now), None (no file is)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return None


def _parse(record: bytes) -> tuple[float, int] | None:
    try:
        state = json.loads(record)
        return float(state["since"]), int(state["failures"])
    except (ValueError, TypeError, KeyError):
        return None
