"""What a rewrite is asked to do: one frozen, validated `RewriteRequest`, built once (by the
API, which the CLI calls) and read by the driver, the variants and the report."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from normopt.errors import BadInput
from normopt.passes.base import Options
from normopt.passes.pipeline import resolve, settings_of
from normopt.passes.preln_to_rmsnorm import PreLNSettings
from normopt.passes.rotate_stream import RotateSettings
from normopt.verification import VerifyOptions

CRMS_PASS = "preln-to-crmsnorm"
CRMS_MODES = ("off", "on", "auto")
ROTATE_PASS = "rotate-stream"
PRELN_PASS = "preln-to-rmsnorm"


@dataclass(frozen=True)
class Timing:
    """How `--guard speed` and `--crms auto` time variants (normopt.profiling.compare):
    `backend` None is ORT CPU for --target onnx/ort and TensorRT for --target tensorrt."""

    backend: str | None = None
    threads: int = 2
    rounds: int = 20
    reps: int = 2

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise BadInput("--threads must be at least 1")
        if self.rounds < 1 or self.reps < 1:
            raise BadInput("timing needs at least 1 round and 1 repetition")

    def backend_for(self, target: str) -> str:
        return self.backend or ("tensorrt" if target == "tensorrt" else "ort-cpu")


@dataclass(frozen=True)
class RewriteRequest:
    """Rewrite `src` into `dst` with `passes` (None: the default pipeline) and the passes'
    `options`; `checks` gives the inputs (and tolerances) that verification and timing run
    on; `verify` False skips the check; `speed_guard` drops the changes measured slower
    (normopt.guard); `crms` off | on | auto (None: auto where `passes` names
    preln-to-crmsnorm; normopt.crms_choice), both timed by `timing`; `require_change`: a run
    where no pass changed the model writes nothing (exit 3); `in_place`: `dst` may be `src`
    (replaced by a rename); `report_path`: the JSON document, written also on failure;
    `rotate` hadamard | random (None: off) adds rotate-stream with `rotate_seed`."""

    src: Path
    dst: Path
    passes: tuple[str, ...] | None = None
    options: Options = field(default_factory=Options)
    checks: VerifyOptions = field(default_factory=VerifyOptions)
    verify: bool = True
    timing: Timing = field(default_factory=Timing)
    speed_guard: bool = False
    crms: str | None = None
    rotate: str | None = None
    rotate_seed: int = 0
    require_change: bool = False
    in_place: bool = False
    report_path: Path | None = None

    def __post_init__(self) -> None:
        for name in ("src", "dst", "report_path"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):
                object.__setattr__(self, name, Path(value))
        if self.passes is not None:
            object.__setattr__(self, "passes", tuple(self.passes))
        self.pipeline()  # refuses unknown passes and --crms mismatches before any work

    @property
    def verification(self) -> VerifyOptions | None:
        return self.checks if self.verify else None

    def pipeline(self) -> tuple[list[str], str]:
        """The pass names to run and the --crms mode. None means auto where the pass is in
        the pipeline, else off; on / auto add the pass right after preln-to-rmsnorm (the
        stream must be Pre-RMSNorm first) to the default pipeline; named passes are the
        user's. auto for --target tensorrt is refused: onnxruntime cannot time plugin nodes
        (engines are compared with `normopt build` and `profile --backend tensorrt`)."""
        mode, names = self.crms, resolve(self.passes)
        if mode not in (None, *CRMS_MODES):
            raise BadInput(f"--crms takes off, on or auto, not '{mode}'")
        if mode is None:
            mode = "auto" if CRMS_PASS in names else "off"
        if mode == "auto" and self.options.target == "tensorrt":
            raise BadInput(
                "--crms auto times the rewrites in onnxruntime, which cannot run TensorRT "
                "plugin nodes: pass --crms on (compare engines with normopt build and profile "
                "--backend tensorrt) or --crms off"
            )
        if self.rotate is not None:
            self._with_rotation(names, mode)
        if mode == "off":
            return [n for n in names if n != CRMS_PASS], mode
        if CRMS_PASS not in names:
            if self.passes is not None:
                raise BadInput(f"--crms {mode}: --passes does not name {CRMS_PASS}")
            at = names.index("preln-to-rmsnorm") + 1 if "preln-to-rmsnorm" in names else 0
            names.insert(at, CRMS_PASS)
        return names, mode

    def _with_rotation(self, names: list[str], mode: str) -> None:
        """--rotate: rotate-stream in `names`, added right after preln-to-rmsnorm (before the
        norms are fused) to the default pipeline."""
        RotateSettings(self.rotate, self.rotate_seed)  # refuses an unknown kind
        if mode != "off":
            raise BadInput(
                f"--rotate and --crms {mode} do not go together: a rotated stream is not "
                "zero-mean, and a d-1 stream has no RMSNorms to rotate"
            )
        if ROTATE_PASS not in names:
            if self.passes is not None:
                raise BadInput(f"--rotate: --passes does not name {ROTATE_PASS}")
            at = names.index(PRELN_PASS) + 1 if PRELN_PASS in names else 0
            names.insert(at, ROTATE_PASS)

    def settings(self) -> dict[str, object]:
        """The per-pass settings `passes` carries (`name{field=value}`), by pass name; --rotate's
        for rotate-stream."""
        found = settings_of(self.passes)
        if self.rotate is not None:  # and every stream LayerNorm converted, where it pays or not
            found[ROTATE_PASS] = RotateSettings(self.rotate, self.rotate_seed)
            preln = found.get(PRELN_PASS, PreLNSettings())
            found[PRELN_PASS] = dataclasses.replace(preln, convert_all=1)
        return found

    @property
    def timed(self) -> bool:
        """Whether variants are timed (--guard speed, or --crms auto)."""
        return self.speed_guard or self.pipeline()[1] == "auto"
