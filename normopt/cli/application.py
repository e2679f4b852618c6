"""The command-line application: the Typer app, the error contract, progress, JSON output.

Results go to stdout: tables, or with --json one JSON document (normopt.schema; also on an
error, then with `error` and `exit_code`); --report FILE writes the same document to a file.
Progress, warnings and errors go to stderr. Exit codes are in normopt.errors. User errors print
one line and never a traceback (--debug shows it). Without a terminal, output wraps at 160
columns (nothing cut to 80), tables are ASCII, and progress is a periodic line.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from normopt import __version__
from normopt.errors import NormoptError
from normopt.schema import document

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # plain help, no boxes: readable piped and in 80 columns (Click's layout, wrapped at 100)
    rich_markup_mode=None,
    context_settings={"max_content_width": 100},
    help="Exact norm rewrites for ONNX graphs.",
)


LOG_WIDTH = 160  # without a terminal (CI logs, pipes): lines wrap here, whatever COLUMNS says


class _Console(Console):
    """Tables wrap their cells, never cut them ("hidden_s…", names cut to one prefix); without
    a terminal they are drawn in ASCII."""

    def print(self, *objects, **kwargs) -> None:
        for table in objects:
            if isinstance(table, Table):
                for column in table.columns:
                    column.overflow = "fold"
                if not self.is_terminal:
                    table.box = box.ASCII
        super().print(*objects, **kwargs)


def _console(stderr: bool = False) -> Console:
    """Rich on a terminal; without one (CI logs, pipes) at LOG_WIDTH columns whatever COLUMNS
    says: stdout wraps there, stderr's lines (one line per error) are never wrapped."""
    console = _Console(stderr=stderr, soft_wrap=stderr)
    if console.is_terminal:
        return console
    return _Console(stderr=stderr, soft_wrap=stderr, width=LOG_WIDTH)


out = _console()
err = _console(stderr=True)
HEARTBEAT_S = 10.0
INTERNAL_ERROR = 4


class Terminated(BaseException):
    """SIGTERM or SIGINT, raised where Python runs next, so every cleanup runs; not a
    KeyboardInterrupt, which Click turns into "Aborted!" and exit 1 while it parses arguments."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum  # 143 for SIGTERM, 130 for SIGINT
        self.message = "terminated" if signum == signal.SIGTERM else "interrupted"


def _on_signal(signum, _frame) -> None:
    raise Terminated(signum)


def command(fn: Callable) -> Callable:
    """Register a command whose NormoptErrors become one line on stderr and an exit code (with
    --json, stdout still holds one document: the error's report where it has one)."""

    @functools.wraps(fn)
    def wrapper(*args, _context: typer.Context, **kwargs):
        debug = bool((_context.find_root().obj or {}).get("debug"))
        try:
            return fn(*args, **kwargs)
        except NormoptError as exc:
            if debug:
                raise
            err.print(f"normopt: error: {exc}", markup=False, highlight=False)
            if kwargs.get("json_out"):
                report = getattr(exc, "report", None)
                print_json(
                    report.to_json()
                    if report is not None
                    else document(fn.__name__, {}, exit_code=exc.exit_code, error=str(exc))
                )
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("normopt: interrupted")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if debug:
                raise
            err.print(
                f"normopt: internal error: {type(exc).__name__}: {exc} "
                "(a bug in normopt; rerun with --debug for the traceback)",
                markup=False,
                highlight=False,
            )
            raise typer.Exit(INTERNAL_ERROR) from None

    signature = inspect.signature(fn, eval_str=True)
    context = inspect.Parameter(
        "_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context
    )
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), context])
    first = " ".join((fn.__doc__ or "").split()).split(". ")[0].rstrip(".")
    return app.command(short_help=first)(wrapper)  # the command list shows it uncut


@contextlib.contextmanager
def progress(first: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr naming the current step; without a terminal, a line on stderr every
    HEARTBEAT_S seconds naming the step still running (a quick run, or a quick error, prints
    none: an error stays one line)."""
    if err.is_terminal:
        with err.status(first) as status:
            yield lambda msg: status.update(msg)
        return
    current, done, start = [first], threading.Event(), time.monotonic()

    def heartbeat() -> None:
        while not done.wait(HEARTBEAT_S):
            err.print(
                f"normopt: {current[0]} ({time.monotonic() - start:.0f} s)",
                markup=False,
                highlight=False,
            )

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        yield lambda msg: current.__setitem__(0, msg)
    finally:
        done.set()
        thread.join()


def print_json(doc: dict) -> None:
    typer.echo(json.dumps(doc, indent=2))


@app.callback(invoke_without_command=True)
def _main(
    context: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    context.obj = {"debug": debug}
    if version:
        out.print(f"normopt {__version__}")
        raise typer.Exit(0)


def _debug_first(args: list[str]) -> list[str]:
    """`--debug` is an option of normopt itself; accepted after the command too (the
    internal-error hint says "rerun with --debug")."""
    if "--debug" in args[1:]:
        args = ["--debug", *(a for a in args if a != "--debug")]
    return args


# Click's base exception: typer >= 0.2x vendors click (typer._click), older typer uses click
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main(release: Callable[[], object] | None = None) -> None:
    """The console entry point (after normopt.cli.main's imports): SIGTERM and SIGINT, held
    back until `release` runs, and from then on (argument parsing included) end with exit
    143 / 130 and one line, never a traceback."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        if release is not None:
            release()  # a signal that came during the imports is raised here
        code = app(args=_debug_first(sys.argv[1:]), prog_name="normopt", standalone_mode=False)
    except _CLICK_ERROR as exc:  # a usage error: one line, not Click's box
        where = getattr(getattr(exc, "ctx", None), "command_path", None) or "normopt"
        if exc.format_message():  # none after the help no arguments print
            err.print(
                f"normopt: error: {exc.format_message()} (see '{where} --help')",
                markup=False,
                highlight=False,
            )
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        err.print("normopt: aborted")
        raise SystemExit(1) from None
    except Terminated as exc:  # wherever it arrived, cleanups ran on the way out
        err.print(f"normopt: {exc.message}")
        raise SystemExit(exc.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)  # typer.Exit's code (--help: 0)
