"""How verification runs the models: the plan's way (whole, or a segment at a time) on the
chosen engine, and the original's outputs computed once (`run_reference`) for every comparison
against it (a rewrite runs IN before its passes: one onnxruntime cannot load fails there)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normopt import memory
from normopt.memory import VerifyPlan
from normopt.sessions import ModelRunError, run_local, run_ort_all


def plan_for(
    model_a: Path,
    model_b: Path,
    method: str,
    max_memory: int | None,
    weights_a: memory.Weights | None = None,
) -> VerifyPlan:
    """The verification that fits both models (the larger one's weights; A's given where it
    was loaded already); BadInput where one is not a readable ONNX file."""
    from normopt.rewriter.file_checks import parse_checked

    weights = [
        weights_a or memory.proto_weights(parse_checked(model_a).graph),
        memory.proto_weights(parse_checked(model_b).graph),
    ]
    return memory.plan(max(weights, key=lambda w: w.full()), method, max_memory)


@dataclass
class Reference:
    """A's outputs on the input sets it ran on (the fallback ones where it failed on the first,
    then with a `note`), and the segments it ran in (None: whole)."""

    outputs: list[dict]
    trials: list[Mapping[str, np.ndarray]]
    note: str | None
    segments: int | None


def run_reference(
    model_a: str | os.PathLike,
    trials: list[Mapping[str, np.ndarray]],
    fallback: list[Mapping[str, np.ndarray]] | None,
    plan: VerifyPlan,
    backend: str,
    on_step: Callable[[str], None] | None = None,
) -> Reference:
    """A run as `plan` says on `backend`, once for every comparison against it; ModelRunError
    (exit 2) where it cannot be loaded or run."""
    run = Runner(plan, backend, on_step or (lambda _m: None))
    outputs, trials, note = _reference(run, Path(model_a), trials, fallback)
    return Reference(outputs, trials, note, run.segments)


def segment_counts(a: int | None, b: int | None) -> dict[str, int]:
    """The report's segments per model (those run by segments)."""
    return {role: n for role, n in (("model_a", a), ("model_b", b)) if n is not None}


class Runner:
    """Runs a model on input sets as `plan` says: whole (run_ort_all) or by segments (then
    `segments` is how many), on onnxruntime or OpenVINO."""

    def __init__(self, plan: VerifyPlan, backend: str, step: Callable[[str], None]) -> None:
        self.plan, self.backend, self.step = plan, backend, step
        self.segments: int | None = None

    @property
    def levels(self) -> bool:
        """Whether the engine has optimization levels to compare (OpenVINO compiles one way)."""
        return self.backend != "openvino"

    def __call__(
        self, path: Path, trials: list[Mapping[str, np.ndarray]], optimized: bool = False
    ) -> list[dict]:
        if self.backend == "openvino":
            from normopt.engine.openvino import run_all

            self.step(f"running {path.name} on OpenVINO")
            return run_all(path, trials)
        if self.plan.method == "full":
            self.step(f"running {path.name}")
            return run_ort_all(path, trials, optimized)
        self.step(f"running {path.name} by segments")
        outputs, self.segments = run_local(path, trials, self.plan.budget, optimized)
        return outputs


def _reference(
    run: Runner,
    model_a: Path,
    trials: list[Mapping[str, np.ndarray]],
    fallback: list[Mapping[str, np.ndarray]] | None,
) -> tuple[list[dict], list[Mapping[str, np.ndarray]], str | None]:
    """A's outputs on `trials`, or where A fails on them, on `fallback` (then with a note)."""
    try:
        return run(model_a, trials), trials, None
    except ModelRunError as exc:
        if not exc.running or fallback is None:
            raise
        generated = _shapes_text(trials[0])
        try:
            refs = run(model_a, fallback)
        except ModelRunError:
            raise ModelRunError(
                model_a,
                f"{exc} (on generated inputs {generated}, and again with every symbolic "
                "dim at 1: set the sizes the model runs at with --dim NAME=VALUE or --shape "
                "NAME=AxB, or pass --inputs FILE.npz)",
                running=True,
            ) from None
        note = (
            f"'{model_a.name}' failed on the generated inputs {generated} ({exc}); "
            f"verified with every symbolic dim not set at 1: {_shapes_text(fallback[0])} (a dim "
            "of 1 can hide a broadcast: set the sizes the model runs at with --dim NAME=VALUE "
            "or --shape NAME=AxB)"
        )
        return refs, fallback, note


def _shapes_text(feeds: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, v.shape)) or 'scalar'}" for k, v in feeds.items())
