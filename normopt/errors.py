"""Errors a user can act on, each with the exit code the CLI contract gives it.

Exit codes (stable; users' CI scripts depend on them):
  0 success, 1 verification failed, 2 bad input or usage, 3 a requested pass applied nowhere,
  4 internal error (a bug in normopt: rerun with --debug and report it).
"""

from __future__ import annotations


class NormoptError(Exception):
    """A failure explained in one line; never shown with a traceback."""

    exit_code = 2


class BadInput(NormoptError):
    exit_code = 2


class VerificationFailed(NormoptError):
    exit_code = 1


class NotApplied(NormoptError):
    exit_code = 3


class InternalError(NormoptError):
    """normopt produced something invalid: a bug, reported as one (never as a user error)."""

    exit_code = 4
