"""Checks a model file passes before normopt parses it into the IR (normopt.rewriter.io.load):
it exists and parses, its opset and IR version are supported, every external data file lies in
the model's folder (resolved, symlinks too), exists and is long enough, and every embedded
tensor holds as many bytes as its shape says. Each failure is one `BadInput` line."""

from __future__ import annotations

import math
import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from normopt.errors import BadInput

# The upper bounds are the installed onnx's (what it reads, checks and writes); a model the
# installed onnxruntime cannot load is refused by verification with onnxruntime's own reason.
MIN_OPSET = 13
MAX_OPSET = onnx.defs.onnx_opset_version()
MIN_IR_VERSION = 7
MAX_IR_VERSION = onnx.IR_VERSION


def check_readable_file(path: str | os.PathLike, what: str = "model") -> Path:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{what} '{path}' does not exist")
    if path.is_dir():
        raise BadInput(f"{what} '{path}' is a directory, not an ONNX file")
    return path


def _parse(path: Path) -> onnx.ModelProto:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise BadInput(
            f"'{path}' is not a valid ONNX file (protobuf parse failed: truncated or corrupt?): "
            f"{str(exc).splitlines()[0]}"
        ) from None
    except OSError as exc:
        raise BadInput(f"cannot read '{path}': {exc.strerror or exc}") from None
    if proto.ir_version == 0 or not proto.HasField("graph"):
        raise BadInput(f"'{path}' is not an ONNX model (no IR version or no graph)")
    return proto


def _check_versions(proto: onnx.ModelProto, path: Path) -> None:
    if not MIN_IR_VERSION <= proto.ir_version <= MAX_IR_VERSION:
        raise BadInput(
            f"'{path}' has IR version {proto.ir_version}; normopt supports IR versions "
            f"{MIN_IR_VERSION}-{MAX_IR_VERSION} (those of the installed onnx {onnx.__version__})"
        )
    opsets = {o.domain: o.version for o in proto.opset_import}
    default = opsets.get("", opsets.get("ai.onnx"))
    if default is None:
        raise BadInput(f"'{path}' imports no default-domain (ai.onnx) opset")
    if not MIN_OPSET <= default <= MAX_OPSET:
        hint = (
            " (convert it first: onnx.version_converter.convert_version(model, 17))"
            if default < MIN_OPSET
            else ""
        )
        raise BadInput(
            f"'{path}' uses ai.onnx opset {default}; normopt supports opsets "
            f"{MIN_OPSET}-{MAX_OPSET}{hint}"
        )


def _check_external_files(proto: onnx.ModelProto, path: Path) -> None:
    """Every external data file must exist and hold offset+length bytes, for every tensor."""
    needed: dict[str, int] = {}
    for tensor in _all_tensor_protos(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            _check_raw_data(tensor, path)
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        except ValueError:
            raise BadInput(
                f"'{path}': tensor '{tensor.name}' has a non-numeric external data offset or length"
            ) from None
        if offset < 0 or length < 0:
            raise BadInput(
                f"'{path}': tensor '{tensor.name}' has a negative external data offset or length "
                f"({offset}, {length})"
            )
        needed[location] = max(needed.get(location, 0), offset + length)
    for location, end in needed.items():
        data = contained_data_file(path, location)
        if not data.is_file():
            raise BadInput(f"'{path}' references external data file '{data}', which is missing")
        stat = data.stat()
        if stat.st_nlink > 1:  # onnx refuses to read such a file (another name may alias it)
            raise BadInput(
                f"external data file '{data}' has {stat.st_nlink} hard links; onnx does not read "
                "a data file with several names: copy it to a file of its own"
            )
        size = stat.st_size
        if size < end:
            raise BadInput(
                f"external data file '{data}' is truncated: {size} bytes, tensors need {end}"
            )


# 4-bit types pack two elements a byte (FLOAT4E2M1 since onnx 1.18)
_HALF_BYTE = {
    getattr(onnx.TensorProto, n)
    for n in ("INT4", "UINT4", "FLOAT4E2M1")
    if hasattr(onnx.TensorProto, n)
}


def _check_raw_data(tensor: onnx.TensorProto, path: Path) -> None:
    """An embedded tensor's raw bytes must be as long as its shape and dtype say (a short one
    made numpy raise where a pass read it: exit 4)."""
    if not tensor.HasField("raw_data") or tensor.data_type == onnx.TensorProto.STRING:
        return
    count = math.prod(tensor.dims)
    if tensor.data_type in _HALF_BYTE:
        expected = (count + 1) // 2
    else:
        try:
            size = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            return  # a dtype onnx does not map: the checker or onnxruntime judge it
        expected = count * size
    if len(tensor.raw_data) != expected:
        raise BadInput(
            f"'{path}': tensor '{tensor.name}' of shape {list(tensor.dims)} holds "
            f"{len(tensor.raw_data)} bytes of data, not {expected}"
        )


def contained_data_file(path: Path, location: str) -> Path:
    """The data file `location` names, which must lie in the model's folder once every symlink
    is resolved (normopt's own check: onnx's checker stopped refusing escapes in onnx 1.23)."""
    folder = path.parent.resolve()
    if not location:
        raise BadInput(f"'{path}' names an external data file with an empty location")
    if Path(location).is_absolute() or Path(location).drive:
        raise BadInput(
            f"'{path}' names external data at the absolute location '{location}'; a location "
            "must be relative to the model's folder"
        )
    data = path.parent / location
    if not data.resolve().is_relative_to(folder):
        raise BadInput(
            f"'{path}' names external data at '{location}', which resolves to "
            f"'{data.resolve()}', outside the model's folder '{folder}'"
        )
    return data


def _all_tensor_protos(graph: onnx.GraphProto):
    """Every tensor of the graph and its subgraphs: initializers and attribute tensors."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensor_protos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensor_protos(g)


def parse_checked(path: Path) -> onnx.ModelProto:
    """The model's protobuf without its external data, every check above passed."""
    proto = _parse(path)
    _check_versions(proto, path)
    _check_external_files(proto, path)
    return proto
