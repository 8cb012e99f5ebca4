"""Crash consistency: kill -9 at random instants of pushes and fills, restart, check.

One data directory lives through every trial. Each trial starts regmirror on it (a
restart after the previous kill), checks what the previous trial left, then runs pushes
(raw HTTP: monolithic blob uploads and manifests) and pulls through a registry:2
upstream (fills) while the process is killed:

- at a crash point (``tests.support.crashpoint``): right after a blob's rename into the
  store (push or fill, before its link or index entry), before a manifest's revision
  link, or mid-write of a fill; the ``n``-th time it is reached, ``n`` random;
- or from outside, by SIGKILL after a random delay.

(The crash point is armed by SIGUSR1 once the restarted server has been checked: the
checks may fill again, and must not trip it.)

After each restart: every blob and manifest acknowledged before the kill (a 201, or a
whole body that matched its digest) is served and re-hashes; once the index is built,
no blob file remains that no link references (``cache.unreferenced_grace`` is 0 here),
and no partial fill file survives. At the end the whole store re-hashes clean (fsck),
and ``regmirror gc --unreferenced`` finds no unreferenced blob left to delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import requests

from regmirror import layout
from regmirror.digest import Digest
from regmirror.fsck import check_store
from tests.support.crashpoint import POINTS
from tests.support.processes import REPO_ROOT, ServerProcess, run_regmirror
from tests.support.upstream import PushedImage, push_image, upstream_registry  # noqa: F401

TRIALS = 30
IMAGES_PER_TRIAL = 2
LAYER = 256 * 1024
PUSHES_PER_TRIAL = 12  # manifests (each with two new blobs) one trial pushes at most
HIT_RANGE = {"renamed": 10, "revision_link": 6, "fill_write": 8}  # n of CRASHPOINT=point:n
RECONCILE_TIMEOUT = 15.0
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
PUSHED = "ci/app"


@dataclass
class Acked:
    """What the server acknowledged: pushed blobs, pushed manifests, pulled images."""

    blobs: list[tuple[str, bytes]] = field(default_factory=list)  # (digest, bytes)
    manifests: list[tuple[str, bytes]] = field(default_factory=list)  # (tag, raw)
    pulled: list[PushedImage] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def extend(self, other: Acked) -> None:
        self.blobs += other.blobs
        self.manifests += other.manifests
        self.pulled += other.pulled


@pytest.fixture(scope="module")
def upstream_images(upstream_registry: ServerProcess) -> list[PushedImage]:  # noqa: F811
    """Images in registry:2 that each trial pulls through for the first time (fills)."""

    async def push_all() -> list[PushedImage]:
        limit = asyncio.Semaphore(8)
        async with aiohttp.ClientSession() as session:

            async def push(i: int) -> PushedImage:
                async with limit:
                    layer = os.urandom(LAYER)
                    return await push_image(
                        session, upstream_registry.url, f"lib/img{i}", layer=layer
                    )

            return list(await asyncio.gather(*(push(i) for i in range(TRIALS * IMAGES_PER_TRIAL))))

    return asyncio.run(push_all())


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- the workload ----------------------------------------------------------------------


class Dead(Exception):
    """The server went away (killed): the request in flight is not acknowledged."""


def call(session: requests.Session, method: str, url: str, **kwargs: object) -> requests.Response:
    try:
        return session.request(method, url, timeout=10, **kwargs)  # type: ignore[arg-type]
    except requests.RequestException as exc:
        raise Dead(str(exc)) from exc


def pusher(base: str, trial: int, rng: random.Random, acked: Acked) -> None:
    session = requests.Session()
    with contextlib.suppress(Dead):
        for i in range(PUSHES_PER_TRIAL):
            blobs = [rng.randbytes(rng.randint(1, 200) * 1024) for _ in range(2)]
            for blob in blobs:
                response = call(
                    session,
                    "POST",
                    f"{base}/v2/{PUSHED}/blobs/uploads/?digest={sha256(blob)}",
                    data=blob,
                )
                assert response.status_code == 201, response.text
                with acked.lock:
                    acked.blobs.append((sha256(blob), blob))
            raw = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": DOCKER_MANIFEST,
                    "config": {
                        "mediaType": "application/vnd.docker.container.image.v1+json",
                        "digest": sha256(blobs[0]),
                        "size": len(blobs[0]),
                    },
                    "layers": [
                        {
                            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                            "digest": sha256(blobs[1]),
                            "size": len(blobs[1]),
                        }
                    ],
                }
            ).encode()
            tag = f"t{trial}-{i}"
            response = call(
                session,
                "PUT",
                f"{base}/v2/{PUSHED}/manifests/{tag}",
                data=raw,
                headers={"Content-Type": DOCKER_MANIFEST},
            )
            assert response.status_code == 201, response.text
            with acked.lock:
                acked.manifests.append((tag, raw))


def puller(base: str, images: list[PushedImage], acked: Acked) -> None:
    session = requests.Session()
    with contextlib.suppress(Dead):
        for image in images:
            name = f"hub/{image.repo}"
            response = call(
                session,
                "GET",
                f"{base}/v2/{name}/manifests/{image.tag}",
                headers={"Accept": DOCKER_MANIFEST},
            )
            assert response.status_code == 200, response.text
            if response.content != image.manifest:
                raise AssertionError(f"{name}: wrong manifest bytes")
            response = call(session, "GET", f"{base}/v2/{name}/blobs/{image.layer_digest}")
            assert response.status_code == 200, response.text
            if sha256(response.content) != str(image.layer_digest):
                raise AssertionError(f"{name}: a complete body with the wrong digest")
            with acked.lock:
                acked.pulled.append(image)


def run_workload(
    server: ServerProcess,
    trial: int,
    rng: random.Random,
    images: list[PushedImage],
    kill_after: float | None,
) -> Acked:
    """Pushes and pulls until the server dies (its crash point, or our kill)."""
    acked = Acked()
    errors: list[BaseException] = []

    def guarded(target: object, *args: object) -> None:
        try:
            target(*args)  # type: ignore[operator]
        except BaseException as exc:  # noqa: BLE001 -- reported by the test thread
            errors.append(exc)

    threads = [
        threading.Thread(target=guarded, args=(pusher, server.url, trial, rng, acked)),
        threading.Thread(target=guarded, args=(puller, server.url, images, acked)),
    ]
    for thread in threads:
        thread.start()
    if kill_after is not None:
        time.sleep(kill_after)
    else:
        for thread in threads:  # the crash point kills it, or the workload ends first
            thread.join(30)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    server.stopped = True
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    return acked


# -- the checks ------------------------------------------------------------------------


def verify(server: ServerProcess, acked: Acked) -> None:
    """Everything acknowledged is served, and its bytes re-hash."""
    session = requests.Session()
    for digest, blob in acked.blobs:
        response = session.get(f"{server.url}/v2/{PUSHED}/blobs/{digest}", timeout=10)
        assert response.status_code == 200, (digest, response.text)
        assert sha256(response.content) == digest == sha256(blob)
    for tag, raw in acked.manifests:
        for reference in (tag, sha256(raw)):
            response = session.get(
                f"{server.url}/v2/{PUSHED}/manifests/{reference}",
                headers={"Accept": DOCKER_MANIFEST},
                timeout=10,
            )
            assert response.status_code == 200, (reference, response.text)
            assert response.content == raw
    for image in acked.pulled:
        name = f"hub/{image.repo}"
        response = session.get(f"{server.url}/v2/{name}/manifests/{image.digest}", timeout=10)
        assert response.status_code == 200, (name, response.text)
        assert response.content == image.manifest
        response = session.get(f"{server.url}/v2/{name}/blobs/{image.layer_digest}", timeout=10)
        assert response.status_code == 200, (name, response.text)
        assert sha256(response.content) == str(image.layer_digest)


def unreferenced_on_disk(data_dir: Path) -> set[str]:
    """Blob files no pushed or pull-through layer or revision link names (read here,
    independently of the code under test)."""
    linked = set()
    for tree in (data_dir, data_dir / "proxy"):
        for link in (tree / layout.REPOSITORIES).rglob("link"):
            if link.parent.parent.parent.name in ("_layers", "revisions"):
                linked.add(Digest.parse(link.read_text().strip()))
    on_disk = {
        Digest.parse(f"{p.parent.parent.parent.name}:{p.parent.name}")
        for p in (data_dir / layout.ROOT / "blobs").glob("*/*/*/data")
    }
    return {str(d) for d in on_disk - linked}


def wait_reconciled(server: ServerProcess) -> None:
    """Until the index is built and has deleted what no link references (grace 0), and
    the partial files the kill left are swept: watched on disk, which every worker
    shares (a worker's /-/status counts its own index; one alone deletes)."""
    deadline = time.monotonic() + RECONCILE_TIMEOUT
    while True:
        unreferenced = unreferenced_on_disk(server.data_dir)
        partials = list((server.data_dir / "fills").glob("*.partial"))
        if (not unreferenced and not partials) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert unreferenced == set(), server.logs()
    assert partials == [], partials


@contextlib.contextmanager
def started(
    base: Path, data_dir: Path, upstream: ServerProcess, crashpoint: str | None
) -> Iterator[ServerProcess]:
    env = {"REGMIRROR_CACHE__UNREFERENCED_GRACE": "0"}
    if crashpoint is not None:
        env["CRASHPOINT"] = crashpoint
    config = {"upstreams": [{"url": upstream.url, "prefix": "hub"}]}
    with run_regmirror(
        base, data_dir=data_dir, env=env, config=config, module="tests.support.crashpoint"
    ) as server:
        yield server


def test_kill_9_at_any_instant_loses_nothing_acknowledged_and_leaves_no_orphan(
    upstream_registry: ServerProcess,  # noqa: F811
    upstream_images: list[PushedImage],
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("CRASH_SEED", random.randrange(2**32)))
    print(f"CRASH_SEED={seed}")
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    everything, previous = Acked(), Acked()
    points: list[str] = []
    for trial in range(TRIALS):
        point = rng.choice([*POINTS, None])
        crashpoint = f"{point}:{rng.randint(1, HIT_RANGE[point])}" if point else None
        points.append(crashpoint or "kill")
        images = upstream_images[trial * IMAGES_PER_TRIAL : (trial + 1) * IMAGES_PER_TRIAL]
        with started(
            tmp_path / f"trial-{trial}", data_dir, upstream_registry, crashpoint
        ) as server:
            wait_reconciled(server)
            verify(server, previous)
            if point:  # arms the crash point in each worker: faults begin (the worker
                for pid in server.serving_pids():  # that dies of one is restarted)
                    os.kill(pid, signal.SIGUSR1)
            time.sleep(0.05)
            kill_after = None if point else rng.uniform(0.05, 0.6)
            previous = run_workload(server, trial, rng, images, kill_after)
        everything.extend(previous)
    with started(tmp_path / "final", data_dir, upstream_registry, None) as server:
        wait_reconciled(server)
        verify(server, everything)
    print(
        f"trials: {points}; acknowledged {len(everything.blobs)} blobs, "
        f"{len(everything.manifests)} manifests, {len(everything.pulled)} pulled images"
    )
    assert len(everything.blobs) > TRIALS  # the workload did run between the kills
    assert check_store(data_dir).ok
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REGMIRROR_")}
    environ["PYTHONPATH"] = str(REPO_ROOT)
    gc = subprocess.run(
        [
            sys.executable,
            "-m",
            "regmirror",
            "gc",
            "--data-dir",
            str(data_dir),
            "--unreferenced",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=True,
    )
    assert json.loads(gc.stdout)["totals"]["unreferenced blob"]["count"] == 0
