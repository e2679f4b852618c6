"""`normopt build` without TensorRT (this workplace, CI): one line naming what to install, exit 2,
no traceback, nothing written; and the parts that need no TensorRT: the optimization profiles."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from normopt.engine.build import profile_shapes
from normopt.errors import BadInput

NO_TENSORRT = importlib.util.find_spec("tensorrt") is None
needs_no_tensorrt = pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")


def normopt(*args):
    return subprocess.run([sys.executable, "-m", "normopt", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@needs_no_tensorrt
@pytest.mark.parametrize("command", [["build", "{model}", "{out}"], ["build", "{model}", "{out}", "--json"],
                                     ["profile", "{model}", "--backend", "tensorrt"]])
def test_tensorrt_commands_without_tensorrt_say_so_in_one_line(corpus, tmp_path, command):
    model, out = corpus("gpt2-ts17").model, tmp_path / "model.engine"
    done = normopt(*(c.format(model=model, out=out) for c in command))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "needs TensorRT" in line and "pip install 'normopt[tensorrt]'" in line
    assert not out.exists()
    if "--json" in command:
        doc = json.loads(done.stdout)
        assert doc["command"] == "build" and doc["exit_code"] == 2 and "needs TensorRT" in doc["error"]


def test_profiles_from_static_dims_named_dims_and_shapes():
    inputs = {"ids": ["batch", 8], "mask": [2, 8]}
    assert profile_shapes(inputs, {}, {"batch": 4}) == {"ids": ((4, 8),) * 3, "mask": ((2, 8),) * 3}
    given = {"ids": ((1, 8), (4, 8), (16, 8))}
    assert profile_shapes(inputs, given, {})["ids"] == ((1, 8), (4, 8), (16, 8))
    with pytest.raises(BadInput, match="input 'ids' has a dynamic dim 'batch': give --shape ids:MIN/OPT/MAX"):
        profile_shapes(inputs, {}, {})
