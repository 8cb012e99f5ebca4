"""How many CPUs this process may use: the default of ``server.workers``.

Its CPU affinity (``taskset``, ``docker run --cpuset-cpus``, a static CPU manager),
capped by the CPU quota of its cgroup and of every cgroup above it: cgroup v2
``cpu.max``, or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``. That is where a
Kubernetes ``limits.cpu``, ``docker run --cpus`` and systemd's ``CPUQuota=`` (or a
slice's) end up: a container limited to 2 CPUs on a 64-core node counts 2, not 64.

The process's cgroup is read from ``/proc/self/cgroup`` and looked for under the
cgroup mount; in a container whose cgroup is mounted as the root (no cgroup
namespace, v1) that path is absent and the mount's root is the container's own cgroup.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from regmirror.numbers import ascii_int

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_FS = Path("/sys/fs/cgroup")


def usable_cpus(proc_cgroup: Path = PROC_CGROUP, cgroup_fs: Path = CGROUP_FS) -> int:
    """The CPUs of this process's affinity, at most its cgroups' quota rounded up (1.5
    CPUs of quota: 2, each process busy for part of the time); at least 1."""
    cpus = len(os.sched_getaffinity(0)) or 1
    quota = cpu_quota(proc_cgroup, cgroup_fs)
    if quota is None:
        return cpus
    return max(1, min(cpus, math.ceil(quota)))


def cpu_quota(proc_cgroup: Path = PROC_CGROUP, cgroup_fs: Path = CGROUP_FS) -> float | None:
    """The smallest CPU quota, in CPUs, of this process's cgroup and its ancestors;
    None when none of them has one (or cgroups cannot be read)."""
    try:
        membership = proc_cgroup.read_text()
    except OSError:
        return None
    quotas: list[float] = []
    for line in membership.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # cgroup v2: the unified hierarchy
            # Not mounted there: v1 (or hybrid, whose v2 part has no cpu controller).
            mounts = [cgroup_fs] if (cgroup_fs / "cgroup.controllers").exists() else []
            read = _v2_quota
        elif "cpu" in controllers.split(","):
            mounts = [m for m in (cgroup_fs / "cpu", cgroup_fs / controllers) if m.is_dir()]
            read = _v1_quota
        else:
            continue
        if not mounts:
            continue
        mount = mounts[0]
        for directory in _up(mount, path):
            quota = read(directory)
            if quota is not None:
                quotas.append(quota)
    return min(quotas, default=None)


def _up(mount: Path, path: str) -> list[Path]:
    """The cgroup's directory and each one above it, up to the mount's root."""
    own = mount / path.strip("/") if path.strip("/") else mount
    if not own.is_dir():  # mounted as its own root (a container without a cgroup namespace)
        return [mount]
    chain = [own]
    while chain[-1] != mount and mount in chain[-1].parents:
        chain.append(chain[-1].parent)
    return chain


def _v2_quota(directory: Path) -> float | None:
    """``cpu.max``: ``max 100000`` (none) or ``150000 100000`` (1.5 CPUs)."""
    try:
        fields = (directory / "cpu.max").read_text().split()
    except OSError:
        return None
    if len(fields) != 2:
        return None
    return _ratio(ascii_int(fields[0]), ascii_int(fields[1]))


def _v1_quota(directory: Path) -> float | None:
    """``cpu.cfs_quota_us`` (``-1``: none) over ``cpu.cfs_period_us``."""
    try:
        quota = (directory / "cpu.cfs_quota_us").read_text().strip()
        period = (directory / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _ratio(ascii_int(quota), ascii_int(period))


def _ratio(quota: int | None, period: int | None) -> float | None:
    if quota is None or not period:  # "max", "-1", unreadable: no quota
        return None
    return quota / period
