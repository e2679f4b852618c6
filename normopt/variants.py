"""Rewrites of one IN built, staged, verified and timed alike: what `--crms auto` and
`--guard speed` compare. Each variant is built from IN afresh (IN's weights are loaded once at
a time: the variant before it is already staged), staged as the rewrite was (the same data
file rules, the same transaction), verified as the rewrite was, and timed side by side with
the others on the inputs verification ran on (profiling.compare)."""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from normopt.errors import InternalError
from normopt.files import StagedModel, Transaction, same_file
from normopt.passes.base import PassResult
from normopt.passes.pipeline import run_pipeline
from normopt.profiling import Figure, compare
from normopt.request import RewriteRequest
from normopt.rewriter import io
from normopt.rewriter.graph import op_histogram
from normopt.timings import step as timed

# A model with this many bytes of weights is collected (gc) before verification: the IR's
# reference cycles keep it alive until then (GPT-2 124M: peak RSS 2.40 -> 1.54 GB). Not for
# small models: a collection walks the whole heap, which in a long-lived process (a test suite,
# a service calling the API) costs far more than the memory it frees.
COLLECT_BYTES = 64 * 2**20


@dataclass
class Variant:
    """A staged rewrite with its pass results and op histogram."""

    staged: StagedModel
    results: list[PassResult]
    histogram: dict[str, int]


class Variants:
    """`build` a variant of IN, `stage` a model as the rewrite is staged, `verify` a staged one
    as the rewrite is verified, `time` staged ones side by side, `discard` one."""

    def __init__(
        self,
        request: RewriteRequest,
        transaction: Transaction,
        external_data: bool,
        verify: Callable[[Path], None],
        step: Callable[[str], None],
    ) -> None:
        self.request = request
        self.transaction = transaction
        self.external_data = external_data
        self._verify = verify
        self.step = step
        self.feeds: Mapping[str, np.ndarray] | None = None  # set once the inputs are known
        self.backend = request.timing.backend_for(request.options.target)

    def stage(self, model: ir.Model) -> StagedModel:
        """Checked by onnx.checker (an invalid graph is normopt's bug), then staged beside OUT."""
        with timed("output checker"):
            problem = io.check_structure(model)
        if problem is not None:
            raise InternalError(
                "the rewritten model fails onnx.checker (a bug in normopt; nothing written): "
                f"{problem}"
            )
        dst = self.request.dst
        self.step(f"saving {dst.name}")
        return self.transaction.stage(
            model,
            dst,
            external_data=self.external_data,
            replaces_input=self.request.in_place and same_file(self.request.src, dst),
            progress=lambda i, n: self.step(f"saving {dst.name}: tensor {i}/{n}"),
        )

    def build(
        self, names: Sequence[str] | None, settings: Mapping[str, object] | None = None
    ) -> Variant:
        """IN through the passes `names` (None: IN's graph as it is) with the request's options
        and per-pass settings (`settings` override them), staged."""
        model = io.load(self.request.src)
        settings = {**self.request.settings(), **(settings or {})}
        options = self.request.options
        results = [] if names is None else run_pipeline(model, names, options, settings=settings)
        histogram = op_histogram(model)
        big = io.initializer_bytes(model) >= COLLECT_BYTES
        staged = self.stage(model)
        del model
        if big:  # the IR holds reference cycles: free it before onnxruntime loads models
            gc.collect()
        return Variant(staged, results, histogram)

    def verify(self, staged: StagedModel) -> None:
        """As the rewrite was verified (nothing when verification is off)."""
        self._verify(staged.path)

    def time(
        self, rows: Mapping[str, Path], against: Mapping[str, str] | None = None
    ) -> dict[str, Figure]:
        """`rows` (IN first, as "original") side by side; ratios to the original, or for a row
        in `against` to the row it names."""
        settings = self.request.timing
        return compare(
            {"original": self.request.src, **rows},
            "original",
            self.feeds,
            backend=self.backend,
            threads=settings.threads,
            rounds=settings.rounds,
            reps=settings.reps,
            against=against,
        )

    def discard(self, staged: StagedModel) -> None:
        self.transaction.discard(staged)
