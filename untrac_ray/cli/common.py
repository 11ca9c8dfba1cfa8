"""What every command of the CLI shares: the consoles, the one way an error ends a command
(one line, the exit code of docs/cli.md), and the options that mean the same everywhere.

Exit codes: 0 done; 1 the job failed while it ran; 2 bad input or usage (a spec, data, model,
store or cluster that cannot work, nothing to resume, an unknown option); 3 a followed cluster
job was stopped; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err_console = Console(stderr=True)
# Piped or written to a file, tables keep every value whole (no terminal width to fit).
PIPED_WIDTH = 400
out_console = Console() if Console().is_terminal else Console(width=PIPED_WIDTH)

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def escape_unprintable() -> None:
    """On a stdout or stderr whose encoding is not UTF-8 (a C/POSIX locale: ASCII), print
    the characters it cannot hold as backslash escapes (a dataset named Caf\\xe9) instead of
    failing the command at its first print. Files the CLI writes are UTF-8 whatever the
    locale."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding not in ("utf8", "utf_8") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")

JobFile = Annotated[Path, typer.Argument(help="the job spec (YAML)", show_default=False)]
TrackingUri = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                 "then the spec's tracking.uri, then sqlite:///mlflow.db)", show_default=False),
]
Address = Annotated[
    str | None,
    typer.Option("--address", help="Ray cluster address (default: the spec's, else local Ray)",
                 show_default=False),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress on stderr")]
Settings = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY.PATH=VALUE", show_default=False,
                 help="override a setting of the job file (repeatable; VALUE read as YAML), "
                 "e.g. --set methods.untrac.learning_rate=1e-4 --set data.train.0.max_rows=500"),
]


def fail(err: Exception) -> typer.Exit:
    """Print an error in one line and end the command with its exit code (2 unless the
    error says otherwise: inputs/errors.py)."""
    err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    return typer.Exit(code=getattr(err, "exit_code", 2))
