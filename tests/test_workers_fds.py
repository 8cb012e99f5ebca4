"""A worker out of file descriptors, with ``server.workers``: the host is not ready, and
``/readyz`` says so by the cause (``fds``, naming the worker and its count), from
whichever worker answers it, within about a second.

A worker at its limit can open nothing: before, it could not write its state file (a
temp file renamed per snapshot), so the others saw its heartbeat stop and said "event
loop stalled" only ``server.max_loop_lag`` later; it could not count its own
descriptors either (a listing of ``/proc/self/fd`` needs one), nor read the others'
files, so when it answered ``/readyz`` itself it said its descriptors were fine and
the other worker "not running".

Real ``regmirror serve`` processes with two workers; one is held to a low
RLIMIT_NOFILE (``prlimit`` once it runs: at startup it would size its connection
bound to it) and filled with idle connections. Below them, the state file itself
(:mod:`regmirror.state_file`, imported in the tests that use it: this file also runs
on the code before it): read whole while rewritten in place, and written and
read by a process with no descriptor to spare."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    HOST,
    ServerProcess,
    regmirror_server,
    which_or_skip,
)
from tests.test_workers import workers_of

Start = Callable[..., ServerProcess]
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Answer = tuple[float, int, dict[str, Any]]  # seconds since a start, status, body
HEADROOM = 100  # descriptors a worker may open over what it holds idle
PROMPT = 2.0  # seconds within which /readyz must tell
BOUND = 20.0  # seconds any one phase may take at most
SOURCE = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
STATUS = b"GET /-/status HTTP/1.1\r\nHost: registry\r\n\r\n"


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settled_fds(pid: int) -> int:
    """``pid``'s descriptors, the least of a few looks (not one it holds for a moment)."""
    counts = []
    for _ in range(4):
        counts.append(fds_of(pid))
        await asyncio.sleep(0.02)
    return min(counts)


async def limit_fds(pid: int, limit: int) -> None:
    prlimit = which_or_skip("prlimit", "util-linux")
    proc = await asyncio.create_subprocess_exec(
        prlimit, f"--pid={pid}", f"--nofile={limit}:{limit}"
    )
    assert await proc.wait() == 0


async def probe(url: str) -> tuple[int, dict[str, Any]] | None:
    """``/readyz`` on a fresh connection (the kernel picks the worker); None if the one
    it reached did not answer (a worker out of descriptors cannot accept it)."""
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=1.0)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as client,
            client.get(f"{url}/readyz") as response,
        ):
            return response.status, await response.json()
    except (TimeoutError, aiohttp.ClientError):
        return None


async def watch(
    url: str,
    started: float,
    done: Callable[[list[Answer]], bool],
    bound: float,
    *,
    overlap: bool = True,
) -> list[Answer]:
    """Probe every 0.1 s until ``done`` says so of the answers or ``bound`` seconds
    pass. The answers, each with the seconds from ``started`` to it, in that order.
    ``overlap``: not waiting for the last probe (one the full worker's socket queues
    goes unanswered a second); else one at a time (a worker with one descriptor to
    spare accepts one connection at a time)."""
    answers: list[Answer] = []

    async def one() -> None:
        if (answer := await probe(url)) is not None:
            answers.append((time.monotonic() - started, *answer))

    probes = []
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline and not done(answers):
        probes.append(asyncio.create_task(one()))
        if not overlap:
            await probes[-1]
        await asyncio.sleep(0.1)
    for task in probes:
        task.cancel()
    await asyncio.gather(*probes, return_exceptions=True)
    return answers


async def ready_again(url: str) -> dict[str, Any]:
    """Poll until a probe answers 200 (bounded); its body."""
    answers = await watch(
        url, time.monotonic(), lambda found: found[-1:] != [] and found[-1][1] == 200, BOUND
    )
    assert answers and answers[-1][1] == 200, answers[-3:]
    return answers[-1][2]


async def both_up(server: ServerProcess) -> int:
    """Wait until both workers have published (bounded); worker 1's pid."""
    deadline = time.monotonic() + BOUND
    async with aiohttp.ClientSession() as client:
        while time.monotonic() < deadline:
            async with client.get(f"{server.url}/-/status") as response:
                workers = (await response.json())["workers"]
            if all(w["pid"] is not None and w["problem"] is None for w in workers):
                await asyncio.sleep(0.5)  # and settled
                return int(workers[1]["pid"])
            await asyncio.sleep(0.1)
    raise AssertionError(f"workers not up within {BOUND} s: {workers}")


@contextlib.asynccontextmanager
async def closing(held: list[Connection]) -> AsyncIterator[list[Connection]]:
    try:
        yield held
    finally:
        for _, writer in held:
            writer.close()


async def fill_up(server: ServerProcess, pid: int, limit: int, held: list[Connection]) -> None:
    """Idle connections until worker ``pid`` holds ``limit`` descriptors: it can accept
    no more (the kernel queues the rest on its socket, or gives them to the other)."""
    deadline = time.monotonic() + BOUND
    while fds_of(pid) < limit:
        assert time.monotonic() < deadline and len(held) < 6 * limit, (fds_of(pid), len(held))
        for _ in range(10):
            held.append(await asyncio.open_connection(HOST, server.port))
        await asyncio.sleep(0.05)


async def pin(server: ServerProcess, pid: int, held: list[Connection]) -> None:
    """One more kept-alive connection that worker ``pid`` serves (a request on it
    showed which worker the kernel gave it to); the others are closed."""
    for _ in range(100):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(STATUS)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
        length = re.search(rb"(?i)content-length: (\d+)", head)
        assert length, head
        body = await asyncio.wait_for(reader.readexactly(int(length[1])), BOUND)
        if json.loads(body)["pid"] == pid:
            held.append((reader, writer))
            return
        writer.close()
    raise AssertionError(f"no connection reached worker pid {pid}")


async def test_a_worker_out_of_descriptors_makes_readyz_say_fds_naming_it(
    regmirror_server: Start,  # noqa: F811
) -> None:
    """Worker 1 at its very limit (EMFILE): /readyz (answered by worker 0: worker 1
    accepts nothing) is 503 with the fds reason naming worker 1 within PROMPT seconds,
    never a stall; ready again once its connections close."""
    server = regmirror_server(config={"server": {"workers": 2}})
    second = await both_up(server)
    assert workers_of(server)[1] == second
    limit = await settled_fds(second) + HEADROOM
    await limit_fds(second, limit)

    def named(answer: Answer) -> bool:
        return answer[1] == 503 and "file descriptors" in answer[2]["checks"]["workers"]

    async with closing([]) as held:
        await fill_up(server, second, limit, held)
        answers = await watch(
            server.url, time.monotonic(), lambda found: any(map(named, found)), PROMPT + 1.0
        )
        assert fds_of(second) == limit  # still full: what was measured is that state
        assert any(map(named, answers)), answers
        took, _, body = next(filter(named, answers))
        # Counted at the limit, or just before it on the way there.
        assert re.fullmatch(
            rf"worker 1 \(pid {second}\): \d+ file descriptors open of the limit {limit}: "
            "near exhaustion",
            body["checks"]["workers"],
        ), answers
        assert took < PROMPT, answers
        print(f"worker 1 full: /readyz named it {took:.2f} s later")
        assert all("stalled" not in b["checks"]["workers"] for _, _, b in answers), answers
    body = await ready_again(server.url)
    assert body["checks"]["workers"] == "ok" and body["checks"]["fds"] == "ok", body


async def test_a_worker_answering_readyz_with_its_last_descriptor_tells_its_own_count(
    regmirror_server: Start,  # noqa: F811
) -> None:
    """Worker 1 one descriptor short of its limit accepts a probe with its last one:
    its answer counts itself at the limit (fds) and still reads worker 0's state
    (workers: ok); worker 0's answers name worker 1."""
    server = regmirror_server(config={"server": {"workers": 2}})
    second = await both_up(server)
    limit = await settled_fds(second) + HEADROOM
    async with closing([]) as held:
        while (count := await settled_fds(second)) < limit - 1:
            assert len(held) <= HEADROOM, count
            await pin(server, second, held)
        assert count == limit - 1, count
        await limit_fds(second, limit)
        limited = time.monotonic()

        def own(answer: Answer) -> bool:  # worker 1's: worker 0's own descriptors are fine
            return answer[2]["checks"]["fds"] != "ok"

        answers = await watch(
            server.url, limited, lambda found: sum(map(own, found)) >= 2, BOUND, overlap=False
        )
        assert sum(map(own, answers)) >= 2, answers
        for _, status, body in filter(own, answers):
            assert status == 503, body
            assert body["checks"]["fds"] == (
                f"{limit} file descriptors open of the limit {limit}: near exhaustion"
            ), body
            assert body["checks"]["workers"] == "ok", body
        for took, status, body in answers:
            if not own((took, status, body)) and took > PROMPT:  # worker 0's, once told
                assert status == 503, body
                assert body["checks"]["workers"].startswith(f"worker 1 (pid {second}): "), body
                assert "file descriptors" in body["checks"]["workers"], body
    body = await ready_again(server.url)
    assert body["checks"]["workers"] == "ok" and body["checks"]["fds"] == "ok", body


# -- the state file ---------------------------------------------------------------------


def test_a_record_caught_mid_write_is_not_taken() -> None:
    from regmirror import state_file

    first = state_file.encode({"pid": 1, "fills": ["a" * 100]})
    second = state_file.encode({"pid": 2, "fills": []})
    assert state_file.decode(first) == {"pid": 1, "fills": ["a" * 100]}
    # Rewritten shorter in place, before the truncate: the stale tail is ignored.
    assert state_file.decode(second + first[len(second) :]) == {"pid": 2, "fills": []}
    # Torn: the new record's start over the old one's rest, or cut short.
    assert state_file.decode(second[:20] + first[20:]) is None
    assert state_file.decode(first[:-1]) is None
    assert state_file.decode(first[:3]) is None
    assert state_file.decode(b"") is None
    assert state_file.decode(b'{"pid": 1}') is None  # the old format: no header


WRITER = """
import sys, time
from pathlib import Path
from regmirror.state_file import Writer
writer = Writer(Path(sys.argv[1]))
n = 0
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    n += 1
    size = (n * 7919) % 400  # 40 B to 40 KiB: records of one page and of ten
    writer.write({"n": n, "fills": ["f" * 90] * size, "size": size})
    time.sleep(float(sys.argv[3]))
print(n)
"""


@pytest.mark.parametrize("pause", [0.001, 0.0], ids=["every-ms", "without-pause"])
def test_records_rewritten_in_place_are_always_read_whole(tmp_path: Path, pause: float) -> None:
    """A writer rewriting records of 1 to 10 pages every millisecond (500 times a
    worker's pace), or without pause; every read of the other process is one whole
    record, and records come in order (one caught mid-write at every try is the last
    one read). A raw read catches some mid-write (counted: what the checksum is for)."""
    from regmirror import state_file, worker_state
    from regmirror.state_file import Reader, Writer

    path = tmp_path / worker_state.name_of(1)
    Writer(path).write({"n": 0, "fills": [], "size": 0})
    reader = Reader(tmp_path)
    assert reader.read(path.name) == {"n": 0, "fills": [], "size": 0}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "2.0", str(pause)],
        stdout=subprocess.PIPE,
        text=True,
        env=SOURCE,
    )
    reads = torn = last = 0
    raw = os.open(path, os.O_RDONLY)
    try:
        while writer.poll() is None and reads < 200_000:
            state = reader.read(path.name)
            assert state is not None
            assert len(state["fills"]) == state["size"] and state["n"] >= last, state["n"]
            last = state["n"]
            reads += 1
            torn += state_file.decode(os.pread(raw, 64 * 1024, 0)) is None
    finally:
        os.close(raw)
        reader.close()
        out, _ = writer.communicate(timeout=BOUND)
    assert writer.returncode == 0 and int(out) > 500, out
    assert reads > 1000 and last > 0
    print(f"{reads} reads of {int(out)} writes; {torn} raw reads caught one mid-write")


def test_a_replaced_file_is_read_anew(tmp_path: Path) -> None:
    """The supervisor deletes a dead worker's file; its successor writes a new one."""
    from regmirror import worker_state
    from regmirror.state_file import Reader, Writer

    reader = Reader(tmp_path)
    Writer(tmp_path / worker_state.name_of(1)).write({"pid": 10})
    assert reader.read(worker_state.name_of(1)) == {"pid": 10}
    worker_state.forget(tmp_path, 1, 11)  # not its pid: kept
    assert reader.read(worker_state.name_of(1)) == {"pid": 10}
    worker_state.forget(tmp_path, 1, 10)
    assert reader.read(worker_state.name_of(1)) is None
    successor = Writer(tmp_path / worker_state.name_of(1))
    successor.write({"pid": 12})
    assert reader.read(worker_state.name_of(1)) == {"pid": 12}
    successor.write({"pid": 12, "n": 2})
    assert reader.read(worker_state.name_of(1)) == {"pid": 12, "n": 2}
    reader.close()
    successor.close()


def test_a_record_never_whole_is_the_last_one_read_or_unreadable(tmp_path: Path) -> None:
    from regmirror.state_file import Reader, Unreadable, Writer

    path = tmp_path / "worker-1.state"
    Writer(path).write({"pid": 10, "n": 1})
    reader = Reader(tmp_path)
    assert reader.read(path.name) == {"pid": 10, "n": 1}
    with open(path, "r+b") as f:  # in place, as if caught mid-write at every try
        f.write(b"99999")
    assert reader.read(path.name) == {"pid": 10, "n": 1}
    with pytest.raises(Unreadable, match="no whole record"):
        Reader(tmp_path).read(path.name)  # nothing whole read from it before
    reader.close()


OUT_OF_DESCRIPTORS = """
import os, resource, sys
from pathlib import Path
from regmirror import health
from regmirror.state_file import Reader, Writer, Unreadable
run = Path(sys.argv[1])
mine, theirs = Writer(run / "worker-1.state"), Writer(run / "worker-0.state")
theirs.write({"pid": 0})
mine.write({"pid": 1, "n": 1})
reader = Reader(run)
assert reader.read("worker-0.state") == {"pid": 0}
Writer(run / "worker-2.state").write({"pid": 2})  # not read yet
limit = len(os.listdir("/proc/self/fd")) + 5
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
spent = []
try:
    while True:
        spent.append(os.open("/dev/null", os.O_RDONLY))
except OSError as exc:
    assert exc.errno == 24, exc  # EMFILE
theirs.write({"pid": 0, "n": 2})
mine.write({"pid": 1, "n": 2})  # before: a temp file to rename, EMFILE
assert reader.read("worker-0.state") == {"pid": 0, "n": 2}
try:
    reader.read("worker-2.state")
except Unreadable as exc:
    assert "Too many open files" in str(exc), exc
else:
    raise AssertionError("read a file it had no descriptor for")
assert health.open_fds() == limit, (health.open_fds(), limit)
assert health.fd_problem() == f"{limit} file descriptors open of the limit {limit}: near exhaustion"
print("ok")
"""


def test_a_process_out_of_descriptors_still_writes_and_reads_its_held_files(
    tmp_path: Path,
) -> None:
    from regmirror.state_file import Reader

    result = subprocess.run(
        [sys.executable, "-c", OUT_OF_DESCRIPTORS, str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=BOUND,
        env=SOURCE,
    )
    assert result.stdout == "ok\n", result.stdout + result.stderr
    assert Reader(tmp_path).read("worker-1.state") == {"pid": 1, "n": 2}
