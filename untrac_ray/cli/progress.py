"""The CLI's progress display, shared by `run`, `train` (main.py) and `tune` (search.py).

On a terminal: live bars on stderr. Anywhere else (a file, a pipe, a cluster job's log,
`nohup`, CI): plain lines, whole, as they happen: a tokenizing line per dataset (rows, tokens,
rows/s and tokens/s, ETA when its rows are known) and a training line (step of total, loss,
tokens/s, ETA) every UNTRAC_RAY_PROGRESS_S seconds and at its first and last step, a line per
finished task (method, set, seconds, cells so far, ETA), each stage and each retry. Light on
purpose: rich only, so that `untrac-ray --help` stays fast. The variable is read where a
reporter is made: a malformed value fails the command that shows progress with one line, and
never an import.
"""

from __future__ import annotations

import math
import os
import sys
import time

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from untrac_ray.cli.common import err_console

PROGRESS_ENV, PROGRESS_S = "UNTRAC_RAY_PROGRESS_S", 30.0  # seconds between training lines


def progress_interval() -> float:
    """Seconds between training lines: UNTRAC_RAY_PROGRESS_S, else 30. Raises InputError
    (one line naming the variable and its value) unless it is a number of seconds >= 0."""
    text = os.environ.get(PROGRESS_ENV)
    if text is None or not text.strip():
        return PROGRESS_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:  # not a number, NaN or negative
        from untrac_ray.inputs.errors import InputError

        raise InputError(f"{PROGRESS_ENV}={text!r}: not a number of seconds >= 0 (the time "
                         f"between training lines in a log; unset it for {PROGRESS_S:g})")
    return value


def plain_line(text: str) -> None:
    """One whole line on stderr, written at once (never wrapped or cut)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class CliReporter:
    """Progress on stderr: training steps, then finished tasks and influence cells with an ETA;
    live bars on a terminal, plain lines elsewhere (`lines`, default: stderr is not one).

    A context manager (the bars run between enter and exit) with the runner's reporter methods:
    stage, data_progress, training_step, work_started, task_done, task_retried. `quiet` keeps
    the bars, lines and stages off (a retried task is still named).
    """

    def __init__(self, quiet: bool, lines: bool | None = None) -> None:
        self.quiet = quiet
        self.lines = not err_console.is_terminal if lines is None else lines
        self.interval = progress_interval()
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=err_console, disable=quiet or self.lines,
            transient=False,
        )
        self._train = None
        self._cells = None
        self._train_started = self._last_line = 0.0
        self._train_tokens = 0
        self._data = self._data_name = None
        self._data_started = self._data_line = 0.0
        self._tasks = self._tasks_done = 0
        self._work_started = 0.0

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def say(self, text: str) -> None:
        """One plain line (in lines mode: a log), unless quiet."""
        if not self.quiet:
            plain_line(text)

    def stage(self, message: str) -> None:
        if self.lines:
            self.say(f"> {message}")
        elif not self.quiet:
            self.progress.console.print(f"[cyan]>[/] {message}", highlight=False)

    def training_step(self, step: int, total: int, loss: float, tokens: int = 0) -> None:
        now = time.monotonic()
        if step == 1:  # a new training run (pretraining, then the base model)
            self._train_started, self._train_tokens, self._last_line = now, 0, 0.0
        self._train_tokens += tokens
        if not self.lines:
            if self._train is None or step == 1:
                self._train = self.progress.add_task("training", total=total, info="")
            self.progress.update(self._train, completed=step, info=f"loss {loss:.3f}")
            return
        if step in (1, total) or now - self._last_line >= self.interval:
            self._last_line = now
            from untrac_ray.results.browse import fmt_duration

            spent = max(now - self._train_started, 1e-9)
            rate = f", {self._train_tokens / spent:,.0f} tokens/s" if step > 1 else ""
            eta = f", eta {fmt_duration(spent / step * (total - step))}" if step > 1 else ""
            self.say(f"training: step {step}/{total} ({100 * step / total:.0f}%), loss "
                     f"{loss:.4f}{rate}{eta}")

    def data_progress(self, name: str, rows_done: int, rows_total: int | None, tokens: int,
                      finished: bool = False) -> None:
        """A dataset being tokenized: rows (of the total, where known), tokens and tokens/s, an
        ETA when the total is known; lines at its first call, every interval and its end."""
        now = time.monotonic()
        if name != self._data_name:  # a new set
            self._data_name, self._data_started, self._data_line = name, now, 0.0
            self._data = None
        spent = max(now - self._data_started, 1e-9)
        rate = tokens / spent
        if not self.lines:
            if self._data is None:
                self._data = self.progress.add_task(f"tokenizing {name}", total=rows_total,
                                                    info="")
            self.progress.update(self._data, completed=rows_done,
                                 total=rows_done if finished else rows_total,
                                 info=f"{tokens:,} tokens, {rate:,.0f} tokens/s")
            return
        if finished or not self._data_line or now - self._data_line >= self.interval:
            self._data_line = now
            from untrac_ray.results.browse import fmt_duration

            of = f"/{rows_total:,}" if rows_total else ""
            rates = f", {rows_done / spent:,.0f} rows/s, {rate:,.0f} tokens/s" if rows_done else ""
            eta = ""
            if rows_total and rows_done and not finished:
                eta = f", eta {fmt_duration(spent / rows_done * (rows_total - rows_done))}"
            done = " done" if finished else ""
            self.say(f"tokenizing {name}{done}: {rows_done:,}{of} rows, {tokens:,} tokens"
                     f"{rates}{eta}")

    def work_started(self, tasks: int, cells: int) -> None:
        self._cells_total, self._cells_done = cells, 0
        self._tasks, self._tasks_done, self._work_started = tasks, 0, time.monotonic()
        if self.lines:
            self.say(f"tasks: {tasks} to run ({cells} influence cells)")
        else:
            self._cells = self.progress.add_task("tasks", total=tasks, info="")

    def task_done(self, result, cells: int) -> None:
        from untrac_ray.engine.pool import describe

        self._cells_done += cells
        self._tasks_done += 1
        if self.lines:
            from untrac_ray.results.browse import fmt_duration

            spent = time.monotonic() - self._work_started
            left = spent / self._tasks_done * (self._tasks - self._tasks_done)
            self.say(f"task {self._tasks_done}/{self._tasks} done: {describe(result.task)} "
                     f"in {result.seconds:.1f}s (cells {self._cells_done}/"
                     f"{self._cells_total}, eta {fmt_duration(left)})")
            return
        self.progress.update(
            self._cells, advance=1,
            info=f"cells {self._cells_done}/{self._cells_total}  {describe(result.task)} "
                 f"{result.seconds:.1f}s",
        )

    def task_retried(self, task, reason: str) -> None:
        """One line (also with --quiet): a task's actor died and the task runs again."""
        from untrac_ray.engine.pool import describe

        if self.lines:
            plain_line(f"retrying {describe(task)}: {reason}")
        else:
            self.progress.console.print(f"[yellow]retrying[/] {describe(task)}: {reason}",
                                        highlight=False, soft_wrap=True)
