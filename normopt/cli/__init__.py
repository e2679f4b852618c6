"""normopt command line: inspect, rewrite, verify, recalibrate, profile, build, passes.

A thin layer over the Python API (normopt.api): each command parses its strings, calls the API
and renders the result (normopt.cli.render); normopt.cli.application holds the error contract.
"""

from normopt.cli import commands  # noqa: F401  (registers every command on the app)
from normopt.cli.application import app, main

__all__ = ["app", "main"]
