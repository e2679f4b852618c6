"""One JSON document shape for every command's machine output (`--json` on stdout, `--report
FILE`), versioned: `schema_version`, `command`, the versions that produced it, when, whether it
succeeded (`ok`, `exit_code`, `error`), the seconds its steps took, the inputs it ran on (source,
seed, and per input draw each array's dtype, shape and sha256), then the command's own fields.
The JSON Schema is `normopt/report.schema.json` (`schema()`); a change that breaks a reader of
version N bumps SCHEMA_VERSION.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import metadata
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1
COMMANDS = ("inspect", "rewrite", "verify", "profile", "passes", "recalibrate", "build")


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


@cache
def versions() -> dict[str, str | None]:
    """Versions of normopt and what it runs on, read from the installed metadata (imports
    nothing)."""
    return {
        "normopt": _version("normopt"),
        "python": platform.python_version(),
        "onnx": _version("onnx"),
        "onnx_ir": _version("onnx-ir", "onnx_ir"),
        "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
        "numpy": _version("numpy"),
        "platform": platform.platform(),
    }


def inputs_json(
    trials: Sequence[Mapping[str, np.ndarray]], source: object, seed: int, cache: str | None = None
) -> dict:
    """The input sets a command ran on: where they came from (`generated`, the .npz path, or
    `given` for arrays passed from Python), the seed of generated ones, per draw each array's
    dtype, shape and sha256 of its bytes (C order), and for a decoder how its cache was tied."""
    generated = source is None
    extra = {"cache": cache} if cache is not None else {}
    return {
        "source": "generated"
        if generated
        else str(source)
        if isinstance(source, (str, os.PathLike))
        else "given",
        "seed": seed if generated else None,
        "trials": [
            {
                name: {
                    "dtype": str(a.dtype),
                    "shape": list(a.shape),
                    "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest(),
                }
                for name, a in feeds.items()
            }
            for feeds in trials
        ],
    } | extra


def _plain(value):
    """JSON-safe: NaN and infinities become null (strict parsers reject them), numpy scalars
    and paths plain values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def now() -> str:
    """The `created` stamp: UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def document(
    command: str,
    body: Mapping,
    *,
    exit_code: int = 0,
    error: str | None = None,
    seconds: Mapping[str, float] | None = None,
    inputs: dict | None = None,
    created: str | None = None,
) -> dict:
    """The versioned envelope around a command's own fields; `created` (default: now) lets
    every copy of one report (the --report file, stdout) carry the same stamp."""
    assert command in COMMANDS, command
    head = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "versions": versions(),
        "created": created or now(),
        "ok": exit_code == 0,
        "exit_code": exit_code,
        "error": error,
        "seconds": dict(seconds or {}),
        "inputs": inputs,
    }
    return _plain({**head, **body})


@cache
def schema() -> dict:
    """The JSON Schema every document validates against."""
    return json.loads((Path(__file__).parent / "report.schema.json").read_text())
