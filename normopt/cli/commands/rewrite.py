"""`normopt rewrite`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normopt import api
from normopt.cli import render
from normopt.cli.application import command, err, print_json, progress
from normopt.cli.commands.profile import timed
from normopt.cli.options import (
    AtolOpt,
    DimOpt,
    InputsOpt,
    RtolOpt,
    SeedOpt,
    ShapeOpt,
    TrialsOpt,
    parse_dims,
    parse_shapes,
)
from normopt.errors import BadInput, NormoptError


@command
def rewrite(
    src: Annotated[Path, typer.Argument(metavar="IN", help="Input ONNX model (never modified).")],
    dst: Annotated[
        Path, typer.Argument(metavar="OUT", help="Output path (written only on success).")
    ],
    passes: Annotated[
        str | None,
        typer.Option("--passes", help="Comma-separated pass names (default pipeline if omitted)."),
    ] = None,
    target: Annotated[
        str, typer.Option("--target", help="onnx | ort | tensorrt: which fused ops to emit.")
    ] = "onnx",
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Write the JSON document here (also on failure)."),
    ] = None,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the JSON document (normopt.schema) to stdout instead of tables (also on "
            "failure).",
        ),
    ] = False,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the onnxruntime equivalence check.")
    ] = False,
    explain: Annotated[
        bool, typer.Option("--explain", help="Print every refusal with its reason.")
    ] = False,
    in_place: Annotated[
        bool, typer.Option("--in-place", help="Allow OUT to be IN (replaced atomically).")
    ] = False,
    allow_hidden_state_change: Annotated[
        bool,
        typer.Option(
            "--allow-hidden-state-change",
            help="Let preln-to-rmsnorm rewrite models that output residual-stream values (those "
            "outputs change).",
        ),
    ] = False,
    profile_after: Annotated[
        bool,
        typer.Option("--profile", help="After writing OUT, time IN vs OUT side by side (ORT CPU)."),
    ] = False,
    guard: Annotated[
        str | None,
        typer.Option(
            "--guard",
            help="speed: time OUT against IN on the target's backend and drop the changes that "
            "make it slower.",
        ),
    ] = None,
    crms: Annotated[
        str | None,
        typer.Option(
            "--crms",
            help="off | on | auto: Pre-CRMSNorm (preln-to-crmsnorm, a d-1 stream); auto (the "
            "default where --passes names it; on / auto add it to the default pipeline) keeps "
            "it only where it times faster than Pre-RMSNorm.",
        ),
    ] = None,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            help="onnxruntime intra-op threads for --guard speed, --crms auto and --profile.",
        ),
    ] = 2,
    timings: Annotated[
        bool,
        typer.Option(
            "--timings",
            help="Print where the time went (load, checker, shape annotation, each pass, save, "
            "verification, guard).",
        ),
    ] = False,
    require_change: Annotated[
        bool,
        typer.Option(
            "--require-change", help="Exit 3 (nothing written) when no pass changes the model."
        ),
    ] = False,
    tune_params: Annotated[
        str,
        typer.Option(
            "--tune-params",
            help="convbn-tune: constants | inputs (BN parameters become graph inputs with their "
            "values as defaults) | inputs:all (weights and biases too).",
        ),
    ] = "constants",
    trt_version: Annotated[
        str | None,
        typer.Option(
            "--trt-version",
            help="--target tensorrt: the TensorRT version to emit for (MAJOR.MINOR, >= 10.9; "
            "default: the installed one, else 11.4).",
        ),
    ] = None,
    dim: DimOpt = None,
    inputs: InputsOpt = None,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    seed: SeedOpt = 0,
    trials: TrialsOpt = 2,
    shape: ShapeOpt = None,
) -> None:
    """Rewrite IN into OUT. Exit 0 written; 1 verification failed; 2 bad input; 3 a requested pass
    applied nowhere (or, with --require-change, none changed the model)."""
    if guard not in (None, "speed"):
        raise BadInput(f"--guard takes 'speed', not '{guard}'")
    names = [n.strip() for n in passes.split(",") if n.strip()] if passes is not None else None
    try:
        with progress(f"loading {src.name}") as step:
            _, result = api.rewrite(
                src,
                dst,
                passes=names,
                target=target,
                allow_hidden_state_change=allow_hidden_state_change,
                tune_params=tune_params,
                trt_version=trt_version,
                verify=not no_verify,
                inputs=inputs,
                dims=parse_dims(dim),
                shapes=parse_shapes(shape),
                rtol=rtol,
                atol=atol,
                seed=seed,
                trials=trials,
                speed_guard=guard == "speed",
                crms=crms,
                threads=threads,
                require_change=require_change,
                in_place=in_place,
                report=report,
                on_step=step,
            )
    except NormoptError as exc:  # the tables say how far it got; the error line follows
        if getattr(exc, "report", None) is not None:
            render.rewrite_result(exc.report, explain, timings, threads, stdout=not json_out)
        raise
    if json_out:
        print_json(result.to_json())
    render.rewrite_result(result, explain, timings, threads, stdout=not json_out)
    if result.changed:
        err.print(f"wrote {dst}", highlight=False)
    else:
        err.print(
            f"unchanged: no pass changed the model; wrote {dst} with IN's graph "
            "(--require-change makes this exit 3)",
            highlight=False,
            markup=False,
        )
    if profile_after:  # on the inputs verification used (generated only with --no-verify)
        timed([src, dst], threads=threads, feeds=result.feeds, inputs=inputs, seed=seed)
