"""normopt command line: inspect, rewrite, verify, recalibrate, profile, build, passes.

A thin layer over the Python API (normopt.api): each command parses its strings, calls the API
and renders the result (normopt.cli.render); normopt.cli.application holds the error contract.
Importing this package is cheap: `main` installs its signal handlers before it imports the
application (onnx, onnxruntime, numpy: about a second), so a signal during those imports ends
the run with 128 + the signal's number and no traceback.
"""

from __future__ import annotations

import signal

__all__ = ["app", "main"]


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)  # nothing to clean up yet: no traceback, no "Aborted!"


def main() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    from normopt.cli import application, commands  # noqa: F401  (commands register themselves)

    application.main()


def __getattr__(name: str):
    if name == "app":  # the Typer app, with every command registered
        from normopt.cli import application, commands  # noqa: F401

        return application.app
    raise AttributeError(f"module 'normopt.cli' has no attribute {name!r}")
