"""`normopt build`."""

from __future__ import annotations

from normopt import api
from normopt.cli.application import command, err, out, print_json
from normopt.cli.options import (
    BuildBf16Opt,
    BuildDstOpt,
    BuildFp16Opt,
    BuildPluginsOpt,
    BuildShapeOpt,
    BuildSrcOpt,
    BuildTimingCacheOpt,
    BuildTrtVersionOpt,
    BuildWorkspaceOpt,
    DimOpt,
    JsonOpt,
    parse_dims,
    parse_profiles,
)
from normopt.errors import BadInput


@command
def build(
    src: BuildSrcOpt,
    dst: BuildDstOpt,
    shape: BuildShapeOpt = None,
    dim: DimOpt = None,
    timing_cache: BuildTimingCacheOpt = None,
    workspace: BuildWorkspaceOpt = 4096,
    plugins: BuildPluginsOpt = "aot",
    fp16: BuildFp16Opt = False,
    bf16: BuildBf16Opt = False,
    trt_version: BuildTrtVersionOpt = None,
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
