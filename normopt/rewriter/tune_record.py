"""What convbn-tune records of each block it tuned, so that `recalibrate` finds the BatchNorm
again: one typed record per block, kept as a JSON list in the model's metadata (RECORDS_KEY),
read and written here only."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import onnx_ir as ir

from normopt.errors import BadInput

RECORDS_KEY = "normopt.convbn_tune"


@dataclass(frozen=True)
class TuneRecord:
    """A tuned block by name: the BatchNorm `bn` folded into `node` (an `op`) whose weight and
    bias the graph now computes from `weight` and `bias` (None: the op had none) and the BN's
    `gamma`, `beta`, `mean`, `var` and `epsilon`; `gemm_beta`: a Gemm's beta before tuning;
    `bias_add`: a MatMul's bias Add node (the original one, or the one the pass added)."""

    bn: str
    node: str
    op: str
    weight: str
    bias: str | None
    gemm_beta: float | None
    bias_add: str | None
    gamma: str
    beta: str
    mean: str
    var: str
    epsilon: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def read(model: ir.Model) -> list[TuneRecord]:
    """The records of `model` (none when it was never tuned); BadInput when they are not what
    convbn-tune writes."""
    text = model.metadata_props.get(RECORDS_KEY, "[]")
    names = {f.name for f in dataclasses.fields(TuneRecord)}
    try:
        found = json.loads(text)
        if not isinstance(found, list) or any(
            not isinstance(r, dict) or set(r) != names for r in found
        ):
            raise ValueError("not a list of records")
        return [TuneRecord(**r) for r in found]
    except ValueError as exc:
        raise BadInput(
            f"the model's '{RECORDS_KEY}' metadata is not convbn-tune's ({exc})"
        ) from None


def write(model: ir.Model, records: list[TuneRecord]) -> None:
    model.metadata_props[RECORDS_KEY] = json.dumps([r.to_json() for r in records])
