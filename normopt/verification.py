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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from normopt import memory
from normopt.errors import BadInput
from normopt.inputs import InputOptions, cache_note, fallback_trials, input_trials
from normopt.memory import VerifyPlan
from normopt.rewriter.io import check_readable_file
from normopt.schema import document, inputs_json, now
from normopt.sessions import ModelRunError, graph_facts
from normopt.verify_runs import Reference, Runner, plan_for, run_reference, segment_counts

# (rtol against the output's max |value|, atol), per output dtype.
TOLERANCES: dict[np.dtype, tuple[float, float]] = {
    np.dtype(np.float64): (1e-10, 1e-12),
    np.dtype(np.float32): (1e-5, 1e-6),
    np.dtype(np.float16): (1e-2, 1e-3),
    np.dtype(ml_dtypes.bfloat16): (5e-2, 1e-2),
}
VERIFY_BACKENDS = ("ort-cpu", "openvino")
NOISE_FACTOR = 4.0
NOISE_CAP = 10.0
INPUT_NUDGE = 1e-7  # relative change of the float inputs for the second noise probe
# a dtype's unit roundoff: what one rounding can change, relatively
ROUNDOFF = {
    np.dtype(np.float64): 2.0**-53,
    np.dtype(np.float32): 2.0**-24,
    np.dtype(np.float16): 2.0**-11,
    np.dtype(ml_dtypes.bfloat16): 2.0**-8,
}


def compute_dtype(path: str | os.PathLike) -> np.dtype:
    """The least precise float type the graph at `path` computes in (sessions.graph_facts)."""
    return graph_facts(path).compute


def _less_precise(a: np.dtype, b: np.dtype | None) -> np.dtype:
    if b is None or ROUNDOFF.get(b, 0.0) <= ROUNDOFF.get(a, 0.0):
        return a
    return b


@dataclass(frozen=True)
class VerifyOptions(InputOptions):
    """What verification runs on (InputOptions) and how it judges: `rtol` / `atol` override
    the per-dtype defaults for every float output. `method`: run each model whole ("full"), a
    segment at a time ("local", normopt.segments), or whichever fits ("auto", normopt.memory);
    `max_memory`: the bytes it may use (default: what the machine has available)."""

    rtol: float | None = None
    atol: float | None = None
    method: str = "auto"
    max_memory: int | None = None
    backend: str = "ort-cpu"  # or "openvino": both models run on OpenVINO's CPU plugin

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in memory.METHODS:
            raise BadInput(
                f"method (--verify) {self.method!r}: choose one of {', '.join(memory.METHODS)}"
            )
        if self.backend not in VERIFY_BACKENDS:
            raise BadInput(
                f"backend (--backend) {self.backend!r}: verify runs on {', '.join(VERIFY_BACKENDS)}"
            )
        if self.backend == "openvino" and self.method == "local":
            raise BadInput("--method local runs on onnxruntime (--backend ort-cpu) only")
        if self.max_memory is not None and not (
            isinstance(self.max_memory, (int, np.integer)) and self.max_memory > 0
        ):
            raise BadInput(f"max_memory (--max-memory) must be bytes > 0, got {self.max_memory!r}")
        for name, value in (("rtol", self.rtol), ("atol", self.atol)):
            number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            if value is not None and not (number and value >= 0 and np.isfinite(value)):
                raise BadInput(f"{name} (--{name}) must be a finite number >= 0, got {value!r}")


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
    compute: np.dtype | None = None,
) -> OutputCheck:
    """Judge `got` against `ref`; `noise` (max abs change of the original under harmless
    evaluations) lets an error through that tolerance alone rejects, unless rtol/atol were set.
    The default tolerance is the output dtype's, or `compute`'s where the graph computes in a
    less precise type (a float16 graph with float32 outputs)."""
    check = OutputCheck(name, str(ref.dtype), list(ref.shape), ok=False)
    if got is None:
        check.problem = "missing from the second model"
        return check
    if got.shape != ref.shape or got.dtype != ref.dtype:
        check.problem = f"second model gives {got.dtype}{list(got.shape)}"
        return check
    if not (np.issubdtype(ref.dtype, np.floating) or ref.dtype == ml_dtypes.bfloat16):
        return _exact(check, ref, got)
    a, b = ref.astype(np.float64), got.astype(np.float64)
    judged = _less_precise(ref.dtype, compute)
    default_rtol, default_atol = TOLERANCES.get(judged, TOLERANCES[np.dtype(np.float32)])
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
        )
        if noise is not None and rtol is None and atol is None:
            check.problem += (
                f", and > {NOISE_FACTOR:g} x the original's own noise {noise:.3g} (or over the "
                f"cap {NOISE_CAP:g} x that tolerance)"
            )
    return check


def _exact(check: OutputCheck, ref: np.ndarray, got: np.ndarray) -> OutputCheck:
    """Integer, bool and string outputs: equal element by element."""
    mismatches = int(np.count_nonzero(ref != got))
    check.ok = mismatches == 0
    check.max_abs = 0.0 if check.ok else float(mismatches)
    if not check.ok:
        check.problem = f"{mismatches} element(s) differ (exact match required)"
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


def _nudged(feeds: Mapping[str, np.ndarray], compute: np.dtype | None = None) -> dict:
    """The float inputs scaled by 1 + INPUT_NUDGE, or by one unit roundoff of `compute` where
    the graph computes less precisely (a smaller nudge would round away); others as they are."""
    nudge = max(INPUT_NUDGE, ROUNDOFF.get(compute, 0.0) * 2) if compute is not None else INPUT_NUDGE
    return {
        k: (v * v.dtype.type(1 + nudge)).astype(v.dtype)
        if np.issubdtype(v.dtype, np.floating)
        else v
        for k, v in feeds.items()
    }


@dataclass
class VerifyReport:
    model_a: str
    model_b: str
    plan: VerifyPlan | None = None  # how it ran (whole or by segments) and why
    segments: dict[str, int] = field(default_factory=dict)  # model_a/model_b: how many (local)
    inputs: dict | None = None  # what it ran on (normopt.schema.inputs_json)
    outputs: list[OutputCheck] = field(default_factory=list)
    note: str | None = None  # how the inputs had to change (a retry with dims at 1)
    seconds: dict[str, float] = field(default_factory=dict)

    # the document's stamp, one per report: every copy of the document carries it
    created: str = field(default_factory=now, repr=False)

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
            "method": None
            if self.plan is None
            else {**self.plan.to_json(), "segments": self.segments},
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
            created=self.created,
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
    plan: VerifyPlan | None = None,
    reference: Reference | None = None,
) -> VerifyReport:
    """Run A then B on the same inputs and compare every output of A by name.

    The inputs are `trials` when given (input sets already checked: A is then not loaded
    here; `fallback`: the generated ones with unset dims at 1, to retry with once when A fails
    on them), else those `options` name or generate from A's input specs; with `reference`,
    A's outputs computed already (`run_reference`: a rewrite runs IN once, before its passes).
    Where an output fails the tolerance, A's own noise is measured (A again under
    ORT_ENABLE_ALL and on nudged inputs) and judged against. `changed_on_request` maps outputs
    a rewrite changes at the user's request to the reason (compared and reported, not required
    to match). `plan`: how to run them (default: planned from both models' weights). BadInput
    where A cannot be loaded or run, or the models cannot be run in memory."""
    from normopt.rewriter.io import load

    start = time.perf_counter()
    options = options or VerifyOptions()
    step = on_step or (lambda _m: None)
    model_a, model_b = Path(model_a), Path(model_b)
    check_readable_file(model_b)
    note, weights_a = None, None
    if reference is None and trials is None:
        spec = load(model_a)
        trials, fallback = input_trials(spec, options), fallback_trials(spec, options)
        note, weights_a = cache_note(spec, options), memory.ir_weights(spec)
        del spec
    if plan is None:
        plan = plan_for(model_a, model_b, options.method, options.max_memory, weights_a)
    if reference is None:
        reference = run_reference(model_a, trials, fallback, plan, options.backend, step)
    refs, trials = reference.outputs, reference.trials
    report = VerifyReport(str(model_a), str(model_b), plan, note=reference.note)
    run = Runner(plan, options.backend, step)
    report.inputs = inputs_json(trials, options.inputs, options.seed, note)
    gots = run(model_b, trials)
    report.segments = segment_counts(reference.segments, run.segments)
    compute = compute_dtype(model_a)
    checks = _checks(refs, gots, options, compute=compute)
    judged_by_noise = options.rtol is None and options.atol is None
    if judged_by_noise and any(not c.ok and c.rtol is not None for trial in checks for c in trial):
        step(f"measuring {model_a.name}'s own noise")
        noise = _own_noise(run, model_a, trials, refs, compute)
        checks = _checks(refs, gots, options, noise, compute)
    report.outputs = [_worst([trial[i] for trial in checks]) for i in range(len(checks[0]))]
    for check in report.outputs:  # outputs the user asked to change are reported, not required
        if changed_on_request and check.name in changed_on_request:
            check.ok, check.skipped = True, changed_on_request[check.name]
    report.seconds["total"] = time.perf_counter() - start
    return report


def _checks(
    refs: list[dict],
    gots: list[dict],
    options: VerifyOptions,
    noise: list[dict] | None = None,
    compute: np.dtype | None = None,
) -> list[list[OutputCheck]]:
    """Every output of every trial, against the tolerance (and A's own noise, when measured)."""
    return [
        [
            compare_output(
                n,
                r,
                got.get(n),
                options.rtol,
                options.atol,
                noise[t].get(n) if noise else None,
                compute,
            )
            for n, r in ref.items()
        ]
        for t, (ref, got) in enumerate(zip(refs, gots))
    ]


def _own_noise(
    run: Runner,
    model_a: Path,
    trials: list[Mapping[str, np.ndarray]],
    refs: list[dict],
    compute: np.dtype,
) -> list[dict[str, float]]:
    """A's own noise per trial and output: A under ORT_ENABLE_ALL and on nudged inputs."""
    try:
        optimized = run(model_a, trials, optimized=True) if run.levels else [None] * len(trials)
    except ModelRunError:  # onnxruntime's optimizer can break a valid graph (fp16 LayerNorm
        optimized = [None] * len(trials)  # fusions): that probe is then not available
    nudged = run(model_a, [_nudged(f, compute) for f in trials])
    return [
        _noise(ref, [p for p in (o, n) if p is not None])
        for ref, o, n in zip(refs, optimized, nudged)
    ]


def _worst(checks: list[OutputCheck]) -> OutputCheck:
    """One output's check over the trials: the first failing one, else the largest error."""
    for t, check in enumerate(checks):
        check.trial = t
    failing = [c for c in checks if not c.ok]
    return failing[0] if failing else max(checks, key=lambda c: c.max_rel or 0.0)
