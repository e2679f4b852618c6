"""The pass contract (docs/design.md).

A pass works in two steps, kept apart so `inspect` can ask "would it apply?" without editing:
  plan(model)        analysis only: the edits it would make (`actions`, each deciding
                     everything the edit needs) and, for every candidate it skips, a `Refusal`
                     a user can read;
  apply(model, plan) performs exactly those edits and returns them as `Change` records.
`run` does both. A pass that finds nothing to do returns a refusal saying why, so a user who
asked for it by name learns the reason (the CLI exits 3 then). Passes are named in one table,
`passes.pipeline.PASSES`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Literal, TypeVar

import onnx_ir as ir

from normopt.errors import BadInput
from normopt.plugins.spec import parse_version
from normopt.rewriter.graph import frozen_graph

Target = Literal["onnx", "ort", "tensorrt"]
TARGETS = ("onnx", "ort", "tensorrt")
TUNE_PARAMS = ("constants", "inputs", "inputs:all")


@dataclass(frozen=True)
class Options:
    """What a rewrite asks of every pass (a pass's own knobs are its `Settings`). `target` picks
    which fused ops a pass may emit; `allow_hidden_state_change` lets preln-to-rmsnorm and
    preln-to-crmsnorm rewrite models that output stream values; `tune_params`: which
    parameters convbn-tune makes graph inputs (constants: none; inputs: the BatchNorms';
    inputs:all: the weights too)."""

    target: Target = "onnx"
    allow_hidden_state_change: bool = False
    tune_params: Literal["constants", "inputs", "inputs:all"] = "constants"
    # --target tensorrt: the TensorRT to emit for (default: installed, else newest)
    trt_version: str | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise BadInput(f"--target must be onnx, ort or tensorrt, not '{self.target}'")
        if self.tune_params not in TUNE_PARAMS:
            raise BadInput(
                f"--tune-params takes constants, inputs or inputs:all, not '{self.tune_params}'"
            )
        if self.trt_version is not None:
            if not isinstance(self.trt_version, str):
                raise BadInput(
                    "trt_version (--trt-version) is a version string such as '10.9', got "
                    f"{self.trt_version!r}"
                )
            try:
                parse_version(self.trt_version)
            except ValueError as exc:
                raise BadInput(f"--trt-version: {exc}") from None


@dataclass(frozen=True)
class Refusal:
    candidate: str
    reason: str
    idle: bool = field(
        default=False, compare=False
    )  # "no candidate at all" (Plan.idle), not a candidate's
    settled: bool = field(
        default=False, compare=False
    )  # no other pass's edit can lift it (the opset)

    @property
    def may_change(self) -> bool:
        """Could another pass's edits make this candidate possible?"""
        return not (self.idle or self.settled)


A = TypeVar("A")  # a pass's action type: what one planned edit carries


@dataclass
class Plan(Generic[A]):
    """A pass's plan: `actions` of the pass's own type `A` (each deciding everything its edit
    needs), refusals for the candidates it skips, and what the report shows of it."""

    actions: list[A] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    # graph outputs the rewrite changes on the user's request (verification skips them)
    changed_outputs: list[str] = field(default_factory=list)
    # why there is no candidate at all (no norm of the kind the pass rewrites, ...)
    idle: str | None = None
    # counts worth reporting (candidates, converted, ...), in inspect and the report
    stats: dict[str, int] = field(default_factory=dict)
    # the actions in groups the speed guard may drop one by one (label -> sites, see Options)
    units: dict[str, list[str]] = field(default_factory=dict)

    @property
    def applies(self) -> bool:
        return bool(self.actions)

    def decide(self, candidate: str, outcome: A | str) -> None:
        """Record a candidate's outcome: an action, or (a string) the reason it is refused."""
        if isinstance(outcome, str):
            self.refusals.append(Refusal(candidate, outcome))
        else:
            self.actions.append(outcome)

    def summary(self) -> str:
        """One line: what would change (actions describe themselves where they can)."""
        described = [a.describe() if hasattr(a, "describe") else str(a) for a in self.actions]
        return "; ".join(described[:3]) + (
            f" (+{len(described) - 3} more)" if len(described) > 3 else ""
        )

    def why_not(self) -> str:
        """One line: why nothing would change (first refusal, and how many more)."""
        if self.applies:
            return ""
        if not self.refusals:
            return f"model: {self.idle}" if self.idle else "nothing to do"
        first = self.refusals[0]
        more = f" (+{len(self.refusals) - 1} more)" if len(self.refusals) > 1 else ""
        return f"{first.candidate}: {first.reason}{more}"


@dataclass(frozen=True)
class Change:
    """One edit, as a record: `kind`, a past-tense verb (fused, folded, converted, centred,
    recentred, removed, sorted); `what` it did in words, shared by records alike (the summary
    counts them); the `nodes` it replaced, removed or edited and the `values` (initializers,
    graph values) it replaced, removed or inserted after, by name as in the input model; `why`,
    where the edit has a reason of its own (a recentring)."""

    kind: str
    what: str
    nodes: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    why: str = ""

    def to_json(self, pass_name: str) -> dict:
        return {
            "pass": pass_name,
            "kind": self.kind,
            "what": self.what,
            "nodes": list(self.nodes),
            "values": list(self.values),
            "why": self.why or None,
        }


def summary_lines(changes: list[Change]) -> list[str]:
    """One line per kind of change, `<kind> <count> <what>` (with a reason: the values too)."""
    groups: dict[tuple[str, str, str], list[Change]] = {}
    for change in changes:
        groups.setdefault((change.kind, change.what, change.why), []).append(change)
    return [
        f"{kind} {len(group)} {what}"
        + (f": {', '.join(v for c in group for v in c.values)} ({why})" if why else "")
        for (kind, what, why), group in groups.items()
    ]


@dataclass
class PassResult:
    name: str
    modified: bool
    changes: list[Change]
    refusals: list[Refusal]
    changed_outputs: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    units: dict[str, list[str]] = field(
        default_factory=dict
    )  # what it applied, in groups (Plan.units)

    def then(self, later: PassResult) -> PassResult:
        """This result followed by the same pass's next round: all changes, the last refusals
        (without a later "nothing to do" once an earlier round did something)."""
        modified = self.modified or later.modified
        return PassResult(
            self.name,
            modified,
            self.changes + later.changes,
            [r for r in later.refusals if not (r.idle and modified)],
            list(dict.fromkeys(self.changed_outputs + later.changed_outputs)),
            self.stats,
            {
                k: [*self.units.get(k, []), *later.units.get(k, [])]
                for k in {**self.units, **later.units}
            },
        )

    @property
    def lines(self) -> list[str]:
        """What changed, one line per kind of change."""
        return summary_lines(self.changes)

    def to_json(self) -> dict:
        """The pass's outcome; its changes are records in the report's top-level `changes`."""
        return {
            "name": self.name,
            "modified": self.modified,
            "summary": self.lines,
            "refusals": [{"candidate": r.candidate, "reason": r.reason} for r in self.refusals],
            "changed_outputs": self.changed_outputs,
            "stats": self.stats,
        }


@dataclass(frozen=True)
class NoSettings:
    """A pass without knobs of its own."""


class Pass(abc.ABC, Generic[A]):
    """A rewrite: `plan` finds its actions (type A), `apply` carries them out. `Settings`: the
    pass's own frozen options dataclass (the pipeline string may set them:
    `name{field=value field=value}`)."""

    Settings: ClassVar[type] = NoSettings

    name: ClassVar[str]
    summary: ClassVar[str]
    # Plan and apply again until nothing applies (an edit can make another candidate possible).
    repeats: ClassVar[bool] = False

    def __init__(self, options: Options | None = None, settings: object | None = None) -> None:
        self.options = options or Options()
        self.settings = settings if settings is not None else self.Settings()
        if not isinstance(self.settings, self.Settings):
            raise TypeError(f"{self.name} takes {self.Settings.__name__}, not {settings!r}")

    @abc.abstractmethod
    def plan(self, model: ir.Model) -> Plan[A]:
        """Find candidates; never edit the model."""

    @abc.abstractmethod
    def apply(self, model: ir.Model, plan: Plan[A]) -> list[Change]:
        """Carry out `plan.actions`; return a record of every edit."""

    def run(self, model: ir.Model, max_rounds: int = 64) -> PassResult:
        """Plan and apply (repeatedly for a `repeats` pass); refusals are the last plan's:
        the candidates that still do not apply."""
        with frozen_graph():
            plan = self.plan(model)
        stats = dict(plan.stats)  # what the first plan found (later rounds see the rewritten model)
        changes: list[Change] = []
        changed: list[str] = []
        units: dict[str, list[str]] = {}
        for _ in range(max_rounds if self.repeats else 1):
            if not plan.applies:
                break
            changes += self.apply(model, plan)
            changed += plan.changed_outputs
            for label, sites in plan.units.items():
                units.setdefault(label, []).extend(sites)
            if self.repeats:
                with frozen_graph():
                    plan = self.plan(model)
        refusals = list(plan.refusals)
        if plan.idle and not changes:
            refusals.append(Refusal("model", plan.idle, idle=True))
        return PassResult(self.name, bool(changes), changes, refusals, changed, stats, units)
