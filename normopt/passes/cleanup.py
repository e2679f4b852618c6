"""`cleanup`: remove dead nodes and unused initializers, sort topologically.

Before: nodes whose outputs reach no graph output; initializers nothing reads; nodes out of
        topological order; unused trailing optional outputs.
After:  the same function with only the nodes that contribute to an output, in a stable
        topological order (independent nodes keep their relative order).
Conditions: graph inputs and outputs are never removed (the model's signature is kept);
values read inside subgraphs (If/Loop/Scan bodies) count as used; model-local functions are
cleaned the same way. Runs after every pipeline.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from normopt.passes.base import Change, Pass, Plan
from normopt.rewriter.graph import dead_nodes, is_sorted
from normopt.rewriter.io import SORTED_ON_LOAD


def _unused_initializers(graph: ir.Graph, dead: list[ir.Node]) -> list[str]:
    dead_set = set(dead)
    keep = set(graph.inputs) | set(graph.outputs)
    return [
        name
        for name, v in graph.initializers.items()
        if v not in keep and all(use.node in dead_set for use in v.uses())
    ]


def _signature(model: ir.Model) -> dict:
    return {
        "nodes": {id(n): n for n in model.graph},
        "outputs": {id(n): len(n.outputs) for n in model.graph},
        "initializers": set(model.graph.initializers),
        "function_nodes": sum(len(f) for f in model.functions.values()),
    }


class Cleanup(Pass[str]):
    name = "cleanup"
    summary = "remove dead nodes and unused initializers, sort nodes topologically"

    def plan(self, model: ir.Model) -> Plan[str]:
        graph = model.graph
        dead = dead_nodes(graph)
        actions: list[str] = []
        if dead:
            actions.append(f"remove {len(dead)} dead node(s)")
        unused = _unused_initializers(graph, dead)
        if unused:
            actions.append(f"remove {len(unused)} unused initializer(s)")
        if not is_sorted(graph):
            actions.append("sort nodes topologically")
        elif model.meta.get(SORTED_ON_LOAD):  # load sorted IN's nodes: the output shows it
            actions.append("report the nodes sorted on load")
        if any(dead_nodes(f) for f in model.functions.values()):
            actions.append("remove dead nodes in model-local functions")
        return Plan(
            actions,
            idle=None if actions else "no dead nodes, unused initializers or unsorted nodes",
        )

    def apply(self, model: ir.Model, plan: Plan[str]) -> list[Change]:
        before = _signature(model)
        TopologicalSortPass()(model)
        RemoveUnusedNodesPass()(model)
        after = _signature(model)
        changes = [
            Change("removed", "dead node(s)", (n.name or n.op_type,))
            for k, n in before["nodes"].items()
            if k not in after["nodes"]
        ]
        changes += [
            Change("removed", "unused initializer(s)", (), (name,))
            for name in sorted(before["initializers"] - after["initializers"])
        ]
        changes += [Change("removed", "dead node(s) in model-local functions")] * (
            before["function_nodes"] - after["function_nodes"]
        )
        for k, count in after["outputs"].items():
            node = before["nodes"][k]
            changes += [Change("dropped", "unused optional node output(s)", (node.name,))] * (
                before["outputs"][k] - count
            )
        if "sort nodes topologically" in plan.actions:
            changes.append(Change("sorted", "graph(s) topologically"))
        if model.meta.pop(SORTED_ON_LOAD, False):
            changes.append(
                Change("sorted", "graph(s) topologically (IN's nodes were out of order)")
            )
        return changes
