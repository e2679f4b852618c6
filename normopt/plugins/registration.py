"""Registering normopt's plugins (`spec`) with TensorRT's Python plugin API, `tensorrt.plugin`
("QDP"), ahead of time: each plugin's kernel is compiled to PTX (`kernels.aot`) and embedded in
the engine, which then runs without Python (trtexec, C++).

Per plugin: `register` (outputs shaped like x), `autotune` (fp32 / fp16 / bf16, every I/O the
same type; one tactic per launch configuration `kernels.norms.candidates(d)`), `aot_impl`
(kernel name, PTX, launch parameters: one program per row, `num_warps * 32` threads; the int32
scalars after the input pointers: the width and each tensor's row pitch), and `impl` (just in
time: the torch launcher on TensorRT's buffers, for `normopt build --plugins jit`). QDP calls
aot_impl
with every field in registration order (docs/tensorrt_plugins.md), so each declares them all.
`launch_plan` is the part that does not need TensorRT (tested on CPU); `register` imports
`tensorrt.plugin` lazily and is idempotent.

No `from __future__ import annotations` here: QDP reads the annotations as objects.
"""

from dataclasses import dataclass
from typing import List, Tuple, Union

from normopt.plugins.spec import ADD_RMS_NORM, DOMAIN, PLUGINS, PluginSpec

DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
}  # trt.DataType name -> kernel dtype
_registered = False


@dataclass(frozen=True)
class LaunchPlan:
    kernel: str  # the PTX entry name
    ptx: str
    block_x: int  # threads per program: num_warps * 32 (the PTX's .reqntid)
    shared_bytes: int
    scalars: tuple[int, ...]  # the int32 arguments after the input pointers: width, row pitches


def tactics(n_cols: int) -> list[int]:
    """One tactic (1-based) per launch configuration normopt's kernels offer for the width."""
    from normopt.plugins.kernels.norms import candidates

    return list(range(1, len(candidates(n_cols)) + 1))


def launch_plan(
    spec: PluginSpec, dtype: str, n_cols: int, epsilon: float, tactic: int, arch: int = 90
) -> LaunchPlan:
    """What aot_impl returns for `spec` on rows of `n_cols` `dtype` values (dense rows: every
    pitch is the width)."""
    from normopt.plugins.kernels.aot import compile_ptx
    from normopt.plugins.kernels.norms import candidates

    config = candidates(n_cols)[tactic - 1]
    compiled = compile_ptx(spec.kernel, dtype, n_cols, eps=epsilon, config=config, arch=arch)
    pitches = 4 if spec is ADD_RMS_NORM else 2  # x, (residual, sum,) y
    return LaunchPlan(
        compiled.name,
        compiled.ptx,
        compiled.num_warps * 32,
        compiled.shared_bytes,
        (n_cols,) * (1 + pitches),
    )


def register() -> None:
    """Register every plugin with tensorrt.plugin (once per process)."""
    global _registered
    if _registered:
        return
    import tensorrt.plugin as trtp

    for spec in PLUGINS.values():
        _register_one(trtp, spec)
    _registered = True


def _aot_result(trtp, spec: PluginSpec, x, epsilon: float, tactic: int):
    n_cols = int(x.shape[-1])
    plan = launch_plan(spec, DTYPES[x.dtype.name], n_cols, epsilon, tactic)
    launch = trtp.KernelLaunchParams()
    launch.grid_x = x.shape_expr.numel() // n_cols  # one program per row
    launch.block_x = plan.block_x
    launch.shared_mem = plan.shared_bytes
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in plan.scalars])
    return plan.kernel.encode(), plan.ptx.encode(), launch, extra


def _run_jit(spec: PluginSpec, tensors, outputs, epsilon: float, stream: int) -> None:
    """The just-in-time implementation: the Triton kernel launched from Python on TensorRT's
    buffers and stream (an engine built so needs this module to run)."""
    import torch

    from normopt.plugins.kernels import norms

    args = [torch.as_tensor(t, device="cuda") for t in tensors]
    outs = [torch.as_tensor(t, device="cuda") for t in outputs]
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        results = getattr(norms, spec.kernel.removesuffix("_kernel"))(*args, epsilon)
        for out, result in zip(outs, results if isinstance(results, tuple) else (results,)):
            out.copy_(result)


def _register_one(trtp, spec: PluginSpec) -> None:
    name = f"{DOMAIN}::{spec.op_type}"
    types = ", ".join(["FP32|FP16|BF16"] * (len(spec.inputs) + len(spec.outputs)))
    if spec is ADD_RMS_NORM:
        _register_add_norm(trtp, spec, name, types)
    else:
        _register_norm(trtp, spec, name, types)


def _register_add_norm(trtp, spec: PluginSpec, name: str, types: str) -> None:
    """NormoptAddRMSNorm(x, residual, weight) -> (x + residual, its RMSNorm)."""
    Result = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]

    @trtp.register(name)
    def shape(
        x: trtp.TensorDesc, residual: trtp.TensorDesc, weight: trtp.TensorDesc, epsilon: float
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return x.like(), x.like()

    @trtp.autotune(name)
    def tune(
        x: trtp.TensorDesc,
        residual: trtp.TensorDesc,
        weight: trtp.TensorDesc,
        epsilon: float,
        outputs: Tuple[trtp.TensorDesc],
    ) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(types, "LINEAR", tactics(int(x.shape[-1])))]

    @trtp.aot_impl(name)
    def aot(
        x: trtp.TensorDesc,
        residual: trtp.TensorDesc,
        weight: trtp.TensorDesc,
        epsilon: float,
        outputs: Tuple[trtp.TensorDesc],
        tactic: int,
    ) -> Result:
        return _aot_result(trtp, spec, x, epsilon, tactic)

    @trtp.impl(name)
    def jit(
        x: trtp.Tensor,
        residual: trtp.Tensor,
        weight: trtp.Tensor,
        epsilon: float,
        outputs: Tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        _run_jit(spec, (x, residual, weight), outputs, epsilon, stream)


def _register_norm(trtp, spec: PluginSpec, name: str, types: str) -> None:
    """NormoptRMSNorm / NormoptCRMSNorm(x, weight) -> y."""
    Result = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]

    @trtp.register(name)
    def shape(x: trtp.TensorDesc, weight: trtp.TensorDesc, epsilon: float) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune(name)
    def tune(
        x: trtp.TensorDesc, weight: trtp.TensorDesc, epsilon: float, outputs: Tuple[trtp.TensorDesc]
    ) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(types, "LINEAR", tactics(int(x.shape[-1])))]

    @trtp.aot_impl(name)
    def aot(
        x: trtp.TensorDesc,
        weight: trtp.TensorDesc,
        epsilon: float,
        outputs: Tuple[trtp.TensorDesc],
        tactic: int,
    ) -> Result:
        return _aot_result(trtp, spec, x, epsilon, tactic)

    @trtp.impl(name)
    def jit(
        x: trtp.Tensor,
        weight: trtp.Tensor,
        epsilon: float,
        outputs: Tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        _run_jit(spec, (x, weight), outputs, epsilon, stream)
