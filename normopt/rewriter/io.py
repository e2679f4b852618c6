"""Load and save ONNX models through onnx-ir, safely.

- Loading validates the file first (exists, parses, checker-valid, supported opset and IR version,
  every external data file present and long enough) and raises `BadInput` with one line saying
  what is wrong. External data stays memory-mapped: weights are read only when a pass touches
  them, so memory stays near one copy of the model.
- Saving is atomic: the model (and its external data file) is written into a temporary folder
  beside the destination, checked, and only then renamed into place, data file first. A failed
  save or verification leaves no partial output, and the input is never written to (even with
  `--in-place`: the old data file stays valid for the memory maps reading it until the rename).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from normopt.errors import BadInput
from normopt.rewriter import ort_ops  # noqa: F401  (checker knows ORT's contrib norm ops)

# The upper bounds are what onnxruntime 1.31 (which verifies every rewrite) can load.
MIN_OPSET = 13
MAX_OPSET = 26
MIN_IR_VERSION = 7
MAX_IR_VERSION = 13
# A protobuf cannot exceed 2 GiB; leave room for the graph itself.
EMBEDDED_LIMIT_BYTES = 1_800_000_000
EXTERNAL_THRESHOLD_BYTES = 1024


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
            f"{MIN_IR_VERSION}-{MAX_IR_VERSION}"
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
    for tensor in _all_initializer_protos(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        needed[location] = max(needed.get(location, 0), end)
    for location, end in needed.items():
        data = path.parent / location
        if not data.is_file():
            raise BadInput(f"'{path}' references external data file '{data}', which is missing")
        size = data.stat().st_size
        if size < end:
            raise BadInput(
                f"external data file '{data}' is truncated: {size} bytes, tensors need {end}"
            )


def _all_initializer_protos(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializer_protos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_initializer_protos(g)


def load(path: str | os.PathLike) -> ir.Model:
    """Validate and load a model; external data stays memory-mapped (read on first access)."""
    path = check_readable_file(path)
    # The checker first, by path (it handles > 2 GB models and resolves external data): its
    # C++ copy of an embedded model is gone before ours is parsed, so memory peaks at what one
    # parse costs, not at a second copy beside the first. Its verdict waits for the more
    # specific checks below (not ONNX, version, missing data file), which come first.
    try:
        onnx.checker.check_model(str(path))
        checker_error = None
    except Exception as exc:  # ValidationError, or a parse failure the checks below explain
        checker_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    proto = _parse(path)
    _check_versions(proto, path)
    _check_external_files(proto, path)
    if checker_error is not None:
        raise BadInput(f"'{path}' fails onnx.checker: {checker_error}")
    model = ir.serde.deserialize_model(proto)
    del proto
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return model


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


@dataclass
class StagedModel:
    """A model written into a temporary folder beside its destination, not yet visible there."""

    path: Path
    destination: Path
    data_name: str | None

    def commit(self) -> None:
        """Move into place: data file first, so the model never points at a missing file."""
        if self.data_name:
            os.replace(self.path.parent / self.data_name, self.destination.parent / self.data_name)
        os.replace(self.path, self.destination)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)


def stage(
    model: ir.Model,
    destination: str | os.PathLike,
    *,
    external_data: bool,
    progress: Callable[[int, int], None] | None = None,
) -> StagedModel:
    """Write `model` next to `destination` without touching it; `commit()` publishes it.

    With `external_data`, every initializer over EXTERNAL_THRESHOLD_BYTES goes to
    `<destination name>.data` (all tensors are rewritten, so nothing points at the input's data
    file). Without it the model is embedded, which protobuf allows only up to 2 GiB.
    `progress(done, total)` is called after each external tensor is written.
    """
    destination = Path(destination)
    if not external_data and initializer_bytes(model) > EMBEDDED_LIMIT_BYTES:
        external_data = True
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    staged = StagedModel(
        tmpdir / destination.name, destination, destination.name + ".data" if external_data else None
    )
    try:
        ir.save(
            model,
            staged.path,
            external_data=staged.data_name,
            size_threshold_bytes=EXTERNAL_THRESHOLD_BYTES,
            callback=(lambda _t, info: progress(info.index + 1, info.total)) if progress else None,
        )
    except BaseException:
        staged.discard()
        raise
    return staged


def save(model: ir.Model, destination: str | os.PathLike, *, external_data: bool) -> None:
    """Atomically write `model` to `destination` (see `stage`)."""
    stage(model, destination, external_data=external_data).commit()
