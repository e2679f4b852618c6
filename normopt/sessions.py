"""Every onnxruntime session normopt makes: for checking (verify, recalibrate, the tests) and
for timing (profile, the speed guard, --crms auto).

A check session runs on CPU without graph optimizations (ORT_DISABLE_ALL: onnxruntime's own
fusions can neither hide nor cause a difference; `optimized` turns them all on, for the noise
probe). A graph that uses normopt's TensorRT plugin domain is lowered first to the plugins'
float64 references (normopt.lowering), decided from the graph's domains. A timing
session uses ORT_ENABLE_ALL, fixed intra-op threads, one inter-op thread and no spinning.
onnxruntime is imported inside these functions: it is heavy, and `inspect` never needs it.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx

from normopt.errors import BadInput
from normopt.plugins.spec import DOMAIN as PLUGIN_DOMAIN
from normopt.rewriter.io import first_line

BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt", "openvino")


class ModelRunError(BadInput):
    """onnxruntime could not load or run `path` (which model failed decides the exit code;
    `running`: it loaded, and failed on the inputs)."""

    def __init__(self, path: str | os.PathLike, message: str, running: bool = False) -> None:
        super().__init__(message)
        self.path = Path(path)
        self.running = running


def ort_message(exc: Exception) -> str:
    """ORT's message without its status prefix and C++ source location."""
    line = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(exc))
    return re.sub(r"\S*onnxruntime_src\S* (\S+\(.*?\) )?", "", line)


@dataclass(frozen=True)
class GraphFacts:
    """What the sessions need to know of a model file before running it: whether it has
    normopt's plugin nodes (then it is lowered first), and the least precise float type it
    computes in (its float weights and the targets of its Casts: onnxruntime's float16
    converter keeps float32 inputs and outputs around a float16 graph)."""

    plugins: bool
    compute: np.dtype


def graph_facts(path: str | os.PathLike) -> GraphFacts:
    """The file's facts, read once per file version (a verification runs A up to three times
    and B once: one scan, not four parses of a model that may be GBs)."""
    st = os.stat(path)
    return _graph_facts(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _graph_facts(path: str, _size: int, _mtime: int) -> GraphFacts:
    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception:  # unreadable: onnxruntime says why when it loads the file
        return GraphFacts(False, np.dtype(np.float32))
    return GraphFacts(any(n.domain == PLUGIN_DOMAIN for n in graph.node), compute_of(graph))


def compute_of(graph: onnx.GraphProto) -> np.dtype:
    """The least precise float type `graph` computes in: its float weights and the targets of
    its Casts (float32 unless float16 or bfloat16 appear there)."""
    types = {t.data_type for t in graph.initializer}
    types |= {a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    if onnx.TensorProto.BFLOAT16 in types:
        return np.dtype(ml_dtypes.bfloat16)
    if onnx.TensorProto.FLOAT16 in types:
        return np.dtype(np.float16)
    return np.dtype(np.float32)


def check_session(
    path: str | os.PathLike | bytes,
    optimized: bool = False,
    weights: Mapping[str, np.ndarray] | None = None,
    name: str | os.PathLike | None = None,
):
    """A CPU session for checking outputs (see the module docstring): of the model file at
    `path`, or of a serialized model whose external `weights` are given as arrays (a segment,
    normopt.segments: `name` is the model file it is part of)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if weights:
        names = list(weights)
        opts.add_external_initializers(
            names, [ort.OrtValue.ortvalue_from_numpy(weights[n]) for n in names]
        )
    path_text = str(name if name is not None else path)
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 4  # its errors come back as exceptions, not raw log lines
    # A check runs a few tokens once: packing every MatMul weight for speed first took 10 of
    # the 11 s of a 1.3B model's session (and a copy of its weights); unpacked, onnxruntime
    # reads them where it mapped them.
    opts.add_session_config_entry("session.disable_prepacking", "1")
    # Nor its memory arena, which keeps what a float16 graph's float32 casts once took: a 2.8 GB
    # float16 decoder peaked at 13.4 GB with it, 7.8 GB without (a segment of it: 4.8 vs 1.4).
    opts.enable_cpu_mem_arena = False
    try:
        source = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types, all one-line worthy
        reason = ort_message(exc)
        if "Could not find an implementation" in reason:
            reason += (
                " (onnxruntime's CPU build has no kernel for it in this dtype, e.g. bfloat16;"
                " verification is impossible there: rewrite with --no-verify)"
            )
        raise ModelRunError(path_text, f"onnxruntime cannot load '{path_text}': {reason}") from None


def run_ort(path: str | os.PathLike, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a model once on ORT CPU without graph optimizations; outputs by name."""
    return run_ort_all(path, [feeds])[0]


def run_ort_all(
    path: str | os.PathLike, feed_sets: list[Mapping[str, np.ndarray]], optimized: bool = False
) -> list[dict[str, np.ndarray]]:
    """Run a model on each input set in one check session; outputs by name."""
    with _runnable(Path(path)) as runnable:
        session = check_session(runnable, optimized)
        try:
            names = [o.name for o in session.get_outputs()]
            return [dict(zip(names, session.run(names, dict(feeds)))) for feeds in feed_sets]
        except Exception as exc:
            raise ModelRunError(
                path, f"onnxruntime failed to run '{path}': {ort_message(exc)}", running=True
            ) from None


def run_local(
    path: str | os.PathLike,
    feed_sets: list[Mapping[str, np.ndarray]],
    budget: int,
    optimized: bool = False,
) -> tuple[list[dict[str, np.ndarray]], int]:
    """As run_ort_all, a segment of at most `budget` bytes of weights at a time
    (normopt.segments); also returns the number of segments."""
    from normopt.segments import run_segmented

    with _runnable(Path(path)) as runnable:
        try:
            return run_segmented(
                runnable,
                feed_sets,
                budget,
                lambda model, weights: check_session(model, optimized, weights, name=path),
            )
        except BadInput:
            raise
        except Exception as exc:
            raise ModelRunError(
                path, f"onnxruntime failed to run '{path}': {ort_message(exc)}", running=True
            ) from None


@contextmanager
def _runnable(path: Path) -> Iterator[Path]:
    """`path`, or for a --target tensorrt graph a copy with its plugin nodes lowered to their
    float64 references, in a temporary folder beside it."""
    if not graph_facts(path).plugins:
        yield path
        return
    from normopt.files import save, temp_folder
    from normopt.lowering import lower
    from normopt.rewriter import io

    model = io.load(path)
    if not lower(model):
        raise ModelRunError(
            path,
            f"onnxruntime cannot load '{path}': it uses domain '{PLUGIN_DOMAIN}' but no "
            "normopt plugin op",
        )
    with temp_folder(path) as folder:
        lowered = folder / "lowered.onnx"
        save(model, lowered, external_data=io.uses_external_data(model))
        del model
        yield lowered


def _providers(backend: str) -> list[str]:
    import onnxruntime as ort

    if backend == "ort-cpu":
        return ["CPUExecutionProvider"]
    if backend == "ort-cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BadInput(
                "--backend ort-cuda needs onnxruntime-gpu and a CUDA GPU "
                "(pip install 'normopt[gpu]'); this onnxruntime has "
                f"{', '.join(ort.get_available_providers())}"
            )
        return ["CUDAExecutionProvider"]
    try:
        import tensorrt  # noqa: F401  (imported lazily: an optional extra)
    except ImportError:
        raise BadInput(
            "--backend tensorrt needs TensorRT (pip install 'normopt[tensorrt]'), "
            "which is not installed here"
        ) from None
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise BadInput(
            "--backend tensorrt needs onnxruntime built with the TensorRT execution provider"
        )
    return ["TensorrtExecutionProvider"]


def timing_session(
    path: str | os.PathLike,
    backend: str = "ort-cpu",
    threads: int = 2,
    profile_prefix: str | None = None,
):
    """A session set up for timing (see the module docstring); for backend openvino an
    OpenVINO compiled model run the same way (normopt.engine.openvino)."""
    import onnxruntime as ort

    if backend not in BACKENDS:
        raise BadInput(f"--backend must be one of {', '.join(BACKENDS)}, not '{backend}'")
    if backend == "openvino":
        from normopt.engine.openvino import Session

        return Session(path, threads, profiling=profile_prefix is not None)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 4  # its errors come back as exceptions, not raw log lines
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(str(path), opts, providers=_providers(backend))
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"onnxruntime cannot load '{path}': {first_line(exc)}") from None
