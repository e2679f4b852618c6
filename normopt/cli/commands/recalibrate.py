"""`normopt recalibrate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normopt import api
from normopt.cli import render
from normopt.cli.application import command, err, print_json, progress
from normopt.cli.options import (
    JsonOpt,
    ReportOpt,
)


@command
def recalibrate(
    src: Annotated[
        Path,
        typer.Argument(
            metavar="IN",
            help="Model with BatchNorms (plain, or after convbn-tune); never modified.",
        ),
    ],
    dst: Annotated[
        Path, typer.Argument(metavar="OUT", help="Output path (written only on success).")
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Calibration inputs: an .npz of arrays by input name with a leading sample axis, "
            "or a folder of such files.",
        ),
    ],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per batch.")] = 32,
    batches: Annotated[
        int | None,
        typer.Option("--batches", help="Use at most this many batches (default: all the data)."),
    ] = None,
    stats: Annotated[
        str,
        typer.Option(
            "--stats",
            help="torch: average of the batches' mean and unbiased variance (PyTorch train mode, "
            "momentum=None); pooled: over every sample at once.",
        ),
    ] = "torch",
    json_out: JsonOpt = False,
    report_path: ReportOpt = None,
) -> None:
    """Re-estimate every BatchNorm's running mean and variance from calibration data (AdaBN),
    streaming over batches. Exit 0 written; 2 bad input (model or data)."""
    with progress(f"loading {src.name}") as step:
        result = api.recalibrate(
            src,
            dst,
            data,
            batch_size=batch_size,
            batches=batches,
            stats=stats,
            report=report_path,
            on_step=step,
        )
    if json_out:
        print_json(result.to_json())
    else:
        render.recalibration(result)
    err.print(f"wrote {dst}", highlight=False)
