#!/usr/bin/env python3
"""Summarise a py-spy ``--format raw`` profile (collapsed stacks, one ``a;b;c N`` a line).

Prints samples per thread, then the functions with the most self samples and the
most inclusive samples, as a share of the samples of the chosen threads:

    python bench/profile_summary.py /tmp/prof/manifest.txt [--thread MainThread] [--top 25]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_LINE_NO = re.compile(r":\d+\)$")


def frame_name(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``: one entry per function."""
    frame = _LINE_NO.sub(")", frame.strip())
    head, sep, where = frame.partition(" (")
    if not sep:
        return frame
    parts = where.rstrip(")").split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else parts[0]
    return f"{head} ({short})"


def parse(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def thread_of(frames: list[str]) -> tuple[str, list[str]]:
    """Split off py-spy's ``process ...`` and ``thread (...)`` pseudo-frames."""
    rest = [f for f in frames if not f.startswith("process ")]
    if rest and rest[0].startswith("thread "):
        return rest[0], rest[1:]
    return "?", rest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("profile", type=Path)
    p.add_argument("--thread", help="only threads whose pseudo-frame contains this text")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    stacks = parse(args.profile)
    if not stacks:
        print(f"{args.profile}: no samples (is it --format raw?)", file=sys.stderr)
        return 1
    per_thread: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for frames, count in stacks:
        thread, frames = thread_of(frames)
        per_thread[thread] += count
        if args.thread and args.thread not in thread:
            continue
        total += count
        names = [frame_name(f) for f in frames]
        if names:
            self_time[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    grand = sum(per_thread.values())
    print(f"{grand} samples in {len(per_thread)} threads")
    for thread, count in per_thread.most_common(12):
        print(f"  {count / grand:6.1%}  {thread}")
    print(f"\nself (of {total} samples{' in ' + args.thread if args.thread else ''}):")
    for name, count in self_time.most_common(args.top):
        print(f"  {count / total:6.1%}  {name}")
    print("\ninclusive:")
    for name, count in inclusive.most_common(args.top):
        print(f"  {count / total:6.1%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
