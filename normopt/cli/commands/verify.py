"""`normopt verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normopt import api
from normopt.cli import render
from normopt.cli.application import command, out, print_json, progress
from normopt.cli.options import (
    AtolOpt,
    DimOpt,
    InputsOpt,
    JsonOpt,
    MaxMemoryOpt,
    MethodOpt,
    ReportOpt,
    RtolOpt,
    SeedOpt,
    ShapeOpt,
    TrialsOpt,
    parse_dims,
    parse_shapes,
)


@command
def verify(
    model_a: Annotated[Path, typer.Argument(metavar="A", help="Reference model.")],
    model_b: Annotated[Path, typer.Argument(metavar="B", help="Model to check against A.")],
    dim: DimOpt = None,
    inputs: InputsOpt = None,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    seed: SeedOpt = 0,
    trials: TrialsOpt = 2,
    shape: ShapeOpt = None,
    method: MethodOpt = "auto",
    max_memory: MaxMemoryOpt = None,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            metavar="BACKEND",
            help="ort-cpu | openvino: the engine both models run on.",
        ),
    ] = "ort-cpu",
    json_out: JsonOpt = False,
    report_path: ReportOpt = None,
) -> None:
    """Run A and B in onnxruntime (CPU, no graph optimizations) on the same inputs and compare
    outputs. Exit 0 all within tolerance; 1 not; 2 bad input."""
    with progress(f"loading {model_a.name}") as step:
        report = api.verify(
            model_a,
            model_b,
            inputs=inputs,
            dims=parse_dims(dim),
            shapes=parse_shapes(shape),
            rtol=rtol,
            atol=atol,
            seed=seed,
            trials=trials,
            method=method,
            max_memory=max_memory,
            backend=backend,
            report=report_path,
            on_step=step,
        )
    if json_out:
        print_json(report.to_json())
    else:
        out.print(render.verify_table(report))
    if not report.ok:
        render.fail_line(report)
    render.warn_note(report)
    if not report.ok:
        raise typer.Exit(1)
