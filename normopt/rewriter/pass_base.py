"""The pass contract and the registry of passes by pipeline name.

A pass works in two steps, kept apart so `inspect` can ask "would it apply?" without editing:
  plan(model)        analysis only: the edits it would make (`actions`) and, for every
                     candidate it skips, a `Refusal` a user can read;
  apply(model, plan) performs exactly those edits and says what changed, one line each.
`run` does both. A pass that finds nothing to do returns a refusal saying why, so a user who
asked for it by name learns the reason (the CLI exits 3 then).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import onnx_ir as ir

Target = Literal["onnx", "ort", "tensorrt"]


@dataclass(frozen=True)
class Options:
    """Settings every pass may read. `target` picks which fused ops a pass may emit;
    `allow_hidden_state_change` lets preln-to-rmsnorm rewrite models that output stream values."""

    target: Target = "onnx"
    allow_hidden_state_change: bool = False


@dataclass(frozen=True)
class Refusal:
    candidate: str
    reason: str


@dataclass
class Plan:
    actions: list[Any] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    # graph outputs the rewrite changes on the user's request (verification skips them)
    changed_outputs: list[str] = field(default_factory=list)

    @property
    def applies(self) -> bool:
        return bool(self.actions)

    def summary(self) -> str:
        """One line: what would change (actions describe themselves where they can)."""
        described = [a.describe() if hasattr(a, "describe") else str(a) for a in self.actions]
        return "; ".join(described[:3]) + (f" (+{len(described) - 3} more)" if len(described) > 3 else "")

    def why_not(self) -> str:
        """One line: why nothing would change (first refusal, and how many more)."""
        if self.applies:
            return ""
        if not self.refusals:
            return "nothing to do"
        first = self.refusals[0]
        more = f" (+{len(self.refusals) - 1} more)" if len(self.refusals) > 1 else ""
        return f"{first.candidate}: {first.reason}{more}"


@dataclass
class PassResult:
    name: str
    modified: bool
    changes: list[str]
    refusals: list[Refusal]
    changed_outputs: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "modified": self.modified,
            "changes": self.changes,
            "refusals": [{"candidate": r.candidate, "reason": r.reason} for r in self.refusals],
            "changed_outputs": self.changed_outputs,
        }


class Pass(abc.ABC):
    name: ClassVar[str]
    summary: ClassVar[str]

    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()

    @abc.abstractmethod
    def plan(self, model: ir.Model) -> Plan:
        """Find candidates; never edit the model."""

    @abc.abstractmethod
    def apply(self, model: ir.Model, plan: Plan) -> list[str]:
        """Carry out `plan.actions`; return one human-readable line per change."""

    def run(self, model: ir.Model) -> PassResult:
        plan = self.plan(model)
        changes = self.apply(model, plan) if plan.applies else []
        changed = plan.changed_outputs if changes else []
        return PassResult(self.name, bool(changes), changes, plan.refusals, changed)


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if cls.name in _REGISTRY:
        raise ValueError(f"pass name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Pass]]:
    """All passes by pipeline name (importing normopt.passes registers them)."""
    import normopt.passes  # noqa: F401  (registration happens on import)

    return dict(_REGISTRY)
