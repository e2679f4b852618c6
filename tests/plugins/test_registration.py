"""The TensorRT registration up to the TensorRT call: what aot_impl returns per plugin, dtype
and tactic (PTX compiled for sm_90 on CPU, in a subprocess: the kernel tests set
TRITON_INTERPRET, under which kernels cannot be compiled), against the plugin specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from normopt.plugins.spec import ADD_RMS_NORM, PLUGINS, parse_version, target_version  # noqa: E402

PLANS = """
import json, re
from normopt.plugins.registration import launch_plan, tactics
from normopt.plugins.spec import PLUGINS
out = []
for op_type, spec in PLUGINS.items():
    for dtype in ("float32", "float16", "bfloat16"):
        for tactic in tactics(767):
            plan = launch_plan(spec, dtype, 767, 1e-5, tactic)
            entry = re.search(r"\\.entry\\s+(\\w+)\\s*\\((.*?)\\)", plan.ptx, re.S)
            reqntid = re.search(r"\\.reqntid\\s+(\\d+)", plan.ptx)
            out.append([op_type, dtype, tactic, plan.kernel == entry.group(1),
            len(entry.group(2).split(",")),
                        plan.block_x, int(reqntid.group(1)), list(plan.scalars)])
print(json.dumps(out))
"""


def test_every_plugin_dtype_and_tactic_compiles_to_a_launchable_ptx():
    """CRMSNorm's odd width d-1 = 767; every tactic of every plugin and dtype: the entry TensorRT
    launches, its thread count, and the parameters: input pointers, the int32 scalars (width,
    row pitches), output pointers, then Triton's two hidden scratch pointers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", PLANS], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    plans = json.loads(done.stdout)
    assert len(plans) == len(PLUGINS) * 3 * len({p[2] for p in plans})
    for op_type, _dtype, _tactic, named, params, block_x, reqntid, scalars in plans:
        spec = PLUGINS[op_type]
        assert named and block_x == reqntid
        assert scalars == [767] * (5 if spec is ADD_RMS_NORM else 3)
        assert params == len(spec.inputs) + len(scalars) + len(spec.outputs) + 2


def test_versions():
    assert parse_version("10.9.0.34") == (10, 9) and parse_version("11") == (11, 0)
    with pytest.raises(ValueError, match="need >= 10.9"):
        parse_version("10.8")
    with pytest.raises(ValueError, match="no TensorRT version"):
        parse_version("ten")
    assert target_version("10.15") == (10, 15)
