"""normopt command line: inspect, rewrite, verify, recalibrate, profile, build, passes.

A thin layer over the Python API (normopt.api): each command parses its strings, calls the API
and renders the result (normopt.cli.render); normopt.cli.application holds the error contract.
Importing this package is cheap: `main` holds SIGTERM and SIGINT back while it imports the
application and the libraries it runs on (a signal inside a C extension's import turns into its
ImportError), then takes them as a clean exit: 143 / 130, one line, no traceback.
"""

from __future__ import annotations

import signal

__all__ = ["app", "main"]

_HELD = {signal.SIGTERM, signal.SIGINT}


def main() -> None:
    hold = hasattr(signal, "pthread_sigmask")  # POSIX; elsewhere the defaults stay until then
    if hold:
        signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    import numpy  # noqa: F401  (the heavy imports every command makes, while signals wait)
    import onnx  # noqa: F401
    import onnx_ir  # noqa: F401
    import onnxruntime  # noqa: F401

    import normopt.api  # noqa: F401
    from normopt.cli import application, commands  # noqa: F401  (commands register themselves)

    application.main(
        release=(lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)) if hold else None
    )


def __getattr__(name: str):
    if name == "app":  # the Typer app, with every command registered
        from normopt.cli import application, commands  # noqa: F401

        return application.app
    raise AttributeError(f"module 'normopt.cli' has no attribute {name!r}")
