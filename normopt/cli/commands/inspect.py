"""`normopt inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normopt import api
from normopt.cli import render
from normopt.cli.application import command, print_json, progress
from normopt.cli.options import (
    JsonOpt,
    ReportOpt,
)


@command
def inspect(
    model: Annotated[Path, typer.Argument(help="ONNX model.")],
    json_out: JsonOpt = False,
    report: ReportOpt = None,
    target: Annotated[
        str, typer.Option("--target", help="onnx | ort | tensorrt: for the passes' verdicts.")
    ] = "onnx",
) -> None:
    """Describe a model: its norms, its architecture, and which passes apply and why not."""
    with progress(f"loading {model.name}"):
        info = api.inspect(model, target, report=report)
    if json_out:
        print_json(info)
    else:
        render.inspection(info, str(model))
