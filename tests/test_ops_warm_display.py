"""What ``regmirror warm`` prints where nothing redraws (logs, CI, pipes), and its
argument checks, which need no server."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from regmirror.cli import main
from regmirror.ops import warm_display
from regmirror.ops.warm import ImageResult
from regmirror.ops.warm_display import PlainProgress, print_summary


def plain() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, force_terminal=False), out


def test_plain_lines_say_what_each_image_is_and_how_it_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(warm_display, "PLAIN_INTERVAL", 0.0)  # a total line on every advance
    console, out = plain()
    progress = PlainProgress(console)
    good = ImageResult("library/alpine:3.19", platforms=["linux/amd64"], manifests=2, blobs=3)
    good.total_bytes = 3 * 1024 * 1024
    bad = ImageResult("team/gone:1", error="no manifest team/gone:1 at http://127.0.0.1:5000")

    progress.planned(good)
    progress.advanced(good, 1024 * 1024)
    good.seconds = 2.0
    progress.finished(good)
    progress.finished(bad)

    lines = out.getvalue().splitlines()
    assert lines[0] == "library/alpine:3.19: 2 manifests (linux/amd64), 3 blobs, 3.0 MiB"
    assert lines[1].startswith("total: 1.0 MiB of 3.0 MiB, ")
    assert lines[2] == (
        "library/alpine:3.19: warm, 2 manifests, 3 blobs, 3.0 MiB in 2.0s (1.5 MiB/s)"
    )
    assert lines[3] == "team/gone:1: FAILED: no manifest team/gone:1 at http://127.0.0.1:5000"


def test_the_plain_summary_has_one_line_per_image_and_names_the_failures() -> None:
    console, out = plain()
    good = ImageResult("a/b:1", manifests=1, blobs=2, total_bytes=2048, seconds=1.0)
    bad = ImageResult("c/d:2", error="denied")
    print_summary(console, [good, bad], 3.25)
    assert out.getvalue().splitlines() == [
        "warm   a/b:1: 1 manifests, 2 blobs, 2.0 KiB in 1.0s (2.0 KiB/s)",
        "FAILED c/d:2: denied",
        "1 of 2 images warm, 2.0 KiB in 3.2s; failed: c/d:2",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["warm"], "no images given"),
        (["warm", "--creds", "no-colon", "a/b:1"], "USER:PASSWORD"),
        (["warm", "--jobs", "0", "a/b:1"], "--jobs"),
        (["warm", "--from", "/nonexistent/list.txt"], "No such file"),
    ],
)
def test_bad_arguments_are_exit_2_before_any_request(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main([*args, "--url", "http://127.0.0.1:1"]) == 2
    assert message in capsys.readouterr().err
