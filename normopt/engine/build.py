"""`normopt build`: an ONNX graph (a `--target tensorrt` rewrite, or any model) to a TensorRT
engine, with normopt's plugins registered (docs/tensorrt_plugins.md, sections 2 and 3).

Strongly typed network (a 10.x flag; TensorRT 11 is always strongly typed): the engine computes
in the ONNX graph's own types, so an fp16 engine comes from an fp16 graph (whose norms
`--target tensorrt` keeps in fp32). Plugins ahead of time (PTX in the engine) unless
`plugins="jit"`. One optimization profile from `shapes` (name -> (min, opt, max)), the inputs'
static dims, and `dims` for named dynamic dims (min = opt = max). The engine is written
atomically; the summary counts its layers by kind from the engine inspector.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from normopt.engine.trt import load_tensorrt
from normopt.errors import BadInput

PLUGIN_MODES = ("aot", "jit")


def check_settings(workspace_mb: int, plugins: str, precision: str | None) -> None:
    """Refuse bad settings before TensorRT is loaded (the same line with or without it)."""
    if plugins not in PLUGIN_MODES:
        raise BadInput(f"--plugins takes aot or jit, not '{plugins}'")
    if workspace_mb < 1:
        raise BadInput("--workspace must be at least 1 MiB")
    if precision not in (None, "fp16", "bf16"):
        raise BadInput(f"precision must be fp16 or bf16, not '{precision}'")


def input_dims(model: Path) -> dict[str, list]:
    """The graph inputs' dims (numbers, dim names) without loading the weights."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    names = {i.name for i in proto.graph.initializer}
    return {
        i.name: [
            d.dim_value if d.HasField("dim_value") else d.dim_param or None
            for d in i.type.tensor_type.shape.dim
        ]
        for i in proto.graph.input
        if i.name not in names
    }


def build(
    src: Path,
    dst: Path,
    *,
    shapes: Mapping[str, tuple],
    dims: Mapping[str, int],
    workspace_mb: int = 4096,
    timing_cache: Path | None = None,
    plugins: str = "aot",
    precision: str | None = None,
    trt_version: str | None = None,
) -> dict:
    """`normopt build`'s body: the optimization profile from `shapes` (name -> min/opt/max)
    and `dims`, the graph lowered to `precision` first (a strongly typed engine computes in
    the graph's types), the engine built; returns the document's fields."""
    from normopt.files import scratch_folder

    profiles = profile_shapes(input_dims(src), shapes, dims)
    with scratch_folder() as tmp:
        graph, lowered = src, None
        if precision is not None:
            from normopt.engine.precision import convert

            graph = Path(tmp) / "lowered.onnx"
            lowered = convert(src, graph, precision, trt_version)
        summary = build_engine(
            graph,
            dst,
            shapes=profiles,
            workspace_mb=workspace_mb,
            timing_cache=timing_cache,
            plugins=plugins,
        )
    return {"input": str(src), "output": str(dst), "precision": lowered, **summary}


def profile_shapes(
    inputs: Mapping[str, list], shapes: Mapping[str, tuple], dims: Mapping[str, int]
) -> dict:
    """name -> (min, opt, max) for every input: `shapes` where given, else its dims (named ones
    from `dims`); a dynamic dim with neither is an error naming it."""
    out = {}
    for name, dim_list in inputs.items():
        if name in shapes:
            out[name] = tuple(tuple(s) for s in shapes[name])
            continue
        shape = []
        for d in dim_list:
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            elif isinstance(d, str) and d in dims:
                shape.append(dims[d])
            else:
                raise BadInput(
                    f"input '{name}' has a dynamic dim {d!r}: give --shape {name}:MIN/OPT/MAX "
                    f"or --dim {d}=N"
                )
        out[name] = (tuple(shape),) * 3
    return out


def build_engine(
    model: Path,
    engine: Path,
    *,
    shapes: Mapping[str, tuple],
    workspace_mb: int = 4096,
    timing_cache: Path | None = None,
    plugins: str = "aot",
) -> dict:
    """Build `model` into `engine`; returns the summary (layer counts by kind, TensorRT version)."""
    trt, caps = load_tensorrt("normopt build")
    from normopt.files import write_bytes_atomic
    from normopt.plugins.registration import register

    register()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(
        trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS
        if plugins == "aot"
        else trt.NetworkDefinitionCreationFlag.PREFER_JIT_PYTHON_PLUGINS
    )
    if caps.strongly_typed_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BadInput(f"TensorRT cannot parse '{model}': {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(
            timing_cache.read_bytes() if timing_cache.exists() else b""
        )
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BadInput(
            f"TensorRT could not build an engine from '{model}' (its log above says why)"
        )
    write_bytes_atomic(engine, bytes(plan))
    if cache is not None:
        write_bytes_atomic(timing_cache, bytes(cache.serialize()))
    return {"tensorrt": ".".join(map(str, caps.version)), "layers": _layer_kinds(trt, logger, plan)}


def _layer_kinds(trt, logger, plan) -> dict[str, int]:
    """Layer counts by kind (plugin / normalization / other) from the engine inspector."""
    runtime = trt.Runtime(logger)
    inspector = runtime.deserialize_cuda_engine(plan).create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    kinds: dict[str, int] = {}
    for layer in info.get("Layers", []):
        kind = str(layer.get("LayerType", "unknown")) if isinstance(layer, dict) else "unknown"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds
