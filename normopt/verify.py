"""Check that two models compute the same function, by running both in onnxruntime.

Both run on CPU with ORT_DISABLE_ALL, so ORT's own fusions can neither hide nor cause a
difference, one session at a time (never two copies of the weights in memory), on the same
inputs: the user's `.npz`, or random ones generated from the first model's input specs.

An output passes when `max|a - b| <= atol + rtol * max|a|`: the error is measured against the
output's own scale, with (rtol, atol) chosen per dtype unless given. Integer, bool and string
outputs must match exactly; NaN and Inf must sit in the same places.

A deep model disagrees with itself at that level already: its float rounding moves its outputs
by more than a fixed rtol allows (a 12-layer RepBN ViT-S: 1.5e-5 of its scale between
onnxruntime's optimization levels). So, unless the user set `rtol`/`atol` (then those are the
bound), an output also passes when its error is within NOISE_FACTOR times the original's own
noise on the same inputs (A under ORT_ENABLE_ALL, and A on its float inputs scaled by 1 + 1e-7;
the larger change of the two) and within NOISE_CAP times the default tolerance, a bound no
noise loosens. Inputs are drawn `trials` times (generated inputs only).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir

from normopt.errors import BadInput
from normopt.plugins.spec import DOMAIN as PLUGIN_DOMAIN
from normopt.rewriter.graph import FORWARDS, dim_list, dims_text
from normopt.rewriter.io import check_readable_file, first_line
from normopt.schema import document, inputs_json

# (rtol against the output's max |value|, atol), per output dtype.
TOLERANCES: dict[np.dtype, tuple[float, float]] = {
    np.dtype(np.float64): (1e-10, 1e-12),
    np.dtype(np.float32): (1e-5, 1e-6),
    np.dtype(np.float16): (1e-2, 1e-3),
    np.dtype(ml_dtypes.bfloat16): (5e-2, 1e-2),
}
DEFAULT_SEED = 0
NOISE_FACTOR = 4.0
NOISE_CAP = 10.0
INPUT_NUDGE = 1e-7  # relative change of the float inputs for the second noise probe


@dataclass(frozen=True)
class VerifyOptions:
    """What verification runs on and how it judges. `inputs`: a mapping of arrays, an .npz
    path, or None (generated from the model's input specs with `dims` and `seed`); `rtol` /
    `atol` override the per-dtype defaults for every float output."""

    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None
    dims: Mapping[str, int] = field(default_factory=dict)
    shapes: Mapping[str, tuple[int, ...]] = field(
        default_factory=dict
    )  # whole shapes per input name
    rtol: float | None = None
    atol: float | None = None
    seed: int = DEFAULT_SEED
    trials: int = 2  # input draws (generated inputs; given inputs are one trial)

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise BadInput(f"--trials must be at least 1, got {self.trials}")
        for name, value in (("rtol", self.rtol), ("atol", self.atol)):
            if value is not None and not (value >= 0 and np.isfinite(value)):
                raise BadInput(f"--{name} must be a finite number >= 0, got {value}")
        for name, size in self.dims.items():
            if size < 1:
                raise BadInput(f"--dim {name}={size}: a dimension must be at least 1")
        for name, shape in self.shapes.items():
            if any(size < 1 for size in shape):
                raise BadInput(
                    f"--shape {name}={'x'.join(map(str, shape))}: every dimension must be at least "
                    "1"
                )


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


def input_trials(spec: ir.Model, options: VerifyOptions) -> list[dict[str, np.ndarray]]:
    """The input sets verification runs on: the given ones, or `options.trials` generated draws."""
    if isinstance(options.inputs, Mapping):
        return [check_feeds(spec, options.inputs, "the inputs given")]
    if options.inputs is not None:
        return [load_inputs(options.inputs, spec)]
    return [
        make_inputs(spec, options.dims, options.seed + i, options.shapes)
        for i in range(options.trials)
    ]


def fallback_trials(spec: ir.Model, options: VerifyOptions) -> list[dict[str, np.ndarray]] | None:
    """Where inputs are generated: the same draws with every symbolic dim the user did not set
    at 1 (a model that runs only at batch 1, or at its exported size), to retry with once."""
    if options.inputs is not None:
        return None
    return [
        make_inputs(spec, options.dims, options.seed + i, options.shapes, unset=1)
        for i in range(options.trials)
    ]


class ModelRunError(BadInput):
    """onnxruntime could not load or run `path` (which model failed decides the exit code;
    `running`: it loaded, and failed on the inputs)."""

    def __init__(self, path: str | os.PathLike, message: str, running: bool = False) -> None:
        super().__init__(message)
        self.path = Path(path)
        self.running = running


def run_ort(path: str | os.PathLike, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a model once on ORT CPU without graph optimizations; outputs by name."""
    return run_ort_all(path, [feeds])[0]


def run_ort_all(
    path: str | os.PathLike, feed_sets: list[Mapping[str, np.ndarray]], optimized: bool = False
) -> list[dict[str, np.ndarray]]:
    """Run a model on each input set in one ORT CPU session, without graph optimizations
    (with all of them when `optimized`); outputs by name."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types, all one-line worthy
        reason = _first_line(exc)
        if f"{PLUGIN_DOMAIN}:" in reason:  # normopt's TensorRT plugins: run their CPU reference
            return _run_lowered(Path(path), feed_sets, optimized)
        if "Could not find an implementation" in reason:
            reason += (
                " (onnxruntime's CPU build has no kernel for it in this dtype, e.g. bfloat16;"
                " verification is impossible there: rewrite with --no-verify)"
            )
        raise ModelRunError(path, f"onnxruntime cannot load '{path}': {reason}") from None
    try:
        names = [o.name for o in session.get_outputs()]
        return [dict(zip(names, session.run(names, dict(feeds)))) for feeds in feed_sets]
    except Exception as exc:
        raise ModelRunError(
            path, f"onnxruntime failed to run '{path}': {_first_line(exc)}", running=True
        ) from None


def _run_lowered(
    path: Path, feed_sets: list[Mapping[str, np.ndarray]], optimized: bool
) -> list[dict[str, np.ndarray]]:
    """A --target tensorrt graph: its plugin nodes lowered to their float64 references
    (normopt.plugins.reference), written to a temporary folder beside it, run as any model."""
    from normopt.plugins.reference import lower
    from normopt.rewriter import io

    model = io.load(path)
    if not lower(model):
        raise ModelRunError(
            path,
            f"onnxruntime cannot load '{path}': it uses domain '{PLUGIN_DOMAIN}' but no "
            "normopt plugin op",
        )
    with io.temp_folder(path) as folder:
        lowered = folder / "lowered.onnx"
        io.save(model, lowered, external_data=io.uses_external_data(model))
        return run_ort_all(lowered, feed_sets, optimized)


def _first_line(exc: Exception) -> str:
    """ORT's message without its status prefix and C++ source location."""
    line = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(exc))
    return re.sub(r"\S*onnxruntime_src\S* (\S+\(.*?\) )?", "", line)


@dataclass
class OutputCheck:
    name: str
    dtype: str
    shape: list[int]
    ok: bool
    max_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    rtol: float | None = None
    atol: float | None = None
    problem: str | None = None
    skipped: str | None = None  # why this output was not required to match
    noise: float | None = None  # max abs change of the original itself (measured only when needed)
    within_noise: bool = False  # passed because its error is within the original's own noise
    trial: int = 0  # the input draw this check is from (the worst one)


def compare_output(
    name: str,
    ref: np.ndarray,
    got: np.ndarray | None,
    rtol: float | None,
    atol: float | None,
    noise: float | None = None,
) -> OutputCheck:
    """Judge `got` against `ref`; `noise` (max abs change of the original under harmless
    evaluations) lets an error through that tolerance alone rejects, unless rtol/atol were set."""
    check = OutputCheck(name, str(ref.dtype), list(ref.shape), ok=False)
    if got is None:
        check.problem = "missing from the second model"
        return check
    if got.shape != ref.shape or got.dtype != ref.dtype:
        check.problem = f"second model gives {got.dtype}{list(got.shape)}"
        return check
    is_float = np.issubdtype(ref.dtype, np.floating) or ref.dtype == ml_dtypes.bfloat16
    if not is_float:
        mismatches = int(np.count_nonzero(ref != got))
        check.ok = mismatches == 0
        check.max_abs = 0.0 if check.ok else float(mismatches)
        if not check.ok:
            check.problem = f"{mismatches} element(s) differ (exact match required)"
        return check
    a, b = ref.astype(np.float64), got.astype(np.float64)
    default_rtol, default_atol = TOLERANCES.get(ref.dtype, TOLERANCES[np.dtype(np.float32)])
    check.rtol = default_rtol if rtol is None else rtol
    check.atol = default_atol if atol is None else atol
    finite = np.isfinite(a)
    if not np.array_equal(finite, np.isfinite(b)) or not np.array_equal(
        a[~finite], b[~finite], equal_nan=True
    ):
        check.problem = "NaN/Inf in different places"
        return check
    diff = np.abs(a[finite] - b[finite])
    scale = float(np.abs(a[finite]).max()) if diff.size else 0.0
    check.max_abs = float(diff.max()) if diff.size else 0.0
    check.max_rel = (
        check.max_abs / scale if scale else (0.0 if check.max_abs == 0 else float("inf"))
    )
    norms = np.linalg.norm(a[finite]) * np.linalg.norm(b[finite])
    check.cosine = float(np.dot(a[finite], b[finite]) / norms) if norms else 1.0
    check.ok = check.max_abs <= check.atol + check.rtol * scale
    check.noise = noise
    if not check.ok and noise is not None and rtol is None and atol is None:
        cap = default_atol + NOISE_CAP * default_rtol * scale
        check.ok = check.within_noise = check.max_abs <= min(NOISE_FACTOR * noise, cap)
    if not check.ok:
        check.problem = (
            f"max abs error {check.max_abs:.3g} > {check.atol:g} + {check.rtol:g} x scale "
            f"{scale:.3g}"
            + (
                ""
                if noise is None or rtol is not None or atol is not None
                else f", and > {NOISE_FACTOR:g} x the original's own noise {noise:.3g} (or over "
                "the cap "
                f"{NOISE_CAP:g} x that tolerance)"
            )
        )
    return check


def _noise(ref: dict, probes: list[dict]) -> dict[str, float]:
    """Per float output, the largest change of the original under the noise probes."""
    out = {}
    for name, a in ref.items():
        if not (np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16):
            continue
        a64, worst = a.astype(np.float64), 0.0
        for probe in probes:
            b = probe[name].astype(np.float64)
            both = np.isfinite(a64) & np.isfinite(b)
            if both.any():
                worst = max(worst, float(np.abs(a64[both] - b[both]).max()))
        out[name] = worst
    return out


def _nudged(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float inputs scaled by 1 + INPUT_NUDGE (others as they are)."""
    return {
        k: (v * v.dtype.type(1 + INPUT_NUDGE)).astype(v.dtype)
        if np.issubdtype(v.dtype, np.floating)
        else v
        for k, v in feeds.items()
    }


@dataclass
class VerifyReport:
    model_a: str
    model_b: str
    inputs: dict | None = None  # what it ran on (normopt.schema.inputs_json)
    outputs: list[OutputCheck] = field(default_factory=list)
    note: str | None = None  # how the inputs had to change (a retry with dims at 1)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def failures(self) -> list[OutputCheck]:
        return [o for o in self.outputs if not o.ok]

    def body(self) -> dict:
        """The comparison's own fields (also inside a rewrite's document)."""
        return {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "ok": self.ok,
            "note": self.note,
            "outputs": [vars(o) for o in self.outputs],
        }

    def to_json(self) -> dict:
        """`normopt verify`'s document (normopt.schema)."""
        return document(
            "verify",
            self.body(),
            exit_code=0 if self.ok else 1,
            seconds=self.seconds,
            inputs=self.inputs,
        )


def verify(
    model_a: str | os.PathLike,
    model_b: str | os.PathLike,
    options: VerifyOptions | None = None,
    *,
    trials: list[Mapping[str, np.ndarray]] | None = None,
    fallback: list[Mapping[str, np.ndarray]] | None = None,
    on_step: Callable[[str], None] | None = None,
    changed_on_request: Mapping[str, str] | None = None,
) -> VerifyReport:
    """Run A then B on the same inputs and compare every output of A by name.

    The inputs are `trials` when given (input sets already checked: A is then not loaded
    here; `fallback`: the generated ones with unset dims at 1, to retry with once when A fails on
    them), else those `options` name or generate from A's input specs. Where an output fails
    the tolerance, A's own noise is measured (A again under ORT_ENABLE_ALL and on nudged
    inputs) and judged against. `changed_on_request` maps outputs a rewrite changes at the
    user's request to the reason (compared and reported, not required to match). Raises
    BadInput when A cannot be loaded or run.
    """
    from normopt.rewriter.io import load

    start = time.perf_counter()
    options = options or VerifyOptions()
    model_a, model_b = Path(model_a), Path(model_b)
    check_readable_file(model_b)
    if trials is None:
        spec = load(model_a)
        trials, fallback = input_trials(spec, options), fallback_trials(spec, options)
        del spec
    report = VerifyReport(str(model_a), str(model_b))
    if on_step:
        on_step(f"running {model_a.name}")
    try:
        refs = run_ort_all(model_a, trials)
    except ModelRunError as exc:
        if not exc.running or fallback is None:
            raise
        generated = _shapes_text(trials[0])
        try:
            refs, trials = run_ort_all(model_a, fallback), fallback
        except ModelRunError:
            raise ModelRunError(
                model_a,
                f"{exc} (on generated inputs {generated}, and again with every symbolic "
                "dim at 1: set the sizes the model runs at with --dim NAME=VALUE or --shape "
                "NAME=AxB, or pass --inputs FILE.npz)",
                running=True,
            ) from None
        report.note = (
            f"'{model_a.name}' failed on the generated inputs {generated} ({exc}); "
            f"verified with every symbolic dim not set at 1: {_shapes_text(trials[0])}"
        )
    report.inputs = inputs_json(trials, options.inputs, options.seed)
    if on_step:
        on_step(f"running {model_b.name}")
    gots = run_ort_all(model_b, trials)
    checks = [
        [compare_output(n, r, got.get(n), options.rtol, options.atol) for n, r in ref.items()]
        for ref, got in zip(refs, gots)
    ]
    judged_by_noise = options.rtol is None and options.atol is None
    if judged_by_noise and any(not c.ok and c.rtol is not None for trial in checks for c in trial):
        if on_step:
            on_step(f"measuring {model_a.name}'s own noise")
        try:
            optimized = run_ort_all(model_a, trials, optimized=True)
        except ModelRunError:  # onnxruntime's optimizer can break a valid graph (fp16 LayerNorm
            optimized = [None] * len(trials)  # fusions): that probe is then not available
        nudged = run_ort_all(model_a, [_nudged(f) for f in trials])
        noise = [
            _noise(ref, [p for p in (o, n) if p is not None])
            for ref, o, n in zip(refs, optimized, nudged)
        ]
        checks = [
            [
                compare_output(n, r, got.get(n), options.rtol, options.atol, noise[t].get(n))
                for n, r in ref.items()
            ]
            for t, (ref, got) in enumerate(zip(refs, gots))
        ]
    report.outputs = [_worst([trial[i] for trial in checks]) for i in range(len(checks[0]))]
    for check in report.outputs:  # outputs the user asked to change are reported, not required
        if changed_on_request and check.name in changed_on_request:
            check.ok, check.skipped = True, changed_on_request[check.name]
    report.seconds["total"] = time.perf_counter() - start
    return report


def _shapes_text(feeds: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, v.shape)) or 'scalar'}" for k, v in feeds.items())


def _worst(checks: list[OutputCheck]) -> OutputCheck:
    """One output's check over the trials: the first failing one, else the largest error."""
    for t, check in enumerate(checks):
        check.trial = t
    failing = [c for c in checks if not c.ok]
    return failing[0] if failing else max(checks, key=lambda c: c.max_rel or 0.0)
