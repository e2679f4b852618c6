"""OpenVINO's CPU plugin as a second engine for `profile`, `verify` and the speed guard
(`--backend openvino`; `pip install 'normopt[openvino]'`, imported only here, lazily).

A compiled model gets onnxruntime's session shape (`run(names, feeds)`), so normopt.profiling
times it as it times onnxruntime: fixed inference threads, one stream, latency hint, float32
inference precision (a CPU with bfloat16 or float16 units would otherwise compute in those).
What OpenVINO made of the graph is its runtime model: `runtime_ops` counts its layers by type
(an RMSNorm normopt wrote compiles to one `RMS` layer, a LayerNorm to `MVN`), and with
profiling on, `layer_ms` gives each layer's time of the last run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from normopt.errors import BadInput
from normopt.rewriter.io import first_line

CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
NORM_LAYERS = frozenset({"MVN", "RMS", "NormalizeL2"})  # OpenVINO's fused norm layer types


def load_openvino(what: str = "--backend openvino"):
    try:
        import openvino
    except ImportError:
        raise BadInput(
            f"{what} needs OpenVINO, which is not installed: pip install 'normopt[openvino]'"
        ) from None
    return openvino


class Session:
    """The model at `path` compiled for OpenVINO's CPU plugin, run like an onnxruntime
    session."""

    def __init__(self, path: str | os.PathLike, threads: int, profiling: bool = False) -> None:
        ov = load_openvino()
        config = {**CONFIG, "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": profiling}
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with its C++ trace
            raise BadInput(f"OpenVINO cannot load '{path}': {first_line(exc)}") from None
        self.request = self.compiled.create_infer_request()
        self.outputs = [o.get_any_name() for o in self.compiled.outputs]

    def run(self, names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list:
        try:
            self.request.infer(dict(feeds))
        except Exception as exc:
            raise BadInput(f"OpenVINO failed to run the model: {first_line(exc)}") from None
        return [self.request.get_tensor(n).data.copy() for n in (names or self.outputs)]

    def layer_ms(self) -> dict[tuple[str, str], float]:
        """Milliseconds per layer of the last run, keyed (layer name, layer type)."""
        return {
            (p.node_name, p.node_type): p.real_time.total_seconds() * 1e3
            for p in self.request.get_profiling_info()
            if p.status.name == "EXECUTED"
        }

    def runtime_ops(self) -> dict[str, int]:
        """The compiled model's layers by type (constants and parameters left out)."""
        counts: dict[str, int] = {}
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            kind = str(op.get_rt_info()["layerType"].astype(str))
            if kind not in ("Const", "Input", "Output"):
                counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def run_all(
    path: str | os.PathLike, feed_sets: list[Mapping[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """The model on each input set (one thread: what verification needs is its numbers)."""
    session = Session(path, threads=1)
    return [dict(zip(session.outputs, session.run(None, feeds))) for feeds in feed_sets]
