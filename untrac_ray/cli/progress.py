"""The CLI's progress display, shared by `run`, `train` (main.py) and `tune` (search.py).

Light on purpose: rich only, so that `untrac-ray --help` stays fast.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

err_console = Console(stderr=True)


class CliReporter:
    """Progress bars on stderr: training steps, then finished influence cells with an ETA.

    A context manager (the bars run between enter and exit) with the runner's reporter methods:
    stage, training_step, work_started, task_done, task_retried. `quiet` keeps the bars and
    stages off (a retried task is still named).
    """

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=err_console, disable=quiet, transient=False,
        )
        self._train = None
        self._cells = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def stage(self, message: str) -> None:
        if not self.quiet:
            self.progress.console.print(f"[cyan]>[/] {message}", highlight=False)

    def training_step(self, step: int, total: int, loss: float) -> None:
        if self._train is None or step == 1:  # a new training run (pretraining, then base)
            self._train = self.progress.add_task("training", total=total, info="")
        self.progress.update(self._train, completed=step, info=f"loss {loss:.3f}")

    def work_started(self, tasks: int, cells: int) -> None:
        self._cells_total, self._cells_done = cells, 0
        self._cells = self.progress.add_task("tasks", total=tasks, info="")

    def task_done(self, result, cells: int) -> None:
        from untrac_ray.engine.pool import describe

        self._cells_done += cells
        self.progress.update(
            self._cells, advance=1,
            info=f"cells {self._cells_done}/{self._cells_total}  {describe(result.task)} "
                 f"{result.seconds:.1f}s",
        )

    def task_retried(self, task, reason: str) -> None:
        """One line (also with --quiet): a task's actor died and the task runs again."""
        from untrac_ray.engine.pool import describe

        self.progress.console.print(f"[yellow]retrying[/] {describe(task)}: {reason}",
                                    highlight=False, soft_wrap=True)
