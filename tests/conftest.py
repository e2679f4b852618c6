from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the models/ package lives beside normopt/, not inside it


def pytest_configure(config):
    """Tests run onnx.checker on graphs with onnxruntime's contrib norms themselves."""
    from normopt.rewriter import ort_ops

    ort_ops.register()


@pytest.fixture(scope="session")
def corpus():
    """corpus(name) -> Paths of a built corpus model (built once, then cached on disk).
    NORMOPT_NO_CORPUS=1 (.ci/run's lowest-versions run) skips the tests that need one: the
    corpus is exported and checked with the newest dependencies."""
    if os.environ.get("NORMOPT_NO_CORPUS") == "1":
        pytest.skip("NORMOPT_NO_CORPUS=1: no corpus models in this run")
    from models.corpus import build

    return build


@pytest.fixture
def cli_env():
    """Environment for running `normopt` in a subprocess (no terminal spinner, wide output)."""
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
