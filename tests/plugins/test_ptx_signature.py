"""What a TensorRT ahead-of-time plugin embeds: each kernel compiled to PTX (normopt.plugins.
kernels.aot), for the one-pass (row in registers) and the chunked path.

- The PTX parameter list: the declared inputs, int32 scalars and outputs in order, then the
  hidden scratch pointers Triton >= 3.5 appends; a Triton upgrade that changes it fails here,
  not in an engine.
- With alignment declared (TensorRT's dense, aligned tensors), the one-pass kernels move the
  minimal bytes in 16-byte vectors: each input row read once, each output written once.

Compiling to PTX needs no GPU (Triton's bundled LLVM NVPTX backend). It runs in a subprocess:
the other kernel tests set TRITON_INTERPRET, under which kernels cannot be compiled."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HIDDEN = 2  # Triton 3.5+ scratch pointers after the declared parameters
# kernel: (dtype, declared parameter kinds, row inputs (weight/bias included), row outputs)
KERNELS = {
    "rms_norm_kernel": ("float16", "ppiiip", 2, 1),
    "crms_norm_kernel": ("bfloat16", "ppiiip", 2, 1),
    "add_rms_norm_kernel": ("float16", "pppiiiiipp", 3, 2),
    "layer_norm_kernel": ("float32", "pppiiip", 3, 1),
}
N_COLS, BLOCK, WARPS = 4096, 4096, 8
COMPILE = """
import json, sys
from normopt.plugins.kernels import aot
out = {}
for name, (dtype, *_) in json.loads(sys.argv[1]).items():
    for one_pass in (True, False):
        config = (4096, 8) if one_pass else (1024, 4)
        k = aot.compile_ptx(name, dtype, 4096, config=config)
        out[f"{name} one_pass={one_pass}"] = [k.name, k.params, aot.global_accesses(k.ptx)]
    k = aot.compile_ptx(name, dtype, 4096, config=(4096, 8), aligned=False)
    out[f"{name} unaligned"] = [k.name, k.params, aot.global_accesses(k.ptx)]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
        "TRITON_DEFAULT_FP_FUSION": "1"
    }
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps(KERNELS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.skip(
            f"cannot compile PTX with this Triton build: {proc.stderr.strip().splitlines()[-1]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["one_pass=True", "one_pass=False", "unaligned"])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_ptx_parameters_are_declared_order_then_hidden_scratch(compiled, name, variant):
    entry, kinds, _ = compiled[f"{name} {variant}"]
    assert entry == name
    declared = [".u64" if c == "p" else ".u32" for c in KERNELS[name][1]]
    assert kinds == declared + [".u64"] * HIDDEN, kinds


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_one_pass_moves_minimal_bytes_in_16_byte_vectors(compiled, name):
    dtype, _, inputs, outputs = KERNELS[name]
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    per_row = N_COLS * itemsize // (16 * 32 * WARPS)  # 16-byte accesses per thread for one row
    _, _, accesses = compiled[f"{name} one_pass=True"]
    assert accesses == {
        "ld.global.v4.b32": inputs * per_row,
        "st.global.v4.b32": outputs * per_row,
    }, accesses


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_chunked_path_rereads_rows_and_unaligned_is_scalar(compiled, name):
    """Why the one-pass path and the alignment promise exist: without them, more accesses."""
    _, _, inputs, _ = KERNELS[name]
    chunked = compiled[f"{name} one_pass=False"][
        2
    ]  # (1024, 4): one 16-byte access per input per chunk
    assert chunked["ld.global.v4.b32"] > inputs  # some row is loaded again in a later loop
    unaligned = compiled[f"{name} unaligned"][2]
    one_pass = sum(compiled[f"{name} one_pass=True"][2].values())
    assert not any(".v" in op for op in unaligned) and sum(unaligned.values()) > one_pass
