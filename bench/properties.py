#!/usr/bin/env python3
"""The property-based tests of the API surface (``tests/test_properties.py``) with a
longer profile than CI's: more generated examples per endpoint, against the same running
regmirror process, with the same properties (no 5xx, the spec's error envelope, nothing
outside the data directory touched, the store re-hashes clean).

    python bench/properties.py                   # 5,000 examples per test
    python bench/properties.py --examples 20000 --timeout 3600

Prints pytest's summary and the wall time; the exit code is pytest's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=5000, help="examples per test (5000)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before giving up (1800)")
    args = p.parse_args(argv)
    env = {**os.environ, "REGMIRROR_PROPERTY_EXAMPLES": str(args.examples)}
    started = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    try:
        done = subprocess.run(
            [*command, "tests/test_properties.py"],
            check=False,
            cwd=ROOT,
            env=env,
            timeout=args.timeout,
        )
    except subprocess.TimeoutExpired:
        print(f"properties: gave up after {args.timeout:.0f} s", file=sys.stderr)
        return 1
    print(f"properties: {args.examples} examples per test in {time.monotonic() - started:.0f} s")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
