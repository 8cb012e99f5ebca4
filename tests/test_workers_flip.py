"""``server.workers`` by default: one serving process per CPU this process may use.

The count honours the CPU quota of the process's cgroup and of every cgroup above it,
wherever the quota was set (a container's root cgroup, a systemd service or slice),
in cgroup v2 and v1 layouts; these tests build such trees in a temporary directory."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from regmirror import cpus, metrics_dir
from regmirror.config import load
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    HOST,
    REPO_ROOT,
    ServerProcess,
    free_port,
    regmirror_server,
)
from tests.test_workers import metrics_dir as metrics_dir_of

Start = Callable[..., ServerProcess]

CPUS = len(os.sched_getaffinity(0))


def v2_tree(root: Path, membership: str, quotas: dict[str, str]) -> tuple[Path, Path]:
    """A unified hierarchy at ``root/fs`` with ``cpu.max`` per cgroup path, and a
    ``/proc/self/cgroup`` naming ``membership``."""
    fs = root / "fs"
    fs.mkdir()
    (fs / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for path, value in quotas.items():
        directory = fs / path.strip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cpu.max").write_text(value + "\n")
    (fs / membership.strip("/")).mkdir(parents=True, exist_ok=True)
    proc = root / "cgroup"
    proc.write_text(f"0::{membership}\n")
    return proc, fs


def test_the_default_is_one_worker_per_cpu() -> None:
    assert load(environ={}).server.workers == 0
    assert load(environ={"REGMIRROR_SERVER__WORKERS": "1"}).server.workers == 1


def test_no_quota_counts_every_cpu_of_the_affinity(tmp_path: Path) -> None:
    proc, fs = v2_tree(tmp_path, "/", {"/": "max 100000"})
    assert cpus.cpu_quota(proc, fs) is None
    assert cpus.usable_cpus(proc, fs) == CPUS
    assert cpus.usable_cpus(tmp_path / "absent", fs) == CPUS


def test_a_containers_quota_at_the_root_of_its_cgroup_namespace(tmp_path: Path) -> None:
    """Kubernetes limits.cpu: 1500m, docker run --cpus 1.5: the container sees its own
    cgroup as the root, with the quota in it."""
    proc, fs = v2_tree(tmp_path, "/", {"/": "150000 100000"})
    assert cpus.cpu_quota(proc, fs) == 1.5
    assert cpus.usable_cpus(proc, fs) == min(CPUS, 2)


def test_a_systemd_services_quota_in_its_own_cgroup(tmp_path: Path) -> None:
    """CPUQuota=100% writes cpu.max in the service's cgroup, not at the root (where
    the count looked before)."""
    proc, fs = v2_tree(
        tmp_path,
        "/system.slice/regmirror.service",
        {"/system.slice/regmirror.service": "100000 100000"},
    )
    assert cpus.cpu_quota(proc, fs) == 1.0
    assert cpus.usable_cpus(proc, fs) == 1


def test_the_smallest_quota_on_the_way_to_the_root_wins(tmp_path: Path) -> None:
    proc, fs = v2_tree(
        tmp_path,
        "/mirror.slice/regmirror.service",
        {
            "/mirror.slice": "50000 100000",
            "/mirror.slice/regmirror.service": "400000 100000",
        },
    )
    assert cpus.cpu_quota(proc, fs) == 0.5
    assert cpus.usable_cpus(proc, fs) == 1  # never 0


def test_cgroup_v1_quota_of_a_container_mounted_as_its_own_root(tmp_path: Path) -> None:
    """v1 without a cgroup namespace: /proc/self/cgroup names the host's path, which the
    container's mount does not have; the mount's root is the container's cgroup."""
    fs = tmp_path / "fs"
    cpu = fs / "cpu,cpuacct"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("200000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cpus.cpu_quota(proc, fs) == 2.0
    assert cpus.usable_cpus(proc, fs) == min(CPUS, 2)
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert cpus.usable_cpus(proc, fs) == CPUS


@pytest.mark.parametrize("value", ["", "max", "150000", "x 100000", "150000 0", "1 2 3"])
def test_an_unreadable_quota_is_no_quota(tmp_path: Path, value: str) -> None:
    proc, fs = v2_tree(tmp_path, "/", {"/": value})
    assert cpus.usable_cpus(proc, fs) == CPUS


def test_the_daemonset_bounds_its_workers_when_it_sets_no_cpu_limit() -> None:
    """Without a CPU limit the pod's cgroup has no quota: one worker per CPU would be one
    per node core, each under the one memory limit."""
    import yaml

    root = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
    daemonset = yaml.safe_load((root / "daemonset.yaml").read_text())
    [container] = [
        c for c in daemonset["spec"]["template"]["spec"]["containers"] if c["name"] == "regmirror"
    ]
    settings = load(root / "config.yml", environ={})
    if "cpu" not in container["resources"].get("limits", {}):
        assert 1 <= settings.server.workers <= 4


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_workers_start_stops_them_cleanly(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM (or Ctrl-C's SIGINT) while the workers build their apps: there a worker
    had no handler and died of it (exit status 1), or, just after the fork, still the
    supervisor's, which swallowed it (the worker served on until killed 40 s later).
    Now the signal waits until the worker's loop takes it, and the worker drains."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGMIRROR_")}
    env.update(PYTHONPATH=str(REPO_ROOT), REGMIRROR_SERVER__WORKERS="2", SLOW_WORKER_START="1")
    argv = [sys.executable, "-m", "tests.support.slow_workers", "serve"]
    argv += ["--listen", f"{HOST}:{free_port()}"]
    argv += ["--data-dir", str(tmp_path / "data")]
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "worker processes" in line:  # forked, not serving yet
                process.send_signal(signum)
                break
        code = process.wait(15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    logs = process.stderr.read()
    assert code == 0, logs
    assert "did not drain" not in logs and "exited unexpectedly" not in logs
    assert logs.count("stopping: draining") == 2  # each worker, once it could


def test_a_killed_supervisors_metrics_directory_goes_at_the_next_start(
    regmirror_server: Start,  # noqa: F811
    tmp_path: Path,
) -> None:
    """kill -9 of the supervisor left its metrics directory in the temp directory, one
    more on every restart (a container's /tmp outlives it). The next start removes it;
    a directory still in use, or not one of ours, stays."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp)}
    config = {"server": {"workers": 2}}
    killed = regmirror_server(env=env, config=config)
    left = metrics_dir_of(killed)
    assert left.parent == tmp and any(left.glob("*.db"))
    workers = killed.serving_pids()
    killed.stopped = True  # by this test, on purpose
    killed.process.kill()
    killed.process.wait(10)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.05)
    assert left.is_dir()

    in_use = tmp / f"{metrics_dir.PREFIX}in-use"
    in_use.mkdir()
    held = os.open(in_use / metrics_dir.LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # as a live supervisor holds it
    older = tmp / f"{metrics_dir.PREFIX}older"  # no lock file: not ours to judge
    older.mkdir()
    try:
        restarted = regmirror_server(env=env, config=config)
        assert not left.exists()
        assert in_use.is_dir() and older.is_dir()
        assert metrics_dir_of(restarted).is_dir()
        restarted.stop()
        assert not metrics_dir_of(restarted).exists()  # an orderly stop removes its own
    finally:
        os.close(held)
    assert sorted(p.name for p in tmp.iterdir()) == sorted([in_use.name, older.name])

