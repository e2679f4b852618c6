"""Run a model a segment at a time: verification of models whose weights do not fit in memory
twice (`verify --method local`).

The nodes, in topological order, are cut into consecutive segments of at most `budget` bytes
of weights each (a node whose own weights exceed it is a segment alone). Each segment is a
model of its own: its inputs are the values earlier segments (or the graph's inputs) computed
and it reads, its outputs the values later segments read and the graph's outputs it computes.
One segment's session exists at a time; its weights come memory-mapped from the data file
(onnxruntime's `add_external_initializers`), so a run holds about one segment's weights plus
the activations crossing the cuts (a few tokens' worth: small). The values a run computes are
the whole model's, node for node: the outputs are compared end to end, exactly as a full
verification compares them.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from normopt.errors import BadInput
from normopt.rewriter.file_checks import contained_data_file, parse_checked


@dataclass
class Segment:
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    weights: set[str] = field(default_factory=set)
    bytes: int = 0


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes a tensor's data takes (its external length, or its embedded data's)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        return int(info.get("length", 0))
    return tensor.ByteSize()


def _subgraph_reads(node: onnx.NodeProto) -> Iterator[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from outside (over-approximated:
    every name their nodes read; the caller keeps only those defined outside)."""
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                yield from (name for name in inner.input if name)
                yield from _subgraph_reads(inner)


def node_reads(node: onnx.NodeProto) -> list[str]:
    return [name for name in node.input if name] + list(_subgraph_reads(node))


def topological(nodes: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """`nodes` in an order where each comes after those computing what it reads, as close to
    the file's order as that allows (onnxruntime accepts a graph out of order, and some tools
    write one: its float16 converter appends the input Casts last)."""
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        before = {producer[n] for n in node_reads(node) if n in producer} - {i}
        waiting[i] = len(before)
        for j in before:
            readers.setdefault(j, []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in readers.get(i, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise BadInput("the graph has a cycle: it cannot be run a segment at a time")
    return order


def plan(graph: onnx.GraphProto, budget: int) -> list[Segment]:
    """Consecutive segments, in topological order, of at most `budget` bytes of weights each."""
    sizes = {t.name: tensor_bytes(t) for t in graph.initializer}
    segments = [Segment()]
    for node in topological(graph.node):
        reads = {n for n in node_reads(node) if n in sizes}
        new = reads - segments[-1].weights
        extra = sum(sizes[n] for n in new)
        if segments[-1].nodes and segments[-1].bytes + extra > budget:
            segments.append(Segment())
            new, extra = reads, sum(sizes[n] for n in reads)
        segments[-1].nodes.append(node)
        segments[-1].weights |= new
        segments[-1].bytes += extra
    return segments


class _Weights:
    """A model's initializers by name: embedded ones as they are, external ones as numpy
    arrays memory-mapped from their data file (dtypes numpy maps; others read in)."""

    def __init__(self, proto: onnx.ModelProto, path: Path) -> None:
        self.tensors = {t.name: t for t in proto.graph.initializer}
        self.path = path

    def split(self, names: set[str]) -> tuple[list[onnx.TensorProto], dict[str, np.ndarray]]:
        """(initializers to embed in a segment, external ones as mapped arrays)."""
        embedded, mapped = [], {}
        for name in sorted(names):
            tensor = self.tensors[name]
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                embedded.append(tensor)
                continue
            array = self._map(tensor)
            if array is None:  # a dtype numpy cannot map: its bytes go into the segment
                copy = onnx.TensorProto()
                copy.CopyFrom(tensor)
                external_data_helper.load_external_data_for_tensor(copy, str(self.path.parent))
                copy.data_location = onnx.TensorProto.DEFAULT
                del copy.external_data[:]
                embedded.append(copy)
            else:  # its proto stays external: onnxruntime takes the array for it
                embedded.append(tensor)
                mapped[name] = array
        return embedded, mapped

    def read(self, name: str) -> np.ndarray:
        """One initializer's value, read in."""
        embedded, mapped = self.split({name})
        if name in mapped:
            return np.array(mapped[name])
        return numpy_helper.to_array(embedded[0])

    def _map(self, tensor: onnx.TensorProto) -> np.ndarray | None:
        info = {e.key: e.value for e in tensor.external_data}
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        except (KeyError, TypeError, ValueError):
            return None
        if dtype.kind not in "fiub" or dtype.itemsize not in (1, 2, 4, 8):
            return None
        if dtype.kind == "f" and dtype not in (np.float16, np.float32, np.float64):
            return None  # bfloat16 and float8 come from ml_dtypes: onnxruntime cannot take them
        shape = tuple(tensor.dims)
        count = int(np.prod(shape))
        if count == 0:
            return np.zeros(shape, dtype)
        data = contained_data_file(self.path, info["location"])
        return np.memmap(
            data, dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=shape
        )


def _segment_model(
    proto: onnx.ModelProto,
    segment: Segment,
    inputs: Mapping[str, np.ndarray],
    outputs: list[str],
    embedded: list[onnx.TensorProto],
) -> bytes:
    graph = helper.make_graph(
        segment.nodes,
        f"{proto.graph.name}-segment",
        [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), None)
            for name, array in inputs.items()
        ],
        [onnx.ValueInfoProto(name=name) for name in outputs],
        embedded,
    )
    model = helper.make_model(
        graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version
    )
    model.functions.extend(proto.functions)
    return model.SerializeToString()


def run_segmented(
    path: str | os.PathLike,
    feed_sets: list[Mapping[str, np.ndarray]],
    budget: int,
    session: Callable[[bytes, dict[str, np.ndarray]], object],
) -> tuple[list[dict[str, np.ndarray]], int]:
    """The model at `path` on each input set, a segment at a time (outputs by name), and the
    number of segments. `session(model_bytes, mapped_weights)` makes a segment's session."""
    path = Path(path)
    proto = parse_checked(path)
    graph = proto.graph
    weights = _Weights(proto, path)
    segments = plan(graph, budget)
    final = [o.name for o in graph.output]
    last_read: dict[str, int] = {}
    for index, segment in enumerate(segments):
        for node in segment.nodes:
            for name in node_reads(node):
                last_read[name] = index
    values = [dict(feeds) for feeds in feed_sets]
    for index, segment in enumerate(segments):
        produced = {name for node in segment.nodes for name in node.output if name}
        wanted = [
            name
            for node in segment.nodes
            for name in node.output
            if name and (name in final or last_read.get(name, -1) > index)
        ]
        needed = sorted(
            {n for node in segment.nodes for n in node_reads(node)} - produced - segment.weights
        )
        if not wanted:  # nothing it computes is read again (a dead end)
            continue
        embedded, mapped = weights.split(segment.weights)
        fed = [n for n in needed if n in values[0]]
        for name in fed:
            if not isinstance(values[0][name], np.ndarray):
                raise BadInput(
                    f"local verification cannot carry '{name}' (not a tensor) between segments "
                    f"of '{path}': use --verify full"
                )
        model = _segment_model(proto, segment, {n: values[0][n] for n in fed}, wanted, embedded)
        run = session(model, mapped)
        del model, mapped
        for env in values:
            env.update(zip(wanted, run.run(wanted, {n: env[n] for n in fed})))
            for name in [n for n in env if last_read.get(n, -1) <= index and n not in final]:
                del env[name]
        del run
    for name in set(final) - set(values[0]):  # an output that is an initializer as it is
        array = weights.read(name)
        for env in values:
            env[name] = array
    return [{name: env[name] for name in final} for env in values], len(segments)
