"""``regmirror fsck``: re-hashing the local store, reporting and quarantining bad blobs."""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from regmirror import fsck as fsck_module
from regmirror.fsck import MALFORMED, MISMATCH, QUARANTINE, check_store
from tests.support.api import (  # noqa: F401  (fixtures)
    blob_bytes,
    client,
    data_dir,
    make_client,
    push_blob,
)
from tests.support.processes import REPO_ROOT

NAME = "lib/app"


def blob_file(data_dir: Path, digest: str) -> Path:
    algorithm, hex_ = digest.split(":")
    return data_dir / "docker/registry/v2/blobs" / algorithm / hex_[:2] / hex_ / "data"


def fsck(data_dir: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command line, as an operator runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("REGMIRROR_")}
    where = ["--data-dir", str(data_dir)] if data_dir is not None else []
    return subprocess.run(
        [sys.executable, "-m", "regmirror", "fsck", *where, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


async def push_some(client, count: int) -> list[str]:
    return [await push_blob(client, NAME, blob_bytes(5000 + i, seed=i)) for i in range(count)]


async def test_clean_store_exits_0_and_counts_every_blob(client, data_dir):
    digests = await push_some(client, 4)

    result = fsck(data_dir, "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["blobs"] == report["checked"] == len(digests)
    assert report["bad"] == []


async def test_corrupt_blob_is_reported_with_nonzero_exit(client, data_dir):
    digests = await push_some(client, 3)
    corrupt = blob_file(data_dir, digests[1])
    corrupt.write_bytes(corrupt.read_bytes() + b"appended by a racing PATCH")

    result = fsck(data_dir, "--json")

    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert [(bad["problem"], bad["digest"]) for bad in report["bad"]] == [(MISMATCH, digests[1])]
    assert report["bad"][0]["quarantined_to"] is None
    assert corrupt.exists()  # reported only: nothing moved without --quarantine


async def test_quarantine_moves_bad_blob_aside_without_deleting_it(client, data_dir):
    digests = await push_some(client, 3)
    corrupt = blob_file(data_dir, digests[0])
    corrupt.write_bytes(b"not the pushed bytes")

    result = fsck(data_dir, "--quarantine")

    assert result.returncode == 1
    assert "digest mismatch" in result.stdout
    assert not corrupt.exists()
    moved = list((data_dir / QUARANTINE).rglob("data"))
    assert len(moved) == 1 and moved[0].read_bytes() == b"not the pushed bytes"
    for digest in digests[1:]:
        assert blob_file(data_dir, digest).exists()
    assert fsck(data_dir).returncode == 0  # what is left is sound


async def test_quarantined_blob_is_unknown_until_pushed_again(client, data_dir):
    data = blob_bytes(7000, seed=99)
    digest = await push_blob(client, NAME, data)
    blob_file(data_dir, digest).write_bytes(b"garbage")
    check_store(data_dir, quarantine=True)

    assert (await client.get(f"/v2/{NAME}/blobs/{digest}")).status == 404
    await push_blob(client, NAME, data)
    response = await client.get(f"/v2/{NAME}/blobs/{digest}")
    assert response.status == 200 and await response.read() == data


async def test_sample_rehashes_only_n_blobs(client, data_dir):
    await push_some(client, 6)

    result = fsck(data_dir, "--sample", "2", "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["blobs"], report["checked"]) == (6, 2)


async def test_sample_finds_corruption_in_the_blobs_it_draws(client, data_dir):
    digests = await push_some(client, 6)
    for digest in digests:
        blob_file(data_dir, digest).write_bytes(b"x")

    report = check_store(data_dir, sample=3, rng=random.Random(1))

    assert report.checked == 3
    assert len(report.bad) == 3 and {bad.problem for bad in report.bad} == {MISMATCH}


async def test_malformed_names_and_symlinks_are_reported_and_target_left_alone(
    client, data_dir, tmp_path
):
    await push_some(client, 1)
    blobs = data_dir / "docker/registry/v2/blobs/sha256"
    stray = blobs / "zz" / "not-a-digest" / "data"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"stray")
    outside = tmp_path / "outside.txt"  # beside the data directory, never to be touched
    outside.write_bytes(b"operator's file")
    link = blobs / ("ab" + "0" * 62)[:2] / ("ab" + "0" * 62) / "data"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)

    report = check_store(data_dir, quarantine=True)

    assert sorted((bad.problem, bad.path) for bad in report.bad) == sorted(
        [
            (MALFORMED, str(stray.relative_to(data_dir))),
            (MALFORMED, str(link.relative_to(data_dir))),
        ]
    )
    assert outside.read_bytes() == b"operator's file"
    assert not stray.exists() and not link.is_symlink()
    assert all(
        bad.quarantined_to and bad.quarantined_to.startswith(QUARANTINE) for bad in report.bad
    )


async def test_write_in_progress_temp_files_are_not_blobs(client, data_dir):
    digests = await push_some(client, 1)
    temp = blob_file(data_dir, digests[0]).parent / ".tmp-0123"
    temp.write_bytes(b"half written")

    report = check_store(data_dir)

    assert report.ok and report.checked == 1
    assert temp.exists()


def test_missing_data_dir_is_a_usage_error(tmp_path):
    result = fsck(tmp_path / "nope")

    assert result.returncode == 2
    assert "does not exist" in result.stderr


async def test_quarantine_leaves_a_blob_replaced_since_it_was_hashed(client, data_dir, monkeypatch):
    data = blob_bytes(6000, seed=5)
    digest = await push_blob(client, NAME, data)
    stored = blob_file(data_dir, digest)
    stored.write_bytes(b"corrupt")
    hash_file = fsck_module._hash_file

    def hash_then_repair(path, algorithm):
        found = hash_file(path, algorithm)
        fixed = path.with_name(".tmp-fixed")  # a push renames verified bytes into place
        fixed.write_bytes(data)
        os.replace(fixed, path)
        return found

    monkeypatch.setattr(fsck_module, "_hash_file", hash_then_repair)
    report = check_store(data_dir, quarantine=True)

    assert [bad.problem for bad in report.bad] == [MISMATCH]
    assert report.bad[0].quarantined_to is None
    assert stored.read_bytes() == data


async def test_data_dir_comes_from_the_config_file(client, data_dir, tmp_path):
    digests = await push_some(client, 2)
    blob_file(data_dir, digests[0]).write_bytes(b"bad")
    config = tmp_path / "regmirror.yml"
    config.write_text(f"data_dir: {data_dir}\n")

    result = fsck(None, "--config", str(config), "--json")

    assert result.returncode == 1, result.stderr
    assert [bad["digest"] for bad in json.loads(result.stdout)["bad"]] == [digests[0]]
