"""Progress on stderr that a user can follow: rich bars with the time remaining when stderr is a
terminal; otherwise (a log file, CI, nohup) a plain line at least every `LINE_SECONDS` seconds while a
stage runs, with the stage, step, loss and time remaining, and one line when it ends."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

LINE_SECONDS = 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@dataclass
class _Task:
    description: str
    total: int
    done: int = 0
    started: float = 0.0
    last_line: float = 0.0
    rich_id: object = None


class Progress:
    """Progress bars on a terminal, plain periodic lines elsewhere; nothing when disabled."""

    def __init__(self, enabled: bool = True, line_seconds: float = LINE_SECONDS, clock=time.monotonic):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.line_seconds = line_seconds
        self.clock = clock
        self._progress = None

    def __enter__(self):
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self._progress = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                          TextColumn("remaining"), TimeRemainingColumn(), console=self.console,
                                          transient=True)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress:
            self._progress.__exit__(*exc)
            self._progress = None

    def task(self, description: str, total: int) -> _Task:
        now = self.clock()
        task = _Task(description, total, started=now, last_line=now)
        if self._progress:
            task.rich_id = self._progress.add_task(description, total=total, info="")
        return task

    def update(self, task: _Task, advance: int = 1, info: str = "") -> None:
        task.done += advance
        if self._progress:
            self._progress.update(task.rich_id, advance=advance, info=info)
            return
        now = self.clock()
        if self.enabled and not self.live and now - task.last_line >= self.line_seconds and task.done < task.total:
            task.last_line = now
            self.log(self.status_line(task, info, now))

    def status_line(self, task: _Task, info: str, now: float) -> str:
        elapsed = now - task.started
        remaining = elapsed / task.done * (task.total - task.done) if task.done else None
        left = f", about {_duration(remaining)} left" if remaining is not None else ""
        info = f", {info}" if info else ""
        return f"{task.description}: step {task.done}/{task.total}{info} ({_duration(elapsed)} so far{left})"

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False, soft_wrap=True)
