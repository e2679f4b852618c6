"""The options several commands share, and parsing of their strings (the API takes values)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normopt.errors import BadInput

DimOpt = Annotated[
    list[str] | None,
    typer.Option("--dim", help="Symbolic dim size, NAME=VALUE (repeatable)."),
]
ShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--shape", help="An input's whole shape, NAME=AxB (repeatable; e.g. input_ids=1x128)."
    ),
]
InputsOpt = Annotated[Path | None, typer.Option("--inputs", help="Inputs by name in an .npz file.")]
RtolOpt = Annotated[
    float | None, typer.Option("--rtol", help="Relative tolerance (x output scale).")
]
AtolOpt = Annotated[float | None, typer.Option("--atol", help="Absolute tolerance.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for random inputs.")]
TrialsOpt = Annotated[
    int, typer.Option("--trials", help="Random input draws to verify on (ignored with --inputs).")
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="Print one JSON document (normopt.schema) to stdout instead of tables."
    ),
]
ReportOpt = Annotated[
    Path | None,
    typer.Option("--report", help="Also write the JSON document to this file (atomically)."),
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
