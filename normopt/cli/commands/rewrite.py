"""`normopt rewrite`."""

from __future__ import annotations

from pathlib import Path

from normopt import api
from normopt.cli import render
from normopt.cli.application import command, err, print_json, progress
from normopt.cli.commands.profile import timed
from normopt.cli.options import (
    AllowHiddenStateChangeOpt,
    AtolOpt,
    CrmsOpt,
    DimOpt,
    DstOpt,
    ExplainOpt,
    GuardOpt,
    InPlaceOpt,
    InputsOpt,
    MaxMemoryOpt,
    NoVerifyOpt,
    PassesOpt,
    ProfileAfterOpt,
    RequireChangeOpt,
    RewriteJsonOpt,
    RewriteReportOpt,
    RotateOpt,
    RotateSeedOpt,
    RtolOpt,
    SeedOpt,
    ShapeOpt,
    SrcOpt,
    TargetOpt,
    ThreadsOpt,
    TimingBackendOpt,
    TimingsOpt,
    TrialsOpt,
    TrtVersionOpt,
    TuneParamsOpt,
    VerifyMethodOpt,
    parse_dims,
    parse_shapes,
)
from normopt.errors import BadInput, NormoptError

# the options the API takes as they are
PASSED_ON = (
    "target",
    "allow_hidden_state_change",
    "tune_params",
    "trt_version",
    "inputs",
    "rtol",
    "atol",
    "seed",
    "trials",
    "crms",
    "rotate",
    "rotate_seed",
    "threads",
    "backend",
    "require_change",
    "in_place",
    "report",
    "max_memory",
)


@command
def rewrite(
    src: SrcOpt,
    dst: DstOpt,
    passes: PassesOpt = None,
    target: TargetOpt = "onnx",
    report: RewriteReportOpt = None,
    json_out: RewriteJsonOpt = False,
    no_verify: NoVerifyOpt = False,
    verify: VerifyMethodOpt = "auto",
    max_memory: MaxMemoryOpt = None,
    explain: ExplainOpt = False,
    in_place: InPlaceOpt = False,
    allow_hidden_state_change: AllowHiddenStateChangeOpt = False,
    profile_after: ProfileAfterOpt = False,
    guard: GuardOpt = None,
    crms: CrmsOpt = None,
    rotate: RotateOpt = None,
    rotate_seed: RotateSeedOpt = 0,
    threads: ThreadsOpt = 2,
    backend: TimingBackendOpt = None,
    timings: TimingsOpt = False,
    require_change: RequireChangeOpt = False,
    tune_params: TuneParamsOpt = "constants",
    trt_version: TrtVersionOpt = None,
    dim: DimOpt = None,
    inputs: InputsOpt = None,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    seed: SeedOpt = 0,
    trials: TrialsOpt = 2,
    shape: ShapeOpt = None,
) -> None:
    """Rewrite IN into OUT. Exit 0 written; 1 verification failed; 2 bad input; 3 a requested pass
    (--passes, --rotate) applied nowhere (or, with --require-change, none changed the model)."""
    if guard not in (None, "speed"):
        raise BadInput(f"--guard takes 'speed', not '{guard}'")
    names = [n.strip() for n in passes.split(",") if n.strip()] if passes is not None else None
    shown = {"explain": explain, "timings": timings, "threads": threads, "stdout": not json_out}
    given = locals()
    settings = {name: given[name] for name in PASSED_ON} | {
        "passes": names,
        "verify": not no_verify,
        "verify_method": verify,
        "dims": parse_dims(dim),
        "shapes": parse_shapes(shape),
        "speed_guard": guard == "speed",
    }
    result = _rewrite(src, dst, settings, shown)
    if json_out:
        print_json(result.to_json())
    render.rewrite_result(result, **shown)
    _written(result, dst, in_place)
    if profile_after:  # on the inputs verification used (generated only with --no-verify)
        feeds = {"feeds": result.feeds, "inputs": inputs, "seed": seed}
        timed([src, dst], threads=threads, backend=backend or "ort-cpu", **feeds)


def _written(result, dst: Path, in_place: bool) -> None:
    """What was written, on stderr; where --in-place left IN's data file, that too."""
    if result.changed:
        err.print(f"wrote {dst}", highlight=False)
    else:
        err.print(
            f"unchanged: no pass changed the model; wrote {dst} with IN's graph "
            "(--require-change makes this exit 3)",
            highlight=False,
            markup=False,
        )
    if result.replaced_data_file:
        err.print(
            f"normopt: note: {result.data_file} existed and no {dst.name} read it (another "
            "model's data file?): it was replaced by this output's",
            highlight=False,
            markup=False,
        )
    if in_place and result.data_file not in (None, f"{dst.name}.data"):
        err.print(
            f"normopt: note: {dst.name} now reads its weights from {result.data_file}; "
            f"{dst.name}.data, the input's data file, was left as it was (delete it once "
            "nothing else reads it)",
            highlight=False,
            markup=False,
        )


def _rewrite(src: Path, dst: Path, settings: dict, shown: dict):
    """The API's rewrite with a progress line; on failure the tables say how far it got (the
    error line follows)."""
    try:
        with progress(f"loading {src.name}") as step:
            return api.rewrite(src, dst, on_step=step, **settings)[1]
    except NormoptError as exc:
        if getattr(exc, "report", None) is not None:
            render.rewrite_result(exc.report, **shown)
        raise
