"""`normopt build`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normopt import api
from normopt.cli.application import command, err, out, print_json
from normopt.cli.options import (
    DimOpt,
    JsonOpt,
    parse_dims,
    parse_profiles,
)
from normopt.errors import BadInput


@command
def build(
    src: Annotated[
        Path, typer.Argument(metavar="IN", help="ONNX model (a --target tensorrt rewrite, or any).")
    ],
    dst: Annotated[Path, typer.Argument(metavar="OUT", help="Engine file (written atomically).")],
    shape: Annotated[
        list[str] | None,
        typer.Option(
            "--shape",
            help="NAME:MIN/OPT/MAX optimization profile of a dynamic input, each AxBxC "
            "(repeatable).",
        ),
    ] = None,
    dim: DimOpt = None,
    timing_cache: Annotated[
        Path | None,
        typer.Option("--timing-cache", help="TensorRT timing cache to read and update."),
    ] = None,
    workspace: Annotated[int, typer.Option("--workspace", help="Builder workspace, MiB.")] = 4096,
    plugins: Annotated[
        str, typer.Option("--plugins", help="aot (PTX in the engine, runs without Python) | jit.")
    ] = "aot",
    fp16: Annotated[
        bool,
        typer.Option(
            "--fp16",
            help="Build in float16: the graph is converted first (inputs and outputs stay float32; "
            "LayerNorms reduce in float32).",
        ),
    ] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help="Build in bfloat16 (as --fp16).")] = False,
    trt_version: Annotated[
        str | None,
        typer.Option(
            "--trt-version",
            help="With --fp16/--bf16: the TensorRT the fp32 norms are emitted for (default: the "
            "installed one).",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Build a TensorRT engine (strongly typed, normopt's norm plugins registered). Needs TensorRT:
    exit 2 without it."""
    if fp16 and bf16:
        raise BadInput("--fp16 and --bf16 exclude each other")
    doc = api.build(
        src,
        dst,
        shapes=parse_profiles(shape),
        dims=parse_dims(dim),
        timing_cache=timing_cache,
        workspace_mb=workspace,
        plugins=plugins,
        precision="fp16" if fp16 else "bf16" if bf16 else None,
        trt_version=trt_version,
    )
    if json_out:
        print_json(doc)
    else:
        layers = sorted(doc["layers"].items())
        out.print(", ".join(f"{n} {kind}" for kind, n in layers), highlight=False)
    err.print(f"wrote {dst}", highlight=False)
