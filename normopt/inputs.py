"""The inputs a model is run on: the user's (.npz or arrays, checked against the model's
input specs) or generated from those specs (floats ~ N(0, 1), ids inside the tables they index,
masks all ones, symbolic dims from --dim/--shape or defaults), `trials` draws, and the same
draws with every unset dim at 1 to retry with once."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx_ir as ir

from normopt.errors import BadInput
from normopt.rewriter.graph import FORWARDS, dim_list, dims_text, forwards, is_op
from normopt.rewriter.io import check_readable_file

DEFAULT_SEED = 0


@dataclass(frozen=True)
class InputOptions:
    """What a model is run on: `inputs` a mapping of arrays, an .npz path, or None (generated
    from the model's input specs with `dims`, `shapes` and `seed`, `trials` draws)."""

    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None
    dims: Mapping[str, int] = field(default_factory=dict)
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # whole shapes by name
    seed: int = DEFAULT_SEED
    trials: int = 2  # input draws (generated inputs; given inputs are one trial)

    def __post_init__(self) -> None:
        # named as the API and the CLI name them (trials / --trials)
        if not _whole(self.trials) or self.trials < 1:
            raise BadInput(f"trials (--trials) must be an integer >= 1, got {self.trials!r}")
        if not _whole(self.seed) or self.seed < 0:
            raise BadInput(f"seed (--seed) must be an integer >= 0, got {self.seed!r}")
        for name, size in self.dims.items():
            if not _whole(size) or size < 1:
                raise BadInput(f"dims (--dim) {name}={size!r}: a dimension is an integer >= 1")
        for name, shape in self.shapes.items():
            if not all(_whole(size) for size in shape):
                raise BadInput(f"shapes (--shape) {name}={shape!r}: sizes are integers")
            if any(size < 1 for size in shape):
                shape_text = "x".join(map(str, shape))
                raise BadInput(f"--shape {name}={shape_text}: every dimension must be at least 1")


def _whole(value: object) -> bool:
    """An integer (numpy's too), not a bool or a float."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def default_dim(name: str | None) -> int:
    """Size for a symbolic dimension the user did not set with --dim."""
    if name is None:
        return 1
    lowered = name.lower()
    if "batch" in lowered:
        return 2
    if re.search(r"height|width|(^|_)(h|w)$", lowered):
        return 64
    return 16


def _gather_bound(value: ir.Value) -> int | None:
    """Smallest table size among the Gathers this value indexes (through shape-only ops)."""
    bounds, stack, seen = [], [value], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        for use in v.uses():
            node = use.node
            if node.op_type == "Gather" and use.idx == 1:
                shape = node.inputs[0].shape
                axis = node.attributes.get_int("axis", 0)
                if shape is not None and isinstance(shape[axis], int):
                    bounds.append(shape[axis])
            elif node.op_type in FORWARDS and (use.idx == 0 or node.op_type == "Concat"):
                stack.append(node.outputs[0])
    return min(bounds) if bounds else None


def _resolve_shape(
    value: ir.Value, dims: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[int, ...]:
    if value.name in shapes:
        shape = tuple(shapes[value.name])
        if value.shape is not None and (
            len(shape) != len(value.shape)
            or any(isinstance(d, int) and d != n for d, n in zip(value.shape, shape))
        ):
            raise BadInput(
                f"--shape {value.name}={'x'.join(map(str, shape))} does not fit the input's shape "
                f"{dims_text(dim_list(value.shape))}"
            )
        return shape
    if value.shape is None:
        raise BadInput(
            f"input '{value.name}' has no shape; pass --shape {value.name}=AxB or --inputs FILE.npz"
        )
    out = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(dims[d.value] if d.value in dims else default_dim(d.value))
    return tuple(out)


def model_inputs(model: ir.Model) -> list[ir.Value]:
    """The inputs a caller must feed (initializers listed as inputs have defaults)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def describe_inputs(model: ir.Model) -> str:
    """The inputs a caller feeds, with their dims: `ids [batch, seq], mask [batch, seq]`."""
    return (
        ", ".join(f"{v.name} {dims_text(dim_list(v.shape))}" for v in model_inputs(model)) or "none"
    )


def make_inputs(
    model: ir.Model,
    dims: Mapping[str, int] | None = None,
    seed: int = DEFAULT_SEED,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    unset: int | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs for `model`: floats ~ N(0, 1); integer ids inside the tables they index;
    integer/bool inputs named like masks all ones; an input's whole shape from `shapes`, its
    symbolic dims from `dims`, else defaults (`unset`, when given, for every named dim not set;
    unnamed ones are 1 anyway).
    A name in `dims` or `shapes` the model does not have is an error that lists the real ones."""
    dims, shapes = dict(dims or {}), dict(shapes or {})
    inputs = model_inputs(model)
    known = {
        d.value
        for v in inputs
        if v.shape is not None
        for d in v.shape
        if not isinstance(d, int) and d.value
    }
    if unknown := sorted(set(dims) - known):
        raise BadInput(
            f"--dim {', '.join(unknown)}: no input has a dimension of that name; the inputs are "
            f"{describe_inputs(model)} (use --shape NAME=AxB for an unnamed dimension)"
        )
    if unknown := sorted(set(shapes) - {v.name for v in inputs}):
        raise BadInput(
            f"--shape {', '.join(unknown)}: the model has no such input; its inputs are "
            f"{describe_inputs(model)}"
        )
    if unset is not None:
        dims = {**{name: unset for name in known}, **dims}
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in inputs:
        if not isinstance(value.type, ir.TensorType):
            raise BadInput(f"input '{value.name}' is a {value.type}, not a tensor; pass --inputs")
        shape = _resolve_shape(value, dims, shapes)
        dtype = value.dtype.numpy()
        if np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_ or np.issubdtype(dtype, np.integer):
            if "mask" in value.name.lower():
                feeds[value.name] = np.ones(shape, dtype)
            else:
                high = 2 if dtype == np.bool_ else (_gather_bound(value) or 2)
                feeds[value.name] = rng.integers(0, high, shape).astype(dtype)
        else:
            raise BadInput(
                f"cannot generate input '{value.name}' of type {value.dtype}; pass --inputs"
            )
    return feeds


def load_inputs(path: str | os.PathLike, model: ir.Model) -> dict[str, np.ndarray]:
    path = check_readable_file(path, "inputs file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise BadInput(f"cannot read inputs file '{path}': {exc}") from None
    return check_feeds(model, arrays, f"inputs file '{path}'")


def check_feeds(
    model: ir.Model, arrays: Mapping[str, np.ndarray], source: str, any_first_dim: bool = False
) -> dict[str, np.ndarray]:
    """The arrays for the model's inputs, each checked against the input's dtype, rank and
    static dims (with `any_first_dim`, all but the first: samples to be batched), so a wrong
    inputs file is blamed on the file, not on the model."""
    missing = [v.name for v in model_inputs(model) if v.name not in arrays]
    if missing:
        known = ", ".join(sorted(arrays)) or "nothing"
        raise BadInput(f"{source} lacks input(s) {', '.join(missing)} (it holds {known})")
    feeds = {}
    for value in model_inputs(model):
        array = np.asarray(arrays[value.name])
        expected = value.dtype.numpy() if value.dtype is not None else None
        if expected is not None and array.dtype != expected:
            raise BadInput(
                f"{source}: input '{value.name}' is {array.dtype}, the model expects "
                f"{np.dtype(expected)}"
            )
        if value.shape is not None:
            dims = list(value.shape)
            skip = 1 if any_first_dim else 0
            wrong = len(dims) != array.ndim or any(
                isinstance(d, int) and d != n for d, n in zip(dims[skip:], array.shape[skip:])
            )
            if wrong:
                want = [d if isinstance(d, int) else (d.value or "?") for d in dims]
                raise BadInput(
                    f"{source}: input '{value.name}' has shape {list(array.shape)}, the model "
                    f"expects {want}"
                )
        feeds[value.name] = array
    return feeds


def input_trials(spec: ir.Model, options: InputOptions) -> list[dict[str, np.ndarray]]:
    """The input sets verification runs on: the given ones, or `options.trials` generated draws."""
    if isinstance(options.inputs, Mapping):
        return [check_feeds(spec, options.inputs, "the inputs given")]
    if options.inputs is not None:
        return [load_inputs(options.inputs, spec)]
    layout = cache_layout(spec)
    if layout is not None:  # a decoder: a decode step, then a prefill (trials 1: the step)
        points = [DECODE, PREFILL][: options.trials]
        return [
            _cache_inputs(spec, layout, p, options, options.seed + i) for i, p in enumerate(points)
        ]
    return [
        make_inputs(spec, options.dims, options.seed + i, options.shapes)
        for i in range(options.trials)
    ]


def fallback_trials(spec: ir.Model, options: InputOptions) -> list[dict[str, np.ndarray]] | None:
    """Where inputs are generated: the same draws with every symbolic dim the user did not set
    at 1 (a model that runs only at batch 1, or at its exported size), to retry with once."""
    if options.inputs is not None:
        return None
    layout = cache_layout(spec)
    if layout is not None:  # one step of one token after one, at batch 1
        return [_cache_inputs(spec, layout, (1, 1), options, options.seed)]
    return [
        make_inputs(spec, options.dims, options.seed + i, options.shapes, unset=1)
        for i in range(options.trials)
    ]


# ----------------------------------------------------------------- decoders with a KV cache


@dataclass(frozen=True)
class CacheLayout:
    """A decoder's KV cache as the graph ties it: each past input with its sequence axis (the
    axis a Concat joins it on with the new keys or values), the token input (its axis 1 is the
    new length), the attention mask (past + new long) and the position ids (past .. past + new
    - 1). Verification runs a decode step (past > 0, one new token) and a prefill (past 0)."""

    past: dict[str, int]
    tokens: str | None
    mask: str | None
    positions: str | None

    def sizes(self, past: int, new: int) -> str:
        return f"past {past}, new {new}" + (f", mask {past + new}" if self.mask else "")


# the points verification runs a decoder at: (past length, new tokens)
DECODE, PREFILL = (4, 1), (0, 4)


def _read_through_casts(value: ir.Value) -> list[tuple[ir.Node, ir.Value]]:
    """(reader, the value it reads) for `value` and what Cast / Identity / a Concat of it alone
    (TorchScript's first cache update) pass it on to."""
    found, stack = [], [value]
    while stack:
        v = stack.pop()
        for node in {use.node for use in v.uses()}:
            if forwards(node, "value") or (is_op(node, "Concat") and len(node.inputs) == 1):
                stack.extend(node.outputs)
            else:
                found.append((node, v))
    return found


def cache_layout(model: ir.Model) -> CacheLayout | None:
    """The KV cache of a decoder export, or None: past inputs are float inputs that a Concat
    joins with values the graph computes (the new keys / values)."""
    past: dict[str, int] = {}
    inputs = model_inputs(model)
    for value in inputs:
        if value.dtype is None or not value.dtype.is_floating_point() or value.shape is None:
            continue
        for node, read in _read_through_casts(value):
            computed = [v for v in node.inputs if v is not read and v is not None]
            if node.op_type == "Concat" and any(not v.is_graph_input() for v in computed):
                past[value.name] = node.attributes.get_int("axis", 0) % len(value.shape)
    if not past:
        return None
    names = {v.name: v for v in inputs}
    tokens = next((v.name for v in inputs if _gather_bound(v) is not None), None)
    mask = next((n for n, v in names.items() if "mask" in n.lower() and _rank(v) == 2), None)
    positions = next((n for n in names if "position" in n.lower()), None)
    return CacheLayout(past, tokens, mask, positions)


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _cache_shapes(
    model: ir.Model, layout: CacheLayout, point: tuple[int, int], options: InputOptions, batch: int
) -> dict[str, tuple[int, ...]]:
    """Whole shapes of the cache's inputs at (past, new): symbolic batch, sequence, mask and
    position dims tied; static dims as they are; inputs the user shaped are left alone."""
    past_len, new = point
    shapes = {}
    for value in model_inputs(model):
        name = value.name
        if name in options.shapes or value.shape is None:
            continue
        tied = {0: batch}
        if name in layout.past:
            tied[layout.past[name]] = past_len
        elif name == layout.tokens and len(value.shape) > 1:
            tied[1] = new
        elif name == layout.mask:
            tied[1] = past_len + new
        elif name == layout.positions:
            tied = {0: new} if len(value.shape) == 1 else {0: batch, len(value.shape) - 1: new}
        else:
            continue
        dims = _resolve_shape(value, options.dims, {})
        shapes[name] = tuple(
            tied.get(k, d) if not isinstance(value.shape[k], int) else d for k, d in enumerate(dims)
        )
    return shapes


def _cache_inputs(
    model: ir.Model, layout: CacheLayout, point: tuple[int, int], options: InputOptions, seed: int
) -> dict[str, np.ndarray]:
    """Random inputs at a cache point; masks all ones, position ids past .. past + new - 1."""
    batch = 1 if point == (1, 1) else default_dim("batch")
    shapes = {**_cache_shapes(model, layout, point, options, batch), **options.shapes}
    feeds = make_inputs(model, options.dims, seed, shapes)
    if layout.positions is not None and layout.positions not in options.shapes:
        array = feeds[layout.positions]
        steps = np.arange(point[0], point[0] + point[1], dtype=array.dtype)
        feeds[layout.positions] = np.broadcast_to(steps, array.shape).copy()
    return feeds


def cache_note(spec: ir.Model, options: InputOptions) -> str | None:
    """How generated inputs tie a decoder's cache (for the report), or None."""
    layout = cache_layout(spec) if options.inputs is None else None
    if layout is None:
        return None
    points = [("decode step", DECODE), ("prefill", PREFILL)][: options.trials]
    runs = "; ".join(f"{what}: {layout.sizes(*point)}" for what, point in points)
    return f"KV cache of {len(layout.past)} past input(s), dims tied: {runs}"
