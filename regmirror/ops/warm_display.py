"""What ``regmirror warm`` shows a person: live bars on a terminal, plain lines elsewhere.

On a terminal (rich): a bar per image and one for the total, with bytes, rate and ETA,
then a summary table. Elsewhere (a log, CI, a pipe): one line when an image's manifests
are read, one when it is done or failed, a total line at most every ``PLAIN_INTERVAL``
seconds, then one summary line per image. Both implement
:class:`~regmirror.ops.warm.WarmProgress`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from regmirror.ops.units import size_text
from regmirror.ops.warm import ImageResult

PLAIN_INTERVAL = 10.0  # seconds between total lines when not on a terminal


class TerminalProgress:
    """Live bars; use as a context manager around the warm."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.total = self.progress.add_task("total", total=0)
        self._tasks: dict[int, TaskID] = {}

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def planned(self, image: ImageResult) -> None:
        self._tasks[id(image)] = self.progress.add_task(image.reference, total=image.total_bytes)
        total = self.progress.tasks[self.total].total or 0
        self.progress.update(self.total, total=total + image.total_bytes)

    def advanced(self, image: ImageResult, nbytes: int) -> None:
        task = self._tasks.get(id(image))
        if task is not None:
            self.progress.advance(task, nbytes)
        self.progress.advance(self.total, nbytes)

    def finished(self, image: ImageResult) -> None:
        """The image's bar gives way to one line above the bars, so that only the images
        still downloading (and the total) stay live, however long the list."""
        task = self._tasks.pop(id(image), None)
        if task is not None:
            self.progress.remove_task(task)
        line = Text.assemble(("✓ ", "green"), image.reference, f": {_amount(image)}")
        if not image.ok:
            line = Text.assemble(("✗ ", "red"), image.reference, ": ", (str(image.error), "red"))
        self.progress.console.print(line)


class PlainProgress:
    """Lines for logs and pipes: nothing that redraws."""

    def __init__(self, console: Console):
        self.console = console
        self.started = time.monotonic()
        self.total = 0
        self.done = 0
        self._said = self.started

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def planned(self, image: ImageResult) -> None:
        self.total += image.total_bytes
        platforms = f" ({', '.join(image.platforms)})" if image.platforms else ""
        self._say(
            f"{image.reference}: {image.manifests} manifests{platforms}, {image.blobs} blobs, "
            f"{size_text(image.total_bytes)}"
        )

    def advanced(self, image: ImageResult, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if now - self._said >= PLAIN_INTERVAL:
            self._said = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            self._say(
                f"total: {size_text(self.done)} of {size_text(self.total)}, "
                f"{size_text(int(rate))}/s, about {eta:.0f}s left"
            )

    def finished(self, image: ImageResult) -> None:
        if image.ok:
            self._say(f"{image.reference}: warm, {_amount(image)}")
        else:
            self._say(f"{image.reference}: FAILED: {image.error}")

    def _say(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def print_summary(console: Console, results: Sequence[ImageResult], seconds: float) -> None:
    """A table on a terminal; one grep-able line per image elsewhere. Then the totals."""
    failed = [r for r in results if not r.ok]
    if console.is_terminal:
        table = Table(title="regmirror warm")
        for column in ("image", "result", "platforms", "manifests", "blobs", "bytes", "time"):
            table.add_column(column, justify="right" if column in ("blobs", "bytes") else "left")
        for r in results:
            table.add_row(
                r.reference,
                Text("warm", "green") if r.ok else Text(f"FAILED: {r.error}", "red"),
                ", ".join(r.platforms) or "-",
                str(r.manifests),
                str(r.blobs),
                size_text(r.total_bytes),
                f"{r.seconds:.1f}s",
            )
        console.print(table)
    else:
        for r in results:
            state = "warm  " if r.ok else "FAILED"
            detail = _amount(r) if r.ok else str(r.error)
            console.print(
                f"{state} {r.reference}: {detail}", markup=False, highlight=False, soft_wrap=True
            )
    total = sum(r.total_bytes for r in results if r.ok)
    console.print(
        f"{len(results) - len(failed)} of {len(results)} images warm, {size_text(total)} "
        f"in {seconds:.1f}s"
        + (f"; failed: {', '.join(r.reference for r in failed)}" if failed else ""),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _amount(image: ImageResult) -> str:
    rate = image.total_bytes / image.seconds if image.seconds > 0 else 0.0
    return (
        f"{image.manifests} manifests, {image.blobs} blobs, {size_text(image.total_bytes)} "
        f"in {image.seconds:.1f}s ({size_text(int(rate))}/s)"
    )
