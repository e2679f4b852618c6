"""Timing TensorRT engines (`normopt profile --backend tensorrt A.engine B.engine`): each engine
runs on random inputs of its optimization profile's opt shapes, captured in a CUDA graph where
capture works (TensorRT's own trtexec pattern), timed with CUDA events around each launch, the
engines interleaved round by round like the ORT profile (normopt.profiling), per-layer times
from TensorRT's profiler. Needs TensorRT, torch and a CUDA GPU (docs/tensorrt_plugins.md, s. 4).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from normopt.engine.trt import load_tensorrt
from normopt.errors import BadInput


def _torch_cuda():
    try:
        import torch
    except ImportError:
        raise BadInput(
            "timing TensorRT engines needs torch with CUDA (pip install 'normopt[kernels]')"
        ) from None
    if not torch.cuda.is_available():
        raise BadInput("timing TensorRT engines needs a CUDA GPU; none is visible")
    return torch


def engine_runner(
    path: Path, cuda_graph: bool = True
) -> tuple[Callable[[], float], Callable[[], dict[str, float]]]:
    """A runner for `path` returning the seconds one inference took (CUDA events), and a function
    giving the milliseconds per layer of one profiled run (call it after the timing: the
    profiler slows the runs it watches)."""
    trt, _ = load_tensorrt("profile --backend tensorrt")
    torch = _torch_cuda()
    from normopt.plugins.registration import register

    register()  # engines built with --plugins jit run their plugins through Python
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise BadInput(f"'{path}' is not a TensorRT engine this TensorRT can load")
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    buffers = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = torch.from_numpy(trt.nptype(engine.get_tensor_dtype(name))(0).reshape(1)).dtype
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            shape = tuple(engine.get_tensor_profile_shape(name, 0)[1])  # the profile's opt shape
            context.set_input_shape(name, shape)
            tensor = (
                torch.randn(shape, device="cuda")
                if dtype.is_floating_point
                else torch.zeros(shape, device="cuda")
            ).to(dtype)
        else:
            tensor = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, tensor.data_ptr())
        buffers.append(tensor)
    launch = _launcher(torch, context, stream, cuda_graph)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run() -> float:
        start.record(stream)
        launch()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    run.buffers = buffers  # kept alive with the runner
    return run, lambda: _layer_times(trt, context, stream)


def _launcher(torch, context, stream, cuda_graph: bool) -> Callable[[], None]:
    """The CUDA graph of one enqueue where capture works, else the enqueue itself."""
    context.execute_async_v3(
        stream.cuda_stream
    )  # a first run outside capture (TensorRT's own setup)
    stream.synchronize()
    if cuda_graph:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream):
                ok = context.execute_async_v3(stream.cuda_stream)
            if ok:
                return lambda: graph.replay()
        except RuntimeError:
            pass  # an engine whose enqueue cannot be captured (e.g. data-dependent shapes)
    return lambda: context.execute_async_v3(stream.cuda_stream)


def _layer_times(trt, context, stream) -> dict[str, float]:
    """Milliseconds per layer of one run, from TensorRT's IProfiler."""
    times: dict[str, float] = {}

    class Profiler(trt.IProfiler):
        def report_layer_time(self, layer_name: str, ms: float) -> None:
            times[layer_name] = times.get(layer_name, 0.0) + ms

    context.profiler = Profiler()
    context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    context.profiler = None
    return times
