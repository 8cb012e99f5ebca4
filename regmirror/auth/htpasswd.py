"""Basic credentials checked against an htpasswd file, as registry:2 and ``htpasswd -B``
write it: ``user:$2y$cost$...`` (bcrypt only), one per line, ``#`` comments.

The file is re-read when it changes (mtime, size or inode), so CI's password rotates
without a restart; a file that turns invalid fails closed (no one logs in) until fixed.
Unknown users are checked against a dummy hash of the same cost, so the time an answer
takes does not tell who exists. bcrypt runs in a thread; successful checks are remembered
(bounded, keyed by an HMAC of user, stored hash and password under a per-process key, so
no password is kept and a changed hash misses).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from regmirror.config import ConfigError
from regmirror.numbers import ascii_int

log = logging.getLogger(__name__)

BCRYPT_PREFIXES = ("$2y$", "$2a$", "$2b$")
CACHE_SIZE = 1024
MAX_PASSWORD_BYTES = 72  # what bcrypt reads
_DEFAULT_COST = 10  # htpasswd -B's, for an empty file
_FALLBACK_DUMMY = b"$2b$10$" + b"." * 53  # replaced when the file is first read


class HtpasswdInvalid(ConfigError):
    """The file cannot be used: unreadable, or a line is not ``user:bcrypt-hash``."""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str  # "ok", "unknown_user", "bad_password", "htpasswd_invalid"


def parse(text: str, origin: str) -> dict[str, bytes]:
    """``user -> bcrypt hash``; HtpasswdInvalid naming the first bad line."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        where = f"{origin} line {number}"
        if not sep or not user or not hashed:
            raise HtpasswdInvalid(f"{where}: expected user:hash")
        if not hashed.startswith(BCRYPT_PREFIXES) or not _valid_bcrypt(hashed):
            raise HtpasswdInvalid(
                f"{where}: user {user!r} has a {_kind(hashed)} hash; only bcrypt is accepted "
                "($2y$/$2a$/$2b$, as written by htpasswd -B)"
            )
        users[user] = hashed.encode()
    return users


def _valid_bcrypt(hashed: str) -> bool:
    parts = hashed.split("$")  # '', '2y', cost, salt+hash
    cost = ascii_int(parts[2], max_digits=2) if len(parts) == 4 else None
    return cost is not None and 4 <= cost <= 31 and len(parts[3]) == 53


def _kind(hashed: str) -> str:
    if hashed.startswith("$apr1$"):
        return "MD5 (apr1)"
    if hashed.startswith("{SHA}"):
        return "SHA-1"
    if hashed.startswith(("$5$", "$6$")):
        return "SHA-crypt"
    if hashed.startswith(BCRYPT_PREFIXES):
        return "malformed bcrypt"
    return "crypt or plain-text"


def _cost(hashed: bytes) -> int:
    return int(hashed.split(b"$")[2])


class Htpasswd:
    """The users of one htpasswd file, re-read when the file changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._users: dict[str, bytes] = {}
        self._stamp: tuple[int, ...] | None = None
        self._invalid = False
        self._dummy = _FALLBACK_DUMMY
        self._key = secrets.token_bytes(32)
        self._verified: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._lock = asyncio.Lock()
        self._load(self._stat())  # at startup a bad file is a ConfigError: refuse to start

    async def verify(self, user: str, password: str) -> Verdict:
        """Whether ``password`` is ``user``'s, taking as long for unknown users."""
        await self._refresh()
        if self._invalid:
            return Verdict(False, "htpasswd_invalid")
        secret = password.encode()
        if len(secret) > MAX_PASSWORD_BYTES:
            # bcrypt reads no further; Go's bcrypt (registry:2) refuses such passwords.
            return Verdict(False, "password_too_long")
        stored = self._users.get(user)
        hashed = stored if stored is not None else self._dummy
        entry = json.dumps([user, hashed.decode(), password]).encode()
        key = hmac.new(self._key, entry, hashlib.sha256).digest()
        if stored is not None and key in self._verified:
            self._verified.move_to_end(key)
            return Verdict(True, "ok")
        matches = await asyncio.to_thread(bcrypt.checkpw, secret, hashed)
        if stored is None:
            return Verdict(False, "unknown_user")
        if not matches:
            return Verdict(False, "bad_password")
        self._verified[key] = None
        while len(self._verified) > CACHE_SIZE:
            self._verified.popitem(last=False)
        return Verdict(True, "ok")

    def _stat(self) -> tuple[int, ...]:
        try:
            st = self.path.stat()
        except OSError as exc:
            raise HtpasswdInvalid(
                f"auth.htpasswd: cannot read {self.path}: {exc.strerror}"
            ) from exc
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)

    def _load(self, stamp: tuple[int, ...]) -> None:
        self._install(*self._read(), stamp)

    def _read(self) -> tuple[dict[str, bytes], bytes]:
        """The users, and a dummy hash as costly as their usual one (for users not in
        the file). Runs in a thread: touches nothing shared."""
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise HtpasswdInvalid(f"auth.htpasswd: cannot read {self.path}: {exc}") from exc
        users = parse(text, f"auth.htpasswd {self.path}")
        costs = collections.Counter(_cost(h) for h in users.values())
        cost = costs.most_common(1)[0][0] if costs else _DEFAULT_COST
        return users, bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(cost))

    def _install(self, users: dict[str, bytes], dummy: bytes, stamp: tuple[int, ...]) -> None:
        self._users, self._dummy, self._stamp, self._invalid = users, dummy, stamp, False
        self._verified.clear()

    async def _refresh(self) -> None:
        try:
            stamp = self._stat()
        except HtpasswdInvalid as exc:
            self._fail(exc, None)
            return
        if stamp == self._stamp:
            return
        async with self._lock:
            if stamp == self._stamp:
                return
            try:
                users, dummy = await asyncio.to_thread(self._read)
            except HtpasswdInvalid as exc:
                self._fail(exc, stamp)
                return
            self._install(users, dummy, stamp)
            log.info("auth.htpasswd %s re-read: %d users", self.path, len(self._users))

    def _fail(self, exc: HtpasswdInvalid, stamp: tuple[int, ...] | None) -> None:
        if not self._invalid or stamp != self._stamp:
            log.error("%s; refusing every Basic login until the file is fixed", exc)
        self._users, self._stamp, self._invalid = {}, stamp, True
        self._verified.clear()
