"""`normopt profile`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from normopt import api
from normopt.cli import render
from normopt.cli.application import command, err, print_json
from normopt.cli.options import (
    DimOpt,
    InputsOpt,
    JsonOpt,
    SeedOpt,
    ShapeOpt,
    parse_dims,
    parse_shapes,
)


@command
def profile(
    models: Annotated[
        list[Path],
        typer.Argument(
            metavar="MODEL...", help="Models to time side by side (ratios are to the first)."
        ),
    ],
    backend: Annotated[
        str, typer.Option("--backend", help="ort-cpu | ort-cuda | tensorrt | openvino.")
    ] = "ort-cpu",
    threads: Annotated[int, typer.Option("--threads", help="onnxruntime intra-op threads.")] = 2,
    dim: DimOpt = None,
    shape: ShapeOpt = None,
    inputs: InputsOpt = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs per model first.")] = 3,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per model (interleaved).")] = 30,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
    report_path: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Also write the JSON document (every figure, the environment) to this file.",
        ),
    ] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="Write a plot (.png or .html).")
    ] = None,
) -> None:
    """Time models side by side: interleaved runs, median/p90/p99, paired ratios, time per op
    type."""
    timed(
        models,
        backend=backend,
        threads=threads,
        inputs=inputs,
        dims=parse_dims(dim),
        shapes=parse_shapes(shape),
        warmup=warmup,
        runs=runs,
        seed=seed,
        json_out=json_out,
        report=report_path,
        plot=plot_path,
    )


def timed(models, *, json_out: bool = False, **settings) -> None:
    """Profile with a progress bar on a terminal; the tables (or the document); what was
    written (also for `rewrite --profile`)."""
    if not err.is_terminal:  # no bar (rich before 15 writes a blank line for a disabled one)
        report = api.profile(models, **settings)
    else:
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("profiling", total=settings.get("runs", 30))
            report = api.profile(
                models, on_round=lambda r: bar.update(task, completed=r), **settings
            )
    if json_out:
        print_json(report.to_json())
    else:
        render.profile_tables(report)
    for written in (settings.get("report"), settings.get("plot")):
        if written is not None:
            err.print(f"wrote {written}", highlight=False)
