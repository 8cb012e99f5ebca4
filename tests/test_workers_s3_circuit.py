"""``server.workers`` with S3: the outage circuit is the host's, not each worker's.

A host of two workers reads a bucket through a gate on 127.0.0.1 in front of moto, which
can hang (S3 accepts and never answers) and counts the requests reaching it meanwhile.
When S3 goes down, the first worker to find out spares the other the wait: its reads
fail at once, and S3 sees one failing call per host, not one per worker. When S3 is
back and one worker has seen it answer (here ``/readyz``), the other serves from S3 at
once: no 503 where, per worker, it would have refused reads until its own trial read.

Requests are aimed at a worker on connections found to be its own (``/proc``), opened
before S3 goes down so that nothing in between depends on how fast they are found.

Below them, :class:`~regmirror.storage.circuit.HostCircuit` as two workers see its one
file: who logs, the one trial for the host, a trial whose worker died, a clock set back,
a run directory gone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.mmap_dict import MmapedDict

from regmirror.storage import circuit
from regmirror.storage.circuit import HostCircuit, Turn
from regmirror.storage.counted import OUTAGE_BACKOFF, READ_DEADLINE, CountedDriver
from regmirror.storage.driver import StorageUnavailable
from regmirror.storage.filesystem import FilesystemDriver
from tests.support.fleet_workers import connect, two_workers
from tests.support.http import session
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    ServerProcess,
    regmirror_server,
)
from tests.support.s3 import MotoS3, moto_s3
from tests.support.s3_registry import push_blob, regmirror_env
from tests.support.upstream import serve
from tests.test_workers import metrics_dir

__all__ = ["moto_s3", "session"]

BOUND = 30.0
BLOBS = 24
Start = Callable[..., ServerProcess]


@dataclass
class Gate:
    """moto behind a proxy that hangs while closed, counting what reaches it meanwhile."""

    session: aiohttp.ClientSession
    moto: MotoS3
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    held: list[str] = field(default_factory=list)  # "METHOD path" that arrived while closed

    def __post_init__(self) -> None:
        self.opened.set()

    def asked(self) -> set[str]:
        """The distinct requests held (the SDK's own retry of one, after its 5 s read
        timeout, is the same request)."""
        return set(self.held)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.forward)
        return app

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if not self.opened.is_set():
            self.held.append(f"{request.method} {request.path}")
            await self.opened.wait()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with self.session.request(
            request.method,
            f"{self.moto.endpoint_url}{request.path_qs}",
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as response:
            body = await response.read()
            hop = ("transfer-encoding", "connection", "content-length")
            answer = web.Response(
                status=response.status,
                headers={k: v for k, v in response.headers.items() if k.lower() not in hop},
                body=body if request.method != "HEAD" else None,
            )
            if request.method == "HEAD" and response.content_length is not None:
                answer.headers["Content-Length"] = str(response.content_length)
            return answer


@dataclass
class Rig:
    host: ServerProcess  # two workers, reading S3 through the gate
    gate: Gate
    blobs: list[bytes]  # in S3 only (pushed by another host): each read asks S3

    def blob_path(self, data: bytes) -> str:
        return f"/v2/team/app/blobs/sha256:{hashlib.sha256(data).hexdigest()}"


@pytest.fixture
async def rig(
    moto_s3: MotoS3,
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,
) -> AsyncIterator[Rig]:
    bucket = moto_s3.new_bucket("circuit")
    pusher = regmirror_server(env={**regmirror_env(moto_s3, bucket), **one_worker()})
    blobs = [os.urandom(1024 + i) for i in range(BLOBS)]
    for data in blobs:
        await asyncio.to_thread(push_blob, pusher, "team/app", data)
    gate = Gate(session, moto_s3)
    async with serve(gate.app()) as url:
        env = regmirror_env(moto_s3, bucket, tag_ttl="0", endpoint_url=url)
        host = regmirror_server(env={**env, "REGMIRROR_SERVER__WORKERS": "2"})
        try:
            yield Rig(host, gate, blobs)
        finally:
            gate.opened.set()  # whatever the test did: nothing stays held


def one_worker() -> dict[str, str]:
    return {"REGMIRROR_SERVER__WORKERS": "1"}


@dataclass
class Answer:
    status: int
    body: bytes
    seconds: float


async def ask(host: ServerProcess, worker: int, path: str) -> Answer:
    """``GET path`` on a new connection to ``worker``."""
    return await ask_on(host, await connect(host, worker), path)


async def ask_on(
    host: ServerProcess,
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    path: str,
) -> Answer:
    """``GET path`` on ``connection`` (HTTP/1.1, ``Connection: close``), answered whole."""
    reader, writer = connection
    started = time.monotonic()
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: {host.host_port}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), BOUND)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return Answer(int(head.split()[1]), body, time.monotonic() - started)


def s3_errors(rig: Rig) -> float:
    """``regmirror_s3_errors_total`` summed over every worker (their metric files)."""
    total = 0.0
    for path in metrics_dir(rig.host).glob("counter_*.db"):
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[1] == "regmirror_s3_errors_total":
                total += value
    return total


async def test_a_worker_that_finds_s3_down_spares_the_others_the_wait(rig: Rig) -> None:
    first, second = two_workers(rig.host)
    later = [await connect(rig.host, second) for _ in range(3)]
    trials = [await connect(rig.host, worker) for worker in (first, second, first, second)]
    blobs = iter(rig.blobs)
    errors = s3_errors(rig)

    rig.gate.opened.clear()  # S3 hangs
    answer = await ask(rig.host, first, rig.blob_path(next(blobs)))
    failed = time.monotonic()
    assert answer.status == 503, answer.body[:300]
    assert answer.seconds >= READ_DEADLINE * 0.9  # it waited for S3
    assert len(rig.gate.asked()) == 1, rig.gate.held
    # Within the backoff the first worker opened for the host, the other asks S3 nothing.
    for connection in later:
        answer = await ask_on(rig.host, connection, rig.blob_path(next(blobs)))
        assert answer.status == 503, answer.body[:300]
        assert b"UNAVAILABLE" in answer.body
        assert answer.seconds < READ_DEADLINE * 0.9, answer.seconds  # failed at once
    assert len(rig.gate.asked()) == 1, rig.gate.held  # one failing call for the host
    assert s3_errors(rig) - errors == 1

    # Past the backoff, requests at both workers at once: one trial read for the host.
    await asyncio.sleep(max(0.0, failed + OUTAGE_BACKOFF + 0.2 - time.monotonic()))
    answers = await asyncio.gather(
        *(ask_on(rig.host, c, rig.blob_path(next(blobs))) for c in trials)
    )
    assert [a.status for a in answers] == [503] * len(trials), [a.body[:300] for a in answers]
    assert len(rig.gate.asked()) == 2, rig.gate.held
    assert s3_errors(rig) - errors == 2
    rig.gate.opened.set()


async def test_once_one_worker_sees_s3_back_no_worker_refuses_s3_reads(rig: Rig) -> None:
    first, second = two_workers(rig.host)
    blobs = iter(rig.blobs)
    ready = await connect(rig.host, first)
    after = [await connect(rig.host, worker) for _ in range(6) for worker in (second, first)]

    rig.gate.opened.clear()  # S3 hangs: both workers find out (each asked before the other failed)
    answers = await asyncio.gather(
        *(ask(rig.host, worker, rig.blob_path(next(blobs))) for worker in (first, second))
    )
    assert [a.status for a in answers] == [503, 503], [a.body[:300] for a in answers]
    rig.gate.opened.set()  # S3 is back
    started = time.monotonic()

    answer = await ask_on(rig.host, ready, "/readyz")  # the first worker sees it answer
    assert answer.status == 200, answer.body
    for connection in after:  # both workers read from S3 again at once
        data = next(blobs)
        answer = await ask_on(rig.host, connection, rig.blob_path(data))
        assert (answer.status, answer.body) == (200, data), answer.body[:300]
    # Per worker, the second would have refused S3 reads (503) until its own trial read,
    # up to OUTAGE_BACKOFF after it failed: the first of these requests falls within it
    # unless the machine is very slow (then this test cannot tell the two apart).
    print(f"recovered: {len(after)} reads in {time.monotonic() - started:.2f}s")


# -- the host's circuit, two workers' views of one file -------------------------------------


class Clock:
    """Wall-clock nanoseconds, moved on by the test."""

    def __init__(self) -> None:
        self.now = time.time_ns()

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1e9)


def two_views(tmp_path: Path, clock: Clock) -> tuple[HostCircuit, HostCircuit]:
    path = tmp_path / circuit.FILE
    return tuple(  # type: ignore[return-value]
        HostCircuit(path, backoff=2.0, longest=5.0, clock=clock) for _ in range(2)
    )


def test_one_workers_failure_opens_the_host_circuit_and_one_trial_is_made(
    tmp_path: Path,
) -> None:
    clock = Clock()
    first, second = two_views(tmp_path, clock)
    assert (first.admit(1.0), second.admit(1.0)) == (Turn.ASK, Turn.ASK)
    assert first.failed() is True  # S3 went down: this worker logs it
    assert second.down and second.admit(1.0) is Turn.REFUSE
    assert second.failed() is False  # already known down: not logged again

    clock.advance(2.5)  # the backoff has passed: one trial for the host
    assert second.admit(1.0) is Turn.TRIAL
    assert first.admit(1.0) is Turn.REFUSE and second.admit(1.0) is Turn.REFUSE
    second.end_trial()
    assert second.failed() is False  # the trial failed: another backoff
    clock.advance(1.5)
    assert first.admit(1.0) is Turn.REFUSE

    clock.advance(1.0)
    assert first.admit(1.0) is Turn.TRIAL
    recovery = first.answered()  # S3 is back: closed for both
    assert recovery is not None and recovery.failures == 3
    assert not second.down and second.admit(1.0) is Turn.ASK
    assert second.answered() is None  # nothing to close, nothing logged


def test_a_trial_whose_worker_died_is_followed_by_another_after_its_deadline(
    tmp_path: Path,
) -> None:
    clock = Clock()
    first, second = two_views(tmp_path, clock)
    first.failed()
    clock.advance(2.5)
    assert first.admit(5.0) is Turn.TRIAL  # and its worker dies: no outcome recorded
    clock.advance(4.0)
    assert second.admit(1.0) is Turn.REFUSE
    clock.advance(1.5)
    assert second.admit(1.0) is Turn.TRIAL


def test_a_clock_set_back_does_not_keep_the_circuit_open(tmp_path: Path) -> None:
    clock = Clock()
    first, second = two_views(tmp_path, clock)
    first.failed()
    clock.advance(-3600.0)  # the window now ends an hour ahead: beyond any set here
    assert second.admit(1.0) is Turn.TRIAL


def test_without_its_run_directory_the_circuit_lets_reads_ask(tmp_path: Path) -> None:
    gone = HostCircuit(tmp_path / "run" / circuit.FILE, backoff=2.0, longest=5.0)
    assert gone.failed() is False
    assert gone.admit(1.0) is Turn.ASK and not gone.down
    assert gone.answered() is None


async def test_workers_counted_drivers_share_the_host_circuit(tmp_path: Path) -> None:
    """What each worker's CountedDriver does with the host's circuit: the second does
    not ask a store the first found down, and asks again once the first saw it back."""
    calls: list[str] = []
    state = {"up": False}

    class Store(FilesystemDriver):
        async def stat(self, key: str) -> int:
            calls.append(key)
            if not state["up"]:
                raise StorageUnavailable("down")
            return 1

    path = tmp_path / circuit.FILE
    (tmp_path / "store").mkdir()
    store = Store(tmp_path / "store")
    first, second = (
        CountedDriver(store, lambda _: None, circuit=HostCircuit(path, backoff=2.0, longest=5.0))
        for _ in range(2)
    )
    with pytest.raises(StorageUnavailable):
        await first.stat("a")
    with pytest.raises(StorageUnavailable, match="not asked"):
        await second.stat("b")
    assert calls == ["a"]
    state["up"] = True
    await first.check()  # readiness: always asked, and it answers
    assert await second.stat("c") == 1
    assert calls == ["a", "c"]
