"""The one progress bar: on stderr (rich), over steps or bytes, or nothing when progress is off."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn,
    TransferSpeedColumn,
)


DESCRIPTION_WIDTH = 28  # with the bar, the count, a status such as "tg d4096 123.4 t/s" and the time
BAR_WIDTH = 12  # left, a line fits 80 columns


def fit(text: str, width: int) -> str:
    """``text``, or its start and end around an ellipsis when longer than ``width``."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


class Ticker(Protocol):
    def __call__(self, advance: int = 1, status: str | None = None) -> None: ...


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool, in_bytes: bool = False) -> Iterator[Ticker]:
    """Yield ``tick(advance=1, status=None)``: moves the bar and shows ``status`` (e.g. the running PPL).

    ``in_bytes``: the total is a byte count, shown as sizes and a transfer rate, and the bar goes away
    when done. If the block fails, the bar is erased, so the failure's one-line error stands alone.
    """
    if not enabled:
        yield lambda advance=1, status=None: None
        return
    description = fit(description, DESCRIPTION_WIDTH)
    if in_bytes:
        columns = (TextColumn("{task.description}"), BarColumn(bar_width=BAR_WIDTH), DownloadColumn(), TransferSpeedColumn())
    else:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(bar_width=BAR_WIDTH),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
        )
    with Progress(*columns, console=Console(stderr=True), transient=in_bytes) as bar:
        task = bar.add_task(description, total=total, status="")

        def tick(advance: int = 1, status: str | None = None) -> None:
            if status is None:
                bar.advance(task, advance)
            else:
                bar.update(task, advance=advance, status=status)

        try:
            yield tick
        except BaseException:
            bar.live.transient = True  # a failed step leaves only its one-line error behind
            raise
