"""What a TensorRT ahead-of-time plugin must pass: the PTX parameter list of each kernel.

The plugin launches the PTX with its inputs, int32 scalars and outputs, in declaration order.
Triton >= 3.5 appends hidden pointer parameters (global and profile scratch) after them; this
test records that list, so a Triton upgrade that changes it fails here, not in an engine.
Compiling to PTX needs no GPU (Triton's bundled LLVM NVPTX backend). It runs in a subprocess:
the other kernel tests set TRITON_INTERPRET, under which kernels cannot be compiled."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HIDDEN = 2  # Triton 3.5+ scratch pointers after the declared parameters
KERNELS = {
    "rms_norm_kernel": (["*fp16", "*fp16", "i32", "i32", "i32", "*fp16"], {"HAS_WEIGHT": True}),
    "crms_norm_kernel": (["*bf16", "*bf16", "i32", "i32", "i32", "*bf16"], {"HAS_WEIGHT": True}),
    "add_rms_norm_kernel": (["*fp16", "*fp16", "*fp16", "i32", "i32", "i32", "i32", "i32", "*fp16", "*fp16"],
                            {"HAS_WEIGHT": True}),
    "layer_norm_kernel": (["*fp32", "*fp32", "*fp32", "i32", "i32", "i32", "*fp32"], {}),
}
COMPILE = """
import json, re, sys, triton
from triton.backends.compiler import GPUTarget
from normopt.plugins.kernels import norms
out = {}
for name, (types, extra) in json.loads(sys.argv[1]).items():
    fn = getattr(norms, name)
    params = [p for p in fn.arg_names if p not in ("EPS", "BLOCK", "HAS_WEIGHT", "ONE_PASS")]
    for one_pass in (True, False):
        consts = {"EPS": 1e-6, "BLOCK": 1024, "ONE_PASS": one_pass, **extra}
        sig = dict(zip(params, types)) | {k: "constexpr" for k in consts}
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        entry = re.search(r"\\.entry\\s+(\\w+)\\s*\\((.*?)\\)", ptx, re.S)
        out[f"{name} one_pass={one_pass}"] = [entry.group(1), [p.split()[1] for p in entry.group(2).split(",")]]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(KERNELS)], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"cannot compile PTX with this Triton build: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_ptx_parameters_are_declared_order_then_hidden_scratch(compiled, name, one_pass):
    entry, kinds = compiled[f"{name} one_pass={one_pass}"]
    assert entry == name
    declared = [".u64" if t.startswith("*") else ".u32" for t in KERNELS[name][0]]
    assert kinds == declared + [".u64"] * HIDDEN, kinds
