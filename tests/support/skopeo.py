"""skopeo, the real client the tests push and pull with, isolated from the host.

The ``skopeo`` fixture (``from tests.support.skopeo import skopeo``): a :class:`Skopeo`
with its own home under the test's ``tmp_path``; the test is skipped where skopeo is not
installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.oci_layout import OCI_INDEX, OCI_MANIFEST

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPT = f"{OCI_MANIFEST}, {OCI_INDEX}, {DOCKER_MANIFEST}, {DOCKER_LIST}"
SKOPEO_TIMEOUT = 180.0


class Skopeo:
    """``skopeo`` isolated from the host's policy, registries.conf and credentials."""

    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.policy = home / "policy.json"
        self.policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        (home / "registries.conf").write_text("")
        (home / "auth.json").write_text("{}")
        (home / "tmp").mkdir(exist_ok=True)
        self.env = {
            **os.environ,
            "CONTAINERS_REGISTRIES_CONF": str(home / "registries.conf"),
            "REGISTRY_AUTH_FILE": str(home / "auth.json"),
            "TMPDIR": str(home / "tmp"),
        }
        self.tmpdir = home / "tmp"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["skopeo", "--policy", str(self.policy), "--tmpdir", str(self.tmpdir), *args]
        result = subprocess.run(
            argv, check=False, capture_output=True, text=True, env=self.env, timeout=SKOPEO_TIMEOUT
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"{' '.join(argv)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-8000:]}"
            )
        return result

    def copy(self, source: str, destination: str, *flags: str) -> subprocess.CompletedProcess[str]:
        return self.run(
            "copy", "--src-tls-verify=false", "--dest-tls-verify=false", *flags, source, destination
        )


@pytest.fixture
def skopeo(tmp_path: Path) -> Skopeo:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo not installed (Debian package skopeo; tests/run.sh installs it)")
    return Skopeo(tmp_path / "skopeo")
