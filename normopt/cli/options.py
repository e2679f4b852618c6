"""The options several commands share, and parsing of their strings (the API takes values)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normopt.errors import BadInput

DimOpt = Annotated[
    list[str] | None,
    typer.Option("--dim", metavar="NAME=VALUE", help="Symbolic dim size, NAME=VALUE (repeatable)."),
]
ShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--shape",
        metavar="NAME=AxB",
        help="An input's whole shape, NAME=AxB (repeatable; e.g. input_ids=1x128).",
    ),
]
InputsOpt = Annotated[
    Path | None,
    typer.Option("--inputs", metavar="FILE.npz", help="Inputs by name in an .npz file."),
]
RtolOpt = Annotated[
    float | None, typer.Option("--rtol", metavar="X", help="Relative tolerance (x output scale).")
]
AtolOpt = Annotated[float | None, typer.Option("--atol", metavar="X", help="Absolute tolerance.")]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="N", help="Seed for random inputs.")]
TrialsOpt = Annotated[
    int,
    typer.Option(
        "--trials", metavar="N", help="Random input draws to verify on (ignored with --inputs)."
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="Print one JSON document (normopt.schema) to stdout instead of tables."
    ),
]
ReportOpt = Annotated[
    Path | None,
    typer.Option(
        "--report", metavar="FILE", help="Also write the JSON document to this file (atomically)."
    ),
]


def parse_dims(items: list[str] | None) -> dict[str, int]:
    dims = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit():
            raise BadInput(f"--dim takes NAME=VALUE with a whole number, got '{item}'")
        dims[name.strip()] = int(value)
    return dims


def parse_shapes(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        sizes = value.strip().lower().split("x")
        if not sep or not name or not all(s.strip().isdigit() for s in sizes):
            raise BadInput(
                f"--shape takes NAME=AxBxC with whole numbers (e.g. input_ids=1x128), got '{item}'"
            )
        shapes[name.strip()] = tuple(int(s) for s in sizes)
    return shapes


def parse_profiles(items: list[str] | None) -> dict[str, tuple]:
    """NAME:MIN/OPT/MAX with each shape AxBxC -> name -> (min, opt, max)."""
    out = {}
    for item in items or []:
        name, _, spec = item.rpartition(":")
        parts = spec.split("/")
        try:
            shapes = tuple(tuple(int(d) for d in p.split("x")) for p in parts)
        except ValueError:
            shapes = ()
        if not name or len(shapes) != 3 or len({len(s) for s in shapes}) != 1:
            raise BadInput(
                f"--shape takes NAME:MIN/OPT/MAX with shapes like 1x128/8x128/16x128, not '{item}'"
            )
        out[name] = shapes
    return out


# ------------------------------------------------------------------------ rewrite

SrcOpt = Annotated[Path, typer.Argument(metavar="IN", help="Input ONNX model (never modified).")]
DstOpt = Annotated[
    Path, typer.Argument(metavar="OUT", help="Output path (written only on success).")
]
PassesOpt = Annotated[
    str | None,
    typer.Option(
        "--passes",
        metavar="NAMES",
        help="Comma-separated pass names (default pipeline if omitted).",
    ),
]
TargetOpt = Annotated[
    str,
    typer.Option(
        "--target", metavar="TARGET", help="onnx | ort | tensorrt: which fused ops to emit."
    ),
]
RewriteReportOpt = Annotated[
    Path | None,
    typer.Option(
        "--report", metavar="FILE", help="Write the JSON document here (also on failure)."
    ),
]
RewriteJsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print the JSON document (normopt.schema) to stdout instead of tables (also on "
        "failure).",
    ),
]
TimingBackendOpt = Annotated[
    str | None,
    typer.Option(
        "--backend",
        metavar="BACKEND",
        help="What --guard speed, --crms auto and --profile time on: ort-cpu | ort-cuda | "
        "tensorrt | openvino (default: the target's, ORT CPU or TensorRT).",
    ),
]
VerifyMethodOpt = Annotated[
    str,
    typer.Option(
        "--verify",
        metavar="METHOD",
        help="auto | full | local: run each model whole, or a segment at a time (weights of one "
        "segment in memory); auto: whole where it fits in --max-memory.",
    ),
]
MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        metavar="METHOD",
        help="auto | full | local: run each model whole, or a segment at a time (weights of one "
        "segment in memory); auto: whole where it fits in --max-memory.",
    ),
]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        metavar="SIZE",
        help="Memory verification may use, e.g. 16G (default: what the machine has available).",
    ),
]
NoVerifyOpt = Annotated[
    bool, typer.Option("--no-verify", help="Skip the onnxruntime equivalence check.")
]
ExplainOpt = Annotated[bool, typer.Option("--explain", help="Print every refusal with its reason.")]
InPlaceOpt = Annotated[
    bool, typer.Option("--in-place", help="Allow OUT to be IN (replaced atomically).")
]
AllowHiddenStateChangeOpt = Annotated[
    bool,
    typer.Option(
        "--allow-hidden-state-change",
        help="Let preln-to-rmsnorm rewrite models that output residual-stream values (those "
        "outputs change).",
    ),
]
ProfileAfterOpt = Annotated[
    bool,
    typer.Option("--profile", help="After writing OUT, time IN vs OUT side by side (ORT CPU)."),
]
GuardOpt = Annotated[
    str | None,
    typer.Option(
        "--guard",
        metavar="speed",
        help="speed: time OUT against IN on the target's backend and drop the changes that "
        "make it slower.",
    ),
]
CrmsOpt = Annotated[
    str | None,
    typer.Option(
        "--crms",
        metavar="MODE",
        help="off | on | auto: Pre-CRMSNorm (preln-to-crmsnorm, a d-1 stream); auto (the "
        "default where --passes names it; on / auto add it to the default pipeline) keeps "
        "it only where it times faster than Pre-RMSNorm.",
    ),
]
RotateOpt = Annotated[
    str | None,
    typer.Option(
        "--rotate",
        metavar="KIND",
        help="hadamard | random: rotate the Pre-RMSNorm residual stream by an orthogonal matrix "
        "(rotate-stream, added after preln-to-rmsnorm): outlier channels spread over all "
        "channels, so int8 / 4-bit quantization loses less; the model stays exact.",
    ),
]
RotateSeedOpt = Annotated[
    int,
    typer.Option("--rotate-seed", metavar="N", help="Seed of --rotate's random signs / matrix."),
]
ThreadsOpt = Annotated[
    int,
    typer.Option(
        "--threads",
        metavar="N",
        help="onnxruntime intra-op threads for --guard speed, --crms auto and --profile.",
    ),
]
TimingsOpt = Annotated[
    bool,
    typer.Option(
        "--timings",
        help="Print where the time went (load, checker, shape annotation, each pass, save, "
        "verification, guard).",
    ),
]
RequireChangeOpt = Annotated[
    bool,
    typer.Option(
        "--require-change", help="Exit 3 (nothing written) when no pass changes the model."
    ),
]
TuneParamsOpt = Annotated[
    str,
    typer.Option(
        "--tune-params",
        metavar="WHAT",
        help="convbn-tune: constants | inputs (BN parameters become graph inputs with their "
        "values as defaults) | inputs:all (weights and biases too).",
    ),
]
TrtVersionOpt = Annotated[
    str | None,
    typer.Option(
        "--trt-version",
        metavar="X.Y",
        help="--target tensorrt: the TensorRT version to emit for (MAJOR.MINOR, >= 10.9; "
        "default: the installed one, else 11.4).",
    ),
]


# ------------------------------------------------------------------------ build

BuildSrcOpt = Annotated[
    Path, typer.Argument(metavar="IN", help="ONNX model (a --target tensorrt rewrite, or any).")
]
BuildDstOpt = Annotated[
    Path, typer.Argument(metavar="OUT", help="Engine file (written atomically).")
]
BuildShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--shape",
        metavar="NAME=AxB",
        help="NAME:MIN/OPT/MAX optimization profile of a dynamic input, each AxBxC (repeatable).",
    ),
]
BuildTimingCacheOpt = Annotated[
    Path | None,
    typer.Option("--timing-cache", help="TensorRT timing cache to read and update."),
]
BuildWorkspaceOpt = Annotated[int, typer.Option("--workspace", help="Builder workspace, MiB.")]
BuildPluginsOpt = Annotated[
    str, typer.Option("--plugins", help="aot (PTX in the engine, runs without Python) | jit.")
]
BuildFp16Opt = Annotated[
    bool,
    typer.Option(
        "--fp16",
        help="Build in float16: the graph is converted first (inputs and outputs stay float32; "
        "LayerNorms reduce in float32).",
    ),
]
BuildBf16Opt = Annotated[bool, typer.Option("--bf16", help="Build in bfloat16 (as --fp16).")]
BuildTrtVersionOpt = Annotated[
    str | None,
    typer.Option(
        "--trt-version",
        metavar="X.Y",
        help="With --fp16/--bf16: the TensorRT the fp32 norms are emitted for (default: the "
        "installed one).",
    ),
]
