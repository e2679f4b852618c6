"""How verification fits in memory: an estimate of what a full run and a run by segments
(normopt.segments) need, against what the machine has, decided before any work.

The estimates are linear in the weights' bytes, with factors measured on onnxruntime's CPU
session (ORT_DISABLE_ALL; synthetic GPT-style decoders, `benchmarks/llm_scale.py`):
  full:   BASE + 1.1 x float32 weights + 3 x float16/bfloat16 weights (onnxruntime's CPU has no
          float16 MatMul: it computes them in float32, an upcast copy of each weight);
  local:  BASE + 4 x the largest segment's weight bytes (a segment's mapped pages, onnxruntime's
          copy and its prepacked or upcast weights: 2.5x for float32, up to 4x for float16).
Activations at verification's shapes (a few tokens) are within BASE's margin.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx

from normopt.errors import BadInput

GB = 1e9
BASE = int(0.5 * GB)
FULL = (1.1, 3.0)  # bytes per byte of (other, half-precision) weights
LOCAL = 4.0
SEGMENT_MAX = 1 << 30  # larger segments save little time and cost memory
HEADROOM = 0.85  # of the available memory an estimate may use
METHODS = ("auto", "full", "local")
_HALF = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def parse_size(text: str) -> int:
    """'24G', '1.5GB', '800M', '512MiB' or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise BadInput(f"--max-memory {text!r}: give a size such as 16G, 800M or 2.5GB")
    number = float(match.group(1))
    power = " kmgt".index(match.group(2) or " ")
    base = 1024 if match.group(3) == "ib" else 1000
    return int(number * base**power)


def available_bytes() -> int:
    """Memory this process can still take: MemAvailable, bounded by a cgroup limit."""
    free = _meminfo().get("MemAvailable", 0)
    for limit_file, used_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        limit, used = _read_int(limit_file), _read_int(used_file)
        if limit is not None and used is not None and limit < 1 << 60:
            free = min(free, max(0, limit - used)) if free else max(0, limit - used)
    return free or (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _meminfo() -> dict[str, int]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0]) * 1024
    return out


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Weights:
    """A model's weight bytes by kind, and the most one node reads."""

    other: int
    half: int
    largest_node: int

    def full(self) -> int:
        return BASE + int(FULL[0] * self.other + FULL[1] * self.half)

    def local(self, budget: int) -> int:
        """What a run by segments of `budget` weight bytes (or the largest node) needs,
        assuming the worst: every weight of the segment half precision."""
        return BASE + int(LOCAL * max(budget, self.largest_node))


def weights_of(sizes: Mapping[str, tuple[int, bool]], reads: Iterable[Iterable[str]]) -> Weights:
    """From each weight's (bytes, half precision) by name and the names each node reads."""
    half = sum(size for size, is_half in sizes.values() if is_half)
    largest = max(
        (sum(sizes[n][0] for n in set(names) if n in sizes) for names in reads), default=0
    )
    return Weights(sum(size for size, _ in sizes.values()) - half, half, largest)


def proto_weights(graph: onnx.GraphProto) -> Weights:
    """A model file's weights (its protobuf, external data not read)."""
    from normopt.segments import node_reads, tensor_bytes

    sizes = {t.name: (tensor_bytes(t), t.data_type in _HALF) for t in graph.initializer}
    return weights_of(sizes, (node_reads(node) for node in graph.node))


def ir_weights(model) -> Weights:
    """An IR model's weights (onnx_ir.Model; its graph's nodes)."""
    import onnx_ir as ir

    half = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    sizes = {
        name: (value.const_value.nbytes, value.const_value.dtype in half)
        for name, value in model.graph.initializers.items()
        if value.const_value is not None
    }
    return weights_of(
        sizes, ([v.name for v in node.inputs if v is not None] for node in model.graph)
    )


@dataclass(frozen=True)
class VerifyPlan:
    """Which verification runs, why, and its figures (bytes)."""

    method: str  # "full" or "local"
    why: str
    needed: int
    available: int
    budget: int | None = None  # a segment's weight bytes (local)

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "why": self.why,
            "needed_bytes": self.needed,
            "available_bytes": self.available,
            "segment_bytes": self.budget,
        }


def plan(weights: Weights, method: str = "auto", max_memory: int | None = None) -> VerifyPlan:
    """The verification to run on models of `weights` (the larger of the two) by `method`
    (one of METHODS, checked by VerifyOptions), or BadInput (exit 2) with the figures where it
    cannot fit."""
    available = max_memory if max_memory is not None else available_bytes()
    usable = int(HEADROOM * available)
    source = "--max-memory" if max_memory is not None else "available"
    full = weights.full()
    if method == "full" or (method == "auto" and full <= usable):
        if full > usable:
            raise BadInput(_too_big("full", full, available, source, " (try --verify local)"))
        why = "asked for" if method == "full" else "fits in memory"
        return VerifyPlan(
            "full", f"{why}: needs ~{_gb(full)}, {_gb(available)} {source}", full, available
        )
    total = weights.other + weights.half
    budget = max(  # at most an eighth of the model: a run by segments is for saving memory
        weights.largest_node, min(SEGMENT_MAX, (usable - BASE) // int(LOCAL), -(-total // 8))
    )
    local = weights.local(budget)
    if local > usable:
        raise BadInput(
            _too_big(
                "local",
                local,
                available,
                source,
                f" (its largest node reads {_gb(weights.largest_node)} of weights; a full one "
                f"needs ~{_gb(full)})",
            )
        )
    why = "asked for" if method == "local" else f"a full one needs ~{_gb(full)}"
    return VerifyPlan(
        "local",
        f"{why}; by segments of {_gb(budget)} needs ~{_gb(local)}, {_gb(available)} {source}",
        local,
        available,
        budget,
    )


def _too_big(method: str, needed: int, available: int, source: str, hint: str) -> str:
    return (
        f"not enough memory to verify: a {method} verification needs ~{_gb(needed)}, "
        f"{_gb(available)} {source}{hint}; nothing written (--no-verify skips verification)"
    )


def _gb(size: int) -> str:
    return f"{size / GB:.2f} GB" if size >= 0.1 * GB else f"{size / 1e6:.0f} MB"
