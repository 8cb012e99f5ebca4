"""bench/soak.py runs end to end: a short soak of a real server, read back as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_a_short_soak_has_no_5xx_no_wrong_bodies_and_gives_back_its_fds() -> None:
    command = [sys.executable, str(BENCH / "soak.py"), "--clients", "20", "--duration", "3"]
    command += ["--warmup", "1", "--procs", "1", "--json", "-"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    result = json.loads(done.stdout[done.stdout.index("{") :])

    assert result["requests"] > 100, result
    assert set(result["latency"]) == {"manifest", "blob", "range", "head", "push", "slow"}
    assert result["verdicts"]["no_5xx"] and result["verdicts"]["no_wrong_bodies"], result
    assert result["verdicts"]["fds_back"], result["server"]
