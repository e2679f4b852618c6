"""The calibration copy of a model for `recalibrate` (normopt.recalibration).

A calibration copy of the model runs in onnxruntime, in which every BatchNorm normalizes
with its batch's own statistics, as PyTorch's train mode does (so each layer sees the inputs it
will see once the layers before it are recalibrated), and outputs, per batch and channel, the
mean and the (biased) variance of what it normalizes, computed in float64 over the batch and
every position (axis 1 is the channel axis; a token BN's Transposes are outside it). Per batch
only those [C] vectors are kept. The new statistics:
  --stats torch (default): the average over batches of each batch's mean and unbiased variance,
      what PyTorch's running statistics hold after train-mode passes with momentum=None
      (torch.optim.swa_utils.update_bn);
  --stats pooled: mean and unbiased variance over every calibration sample and position at
      once (batches combined with Chan's formula).
Verification is not "outputs equal" here (the point is to change them): the report gives each
layer's change and the outputs' drift on the first calibration batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normopt.errors import BadInput
from normopt.rewriter import tune_record
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import default_opset
from normopt.rewriter.tune_record import TuneRecord


@dataclass
class Site:
    """One BatchNorm: what it normalizes (`x`: channel axis 1, or the last axis for a tuned
    Gemm/MatMul), the value whose readers read its result (`y`), its parameters, the nodes
    its calibration form replaces."""

    name: str
    x: ir.Value
    y: ir.Value
    gamma: ir.Value
    beta: ir.Value
    mean: ir.Value
    var: ir.Value
    epsilon: float
    replaces: list[ir.Node]
    channel_last: bool = False


def find_sites(model: ir.Model) -> list[Site]:
    """Every BatchNormalization of the main graph, and every block convbn-tune made of one
    (their statistics still named: the tuned op gets its original weight and bias back, so
    call this on the calibration copy); refuses (BadInput) a BatchNorm whose statistics are
    not initializers of their own (a computed statistic has no name to update, a shared one
    would be updated twice)."""
    sites, problems = [], []
    for record in tune_record.read(model):
        site = _tuned_site(model, record)
        if isinstance(site, str):
            problems.append(site)
        else:
            name = _unique(site.name or "batchnorm", {s.name for s in sites})
            sites.append(dataclasses.replace(site, name=name))
    for site in sites:
        _check_statistics(
            site, f"BatchNorm '{site.name}' (tuned into {site.y.producer().op_type})", problems
        )
    for node in model.graph:
        if node.op_type != "BatchNormalization":
            continue
        where = f"BatchNormalization '{node.name}'"
        if node.attributes.get_int("training_mode", 0):
            problems.append(f"{where} runs in training mode")
            continue
        sites.append(
            Site(
                _unique(node.name or "batchnorm", {s.name for s in sites}),
                node.inputs[0],
                node.outputs[0],
                *node.inputs[1:5],
                node.attributes.get_float("epsilon", 1e-5),
                [node],
            )
        )
        _check_statistics(sites[-1], where, problems)
    if problems:
        raise BadInput("cannot recalibrate: " + "; ".join(problems))
    if not sites:
        raise BadInput("the model has no BatchNormalization to recalibrate")
    return sites


def _unique(name: str, used: set[str]) -> str:
    """`name`, or `name#k` with the first k that no site has: statistics are kept by site name,
    and two BatchNorms must never share them (unnamed ones, or one named like another)."""
    k, found = 2, name
    while found in used:
        found, k = f"{name}#{k}", k + 1
    return found


def _check_statistics(site: Site, where: str, problems: list[str]) -> None:
    for what, value in (("mean", site.mean), ("variance", site.var)):
        if not value.is_initializer():
            problems.append(f"{where}: its running {what} '{value.name}' is not an initializer")
        elif len(value.uses()) > 1:
            problems.append(
                f"{where}: its running {what} '{value.name}' is shared with another node"
            )


def _tuned_site(model: ir.Model, record: TuneRecord) -> Site | str:
    """A convbn-tune block as the BatchNorm it was: where the calibration copy must put it back
    (what the linear op computed with its original W and b), or why the graph no longer
    matches the record."""
    graph = model.graph
    values = {
        v.name: v
        for v in (
            *graph.inputs,
            *graph.initializers.values(),
            *(o for n in graph for o in n.outputs),
        )
    }
    nodes = {n.name: n for n in graph}
    node = nodes.get(record.node)
    names = [record.weight, record.gamma, record.beta, record.mean, record.var] + (
        [record.bias] if record.bias else []
    )
    add = nodes.get(record.bias_add) if record.bias_add else None
    if (
        node is None
        or node.op_type != record.op
        or any(n not in values for n in names)
        or (record.op == "MatMul" and (add is None or node.outputs[0] not in add.inputs))
    ):
        return (
            f"BatchNorm '{record.bn}' was tuned into {record.op} '{record.node}', which "
            "the graph no "
            "longer has as recorded (edited after convbn-tune?)"
        )
    return Site(
        record.bn,
        *_untuned_output(node, add, record, values),
        *(values[n] for n in (record.gamma, record.beta, record.mean, record.var)),
        record.epsilon,
        [],
        channel_last=record.op in ("Gemm", "MatMul"),
    )


def _untuned_output(
    node: ir.Node, add: ir.Node | None, record: TuneRecord, values: dict
) -> tuple[ir.Value, ir.Value]:
    """Give the tuned op back its original weight and bias (the calibration copy computes what
    the BatchNorm read); returns (that value, the value whose readers read the BatchNorm)."""
    node.replace_input_with(1, values[record.weight])
    bias = values[record.bias] if record.bias else None
    if add is not None:  # MatMul: its bias Add, the original one or the one the pass added
        index = 1 - list(add.inputs).index(node.outputs[0])
        if bias is None:
            return node.outputs[0], add.outputs[0]
        add.replace_input_with(index, bias)
        return add.outputs[0], add.outputs[0]
    if bias is None:
        node.resize_inputs(2)
    else:
        node.replace_input_with(2, bias)
    if record.gemm_beta is not None:
        node.attributes["beta"] = ir.AttrFloat32("beta", record.gemm_beta)
    return node.outputs[0], node.outputs[0]


def calibration_model(model: ir.Model, sites: list[Site]) -> list[tuple[str, str, str]]:
    """Turn `model` into its calibration copy (in place): each site normalizes with its batch's
    statistics and outputs them. Returns, per site, the names of its batch mean, batch
    (biased) variance and element-count outputs."""
    edit, opset, names = Editor(model.graph), default_opset(model), []
    model.graph.outputs.clear()
    for site in sites:
        readers = list(site.y.uses())  # before the calibration nodes read it too
        nodes, y, outputs = _batch_normalized(edit, site, opset)
        for use in readers:
            use.node.replace_input_with(use.idx, y)
        edit.graph.insert_after(site.y.producer(), nodes)
        edit.graph.remove(site.replaces, safe=True)
        model.graph.outputs.extend(outputs)
        names.append(tuple(v.name for v in outputs))
    return names


def _batch_normalized(
    edit: Editor, site: Site, opset: int
) -> tuple[list[ir.Node], ir.Value, list[ir.Value]]:
    """The nodes normalizing a site's input with its batch's statistics, in float64: x as
    [N', C, L], mean and biased variance over axes 0 and 2, y = (x - mean) / sqrt(var + eps) *
    gamma + beta in x's dtype and shape; the outputs: mean [C], variance [C], element count."""
    base, double = f"{site.name}.calibration", ir.DataType.DOUBLE
    # a BN reads what it reads now: an earlier site may have replaced its input
    x = site.replaces[0].inputs[0] if site.replaces else site.x
    dtype = x.dtype or site.gamma.dtype or ir.DataType.FLOAT
    nodes: list[ir.Node] = []

    def op(kind: str, inputs: list, suffix: str, **attributes) -> ir.Value:
        nodes.append(edit.node(kind, inputs, attributes, name=f"{base}.{suffix}"))
        return nodes[-1].outputs[0]

    def constant(array, suffix: str) -> ir.Value:
        return edit.initializer(f"{base}.{suffix}", np.asarray(array))

    def per_channel(value: ir.Value, suffix: str) -> ir.Value:
        wide = op("Cast", [value], f"{suffix}_wide", to=double)
        return op(
            "Reshape", [wide, constant(np.array([1, -1, 1], np.int64), f"{suffix}_shape")], suffix
        )

    flat = [-1, site.gamma.shape[0], 1] if site.channel_last else [0, 0, -1]  # [N', C, L]
    reshaped = op("Reshape", [x, constant(np.array(flat, np.int64), "flat")], "flat")
    x3 = op("Cast", [reshaped], "wide", to=double)
    nodes.append(edit.reduce_mean(x3, [0, 2], opset, name=f"{base}.batch_mean"))
    mean = nodes[-1].outputs[0]
    centred = op("Sub", [x3, mean], "centred")
    squared = op("Mul", [centred, centred], "squared")
    nodes.append(edit.reduce_mean(squared, [0, 2], opset, name=f"{base}.batch_var"))
    var = nodes[-1].outputs[0]
    var_eps = op("Add", [var, constant(np.array(site.epsilon, np.float64), "epsilon")], "var_eps")
    normalized = op("Div", [centred, op("Sqrt", [var_eps], "std")], "normalized")
    scaled = op("Mul", [normalized, per_channel(site.gamma, "gamma")], "scaled")
    y3 = op("Add", [scaled, per_channel(site.beta, "beta")], "shifted")
    y = op("Reshape", [op("Cast", [y3], "narrow", to=dtype), op("Shape", [x], "shape")], "y")
    outputs = [
        op("Reshape", [mean, constant(np.array([-1], np.int64), "vector")], "mean_out"),
        op("Reshape", [var, constant(np.array([-1], np.int64), "vector_2")], "var_out"),
        op("Size", [x], "size"),
    ]
    return nodes, y, outputs


@dataclass
class Moments:
    """Per channel, in float64: what each statistic mode needs, batch by batch."""

    batches: int = 0
    mean_sum: np.ndarray | float = 0.0  # torch: sums of batch means and unbiased variances
    var_sum: np.ndarray | float = 0.0
    n: int = 0  # pooled: Chan's running count, mean and M2
    mean: np.ndarray | float = 0.0
    m2: np.ndarray | float = 0.0

    def add(self, mean: np.ndarray, var_biased: np.ndarray, n: int) -> None:
        """One batch's moments (non-finite ones propagate silently: recalibrate refuses them
        when it reads the result)."""
        with np.errstate(all="ignore"):
            self._add(mean, var_biased, n)

    def _add(self, mean: np.ndarray, var_biased: np.ndarray, n: int) -> None:
        self.batches += 1
        self.mean_sum = self.mean_sum + mean
        self.var_sum = self.var_sum + var_biased * n / (n - 1)
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + var_biased * n + delta**2 * self.n * n / total
        self.n = total

    def result(self, stats: str) -> tuple[np.ndarray, np.ndarray]:
        if stats == "torch":
            return self.mean_sum / self.batches, self.var_sum / self.batches
        return np.asarray(self.mean), self.m2 / (self.n - 1)
