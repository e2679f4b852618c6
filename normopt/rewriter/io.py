"""Load and write ONNX models through onnx-ir (the analysis core's model access).

- Loading validates the file first (exists, parses, supported opset and IR version, every
  external data file present and long enough, the graph checker-valid: `check_structure`) and
  raises `BadInput` with one line saying what is wrong. External data stays memory-mapped:
  weights are read only when a pass touches them, so memory stays near one copy of the model.
- Writing (`write`) puts a model and its data file where it is told; what a user sees is
  staged in a temporary folder and renamed into place by `normopt.files` (atomic writes, input
  safety), which is outside the core.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir

from normopt.errors import BadInput
from normopt.rewriter import ort_ops
from normopt.rewriter.file_checks import (  # noqa: F401  (the supported range, io's)
    MAX_IR_VERSION,
    MAX_OPSET,
    MIN_IR_VERSION,
    MIN_OPSET,
    check_readable_file,
    parse_checked,
)
from normopt.rewriter.graph import is_sorted
from normopt.timings import step

# model.meta key: IN's nodes were out of topological order and were sorted on load
SORTED_ON_LOAD = "normopt.sorted_on_load"
# Initializers up to this size keep their values in `structure_proto`.
SMALL_TENSOR_BYTES = 1024
# A protobuf cannot exceed 2 GiB; leave room for the graph itself.
EMBEDDED_LIMIT_BYTES = 1_800_000_000
EXTERNAL_THRESHOLD_BYTES = 1024
# model.meta key: initializers IN described in value_info (onnx-ir would describe them all)
DESCRIBED_INITIALIZERS = "normopt.described_initializers"


def load(path: str | os.PathLike) -> ir.Model:
    """Validate and load a model; external data stays memory-mapped (read on first access)."""
    path = check_readable_file(path)
    with step("load: parse"):
        proto = parse_checked(path)
    described = {v.name for v in proto.graph.value_info}
    with step("load: to IR"):
        try:
            model = ir.serde.deserialize_model(proto)
        except Exception as exc:
            raise BadInput(f"'{path}' fails onnx.checker: {first_line(exc)}") from None
        del proto
    if not is_sorted(model.graph):  # onnxruntime runs it; onnx's checker would refuse it
        model.graph.sort()
        model.meta[SORTED_ON_LOAD] = True
    # The checker reads the graph, not the weights (the whole file would be parsed again:
    # +25% on an embedded GPT-2's rewrite); their sizes were checked above, their values are
    # read where a pass needs them.
    with step("load: checker"):
        problem = check_structure(model)
    if problem is not None:
        raise BadInput(f"'{path}' fails onnx.checker: {problem}")
    model.meta[DESCRIBED_INITIALIZERS] = {
        name for name in model.graph.initializers if name in described
    }
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return model


def first_line(exc: Exception) -> str:
    """An exception's message as one line (its type when it has none)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def structure_proto(model: ir.Model) -> onnx.ModelProto:
    """The model without its large tensors, which become typed graph inputs: what the checker
    and shape inference need (the graph alone, whatever the model's size), built without
    touching the model and without reading a weight. Small embedded initializers (shape
    constants, which feed shape inference's data propagation) keep their values."""
    graph = model.graph
    small = [
        v
        for v in graph.initializers.values()
        if v.const_value is not None
        and v.const_value.nbytes <= SMALL_TENSOR_BYTES
        and not isinstance(v.const_value, ir.ExternalTensor)
    ]
    view = ir.GraphView(
        graph.inputs, graph.outputs, nodes=graph, initializers=small, name=graph.name
    )
    proto = onnx.ModelProto(ir_version=model.ir_version)
    proto.graph.CopyFrom(ir.serde.serialize_graph(view))
    listed = {v.name for v in (*graph.inputs, *small)}
    for value in graph.initializers.values():
        if value.name not in listed and value.const_value is not None:
            tensor = value.const_value
            proto.graph.input.append(
                onnx.helper.make_tensor_value_info(
                    value.name, tensor.dtype.value, list(tensor.shape)
                )
            )
    for domain, version in model.opset_imports.items():
        proto.opset_import.append(onnx.helper.make_opsetid(domain, version))
    for function in model.functions.values():
        proto.functions.append(ir.serde.serialize_function(function))
    return proto


def check_structure(model: ir.Model) -> str | None:
    """What onnx.checker finds wrong with the model's graph (its large tensors checked only for
    type and shape), or None. onnxruntime's contrib norms are known to it (ort_ops)."""
    ort_ops.register()
    try:
        onnx.checker.check_model(structure_proto(model))
    except Exception as exc:  # ValidationError, or a graph the serializer rejects
        return first_line(exc)
    return None


def uses_external_data(model: ir.Model) -> bool:
    return any(
        isinstance(v.const_value, ir.ExternalTensor)
        for g in model.graphs()
        for v in g.initializers.values()
    )


def initializer_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes
        for g in model.graphs()
        for v in g.initializers.values()
        if v.const_value is not None
    )


def external_data_files(model: ir.Model) -> list[Path]:
    """Every external data file the model's tensors are read from."""
    return sorted(
        {
            Path(v.const_value.path)
            for g in model.graphs()
            for v in g.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)
        }
    )


def model_files(path: str | os.PathLike) -> list[Path]:
    """The model file and every external data file it names, read without the weights (the
    files a report or plot must not write; parses the protobuf, so only where one is asked for)."""
    import onnx

    path = Path(path)
    with contextlib.suppress(Exception):  # an unreadable model fails later, where it is used
        model = onnx.load(path, load_external_data=False)
        tensors = [t for g in _graphs(model.graph) for t in g.initializer] + [
            a.t
            for g in _graphs(model.graph)
            for n in g.node
            for a in n.attribute
            if a.HasField("t")
        ]
        names = {e.value for t in tensors for e in t.external_data if e.key == "location"}
        return [path, *sorted(path.parent / n for n in names)]
    return [path]


def _graphs(graph):
    """A GraphProto and every subgraph in it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(sub)


# ------------------------------------------------------------------------------ input safety


@contextlib.contextmanager
def _undescribed_initializers(model: ir.Model):
    """While saving, initializers carry no type or shape of their own (their tensors have
    both) unless IN described them in value_info, so the output describes what IN did."""
    described = model.meta.get(DESCRIBED_INITIALIZERS, set())
    hidden = [
        (v, v.type, v.shape)
        for g in model.graphs()
        for v in g.initializers.values()
        if not v.is_graph_input() and (g is not model.graph or v.name not in described)
    ]
    for value, _, _ in hidden:
        value.type, value.shape = None, None
    try:
        yield
    finally:
        for value, vtype, shape in hidden:
            value.type, value.shape = vtype, shape


def _streamable(model: ir.Model) -> bool:
    """Whether `_write_embedded` writes what onnx-ir's save would: every initializer in memory
    (an external one stays external there) and none with a quantization annotation."""
    return all(
        v.const_value is not None
        and not isinstance(v.const_value, ir.ExternalTensor)
        and QUANT_ANNOTATION not in v.meta
        for v in model.graph.initializers.values()
    )


QUANT_ANNOTATION = "quant_parameter_tensor_names"  # onnx-ir's meta key for a value's annotation


def _wire_field(number: int, length: int) -> bytes:
    """The tag and length that start a length-delimited protobuf field."""
    out = bytearray()
    for value in (number << 3 | 2, length):
        while value > 0x7F:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def _write_embedded(
    model: ir.Model, path: Path, progress: Callable[[int, int], None] | None
) -> None:
    """Write `model` with its tensors inside the file, one tensor in memory at a time: first the
    model without initializers, then for each initializer, in order, one more `graph` field
    holding that initializer alone. Protobuf merges the occurrences of a message field (their
    repeated fields concatenate), so every reader sees one graph with every initializer, the
    bytes onnx-ir's save would give. That save builds the whole model proto and one string of
    it (a 650 MB GPT-2: 3-4 s and two more copies of the weights in memory)."""
    graph = model.graph
    shell = copy.copy(model)
    shell.graph = ir.GraphView(
        graph.inputs,
        graph.outputs,
        nodes=graph,
        name=graph.name,
        doc_string=graph.doc_string,
        opset_imports=graph.opset_imports,
        metadata_props=graph.metadata_props,
    )
    proto = ir.serde.serialize_model(shell)
    inputs = {v.name for v in graph.inputs}
    described = [
        ir.serde.serialize_value(v)
        for v in graph.initializers.values()
        if v.name
        and v.name not in inputs
        and (v.type is not None or v.shape is not None or v.metadata_props or v.doc_string)
    ]
    if described:  # where onnx-ir's save puts them: before the nodes' value_info
        rest = list(proto.graph.value_info)
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(described + rest)
    initializers = list(graph.initializers.values())
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
        del proto
        for i, value in enumerate(initializers):
            tensor = ir.serde.serialize_tensor(value.const_value)
            tensor.name = value.name
            data = tensor.SerializeToString()
            del tensor
            f.write(_wire_field(7, len(_wire_field(5, len(data))) + len(data)))  # ModelProto.graph
            f.write(_wire_field(5, len(data)))  # GraphProto.initializer
            f.write(data)
            if progress:
                progress(i + 1, len(initializers))


def write(
    model: ir.Model,
    path: Path,
    *,
    data_name: str | None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write `model` to `path`, tensors over EXTERNAL_THRESHOLD_BYTES into the data file
    `data_name` beside it (None: embedded). Not atomic: outputs are written into a temporary
    folder and renamed into place by normopt.files.stage. `progress(done, total)` is called
    after each external tensor is written."""
    with _undescribed_initializers(model), step("save"):
        if data_name is None and _streamable(model):
            _write_embedded(model, path, progress)
        else:
            ir.save(
                model,
                path,
                external_data=data_name,
                size_threshold_bytes=EXTERNAL_THRESHOLD_BYTES,
                callback=(lambda _t, info: progress(info.index + 1, info.total))
                if progress
                else None,
            )
