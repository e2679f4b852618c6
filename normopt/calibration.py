"""`recalibrate`: re-estimate every BatchNorm's running mean and variance from calibration data
(AdaBN), streaming, with the rest of the rewrite contract (IN never written, OUT atomic).

How: a calibration copy of the model runs in onnxruntime, in which every BatchNorm normalizes
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

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from normopt import files
from normopt.errors import BadInput, InternalError
from normopt.files import Transaction, temp_folder
from normopt.passes.convbn_tune import tune_records
from normopt.rewriter import io
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import default_opset
from normopt.schema import document
from normopt.sessions import run_ort_all

STATS = ("torch", "pooled")


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
    for record in tune_records(model):
        site = _tuned_site(model, record)
        if isinstance(site, str):
            problems.append(site)
        else:
            sites.append(site)
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
                node.name or f"batchnorm{len(sites)}",
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


def _check_statistics(site: Site, where: str, problems: list[str]) -> None:
    for what, value in (("mean", site.mean), ("variance", site.var)):
        if not value.is_initializer():
            problems.append(f"{where}: its running {what} '{value.name}' is not an initializer")
        elif len(value.uses()) > 1:
            problems.append(
                f"{where}: its running {what} '{value.name}' is shared with another node"
            )


def _tuned_site(model: ir.Model, record: dict) -> Site | str:
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
    node = nodes.get(record["node"])
    names = [record[k] for k in ("weight", "gamma", "beta", "mean", "var")] + (
        [record["bias"]] if record["bias"] else []
    )
    add = nodes.get(record["bias_add"]) if record["bias_add"] else None
    if (
        node is None
        or node.op_type != record["op"]
        or any(n not in values for n in names)
        or (record["op"] == "MatMul" and (add is None or node.outputs[0] not in add.inputs))
    ):
        return (
            f"BatchNorm '{record['bn']}' was tuned into {record['op']} '{record['node']}', which "
            "the graph no "
            "longer has as recorded (edited after convbn-tune?)"
        )
    return Site(
        record["bn"],
        *_untuned_output(node, add, record, values),
        *(values[record[k]] for k in ("gamma", "beta", "mean", "var")),
        record["epsilon"],
        [],
        channel_last=record["op"] in ("Gemm", "MatMul"),
    )


def _untuned_output(
    node: ir.Node, add: ir.Node | None, record: dict, values: dict
) -> tuple[ir.Value, ir.Value]:
    """Give the tuned op back its original weight and bias (the calibration copy computes what
    the BatchNorm read); returns (that value, the value whose readers read the BatchNorm)."""
    node.replace_input_with(1, values[record["weight"]])
    bias = values[record["bias"]] if record["bias"] else None
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
    if record["gemm_beta"] is not None:
        node.attributes["beta"] = ir.AttrFloat32("beta", record["gemm_beta"])
    return node.outputs[0], node.outputs[0]


def calibration_model(model: ir.Model, sites: list[Site]) -> list[tuple[str, str, str]]:
    """Turn `model` into its calibration copy (in place): each site normalizes with its batch's
    statistics and outputs them. Returns, per site, the names of its batch mean, batch
    (biased) variance and element-count outputs."""
    edit, opset, names = Editor(model.graph), default_opset(model), []
    double = ir.DataType.DOUBLE
    model.graph.outputs.clear()
    for site in sites:
        base = f"{site.name}.calibration"
        # a BN reads what it reads now: an earlier site may have replaced its input
        x = site.replaces[0].inputs[0] if site.replaces else site.x
        dtype = x.dtype or site.gamma.dtype or ir.DataType.FLOAT
        nodes: list[ir.Node] = []
        readers = list(site.y.uses())  # before the calibration nodes read it too

        def op(kind: str, inputs: list, suffix: str, **attributes) -> ir.Value:
            nodes.append(edit.node(kind, inputs, attributes, name=f"{base}.{suffix}"))
            return nodes[-1].outputs[0]

        def constant(array: np.ndarray, suffix: str) -> ir.Value:
            return edit.initializer(f"{base}.{suffix}", array)

        channels_last = constant(np.array([1, -1, 1], np.int64), "channel_shape")
        flat = [-1, site.gamma.shape[0], 1] if site.channel_last else [0, 0, -1]  # [N', C, L]
        x3 = op(
            "Cast",
            [op("Reshape", [x, constant(np.array(flat, np.int64), "flat")], "flat")],
            "wide",
            to=double,
        )
        nodes.append(edit.reduce_mean(x3, [0, 2], opset, name=f"{base}.batch_mean"))
        mean = nodes[-1].outputs[0]
        centred = op("Sub", [x3, mean], "centred")
        nodes.append(
            edit.reduce_mean(
                op("Mul", [centred, centred], "squared"), [0, 2], opset, name=f"{base}.batch_var"
            )
        )
        var = nodes[-1].outputs[0]
        std = op(
            "Sqrt",
            [op("Add", [var, constant(np.array(site.epsilon, np.float64), "epsilon")], "var_eps")],
            "std",
        )
        gamma = op(
            "Reshape", [op("Cast", [site.gamma], "gamma_wide", to=double), channels_last], "gamma"
        )
        beta = op(
            "Reshape", [op("Cast", [site.beta], "beta_wide", to=double), channels_last], "beta"
        )
        y3 = op(
            "Add",
            [op("Mul", [op("Div", [centred, std], "normalized"), gamma], "scaled"), beta],
            "shifted",
        )
        y = op("Reshape", [op("Cast", [y3], "narrow", to=dtype), op("Shape", [x], "shape")], "y")
        outputs = [
            op("Reshape", [mean, constant(np.array([-1], np.int64), "vector")], "mean_out"),
            op("Reshape", [var, constant(np.array([-1], np.int64), "vector_2")], "var_out"),
            op("Size", [x], "size"),
        ]
        for use in readers:
            use.node.replace_input_with(use.idx, y)
        edit.graph.insert_after(site.y.producer(), nodes)
        edit.graph.remove(site.replaces, safe=True)
        model.graph.outputs.extend(outputs)
        names.append(tuple(v.name for v in outputs))
    return names


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


def calibration_batches(
    data: Path, spec: ir.Model, batch_size: int, limit: int | None
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch_size` samples (the last one may be smaller) from an .npz of arrays
    with a leading sample axis, or from every .npz in a folder (in name order), each file
    checked against the model's inputs; at most `limit` batches."""
    from normopt.inputs import check_feeds

    files = [data] if data.is_file() else sorted(data.glob("*.npz")) if data.is_dir() else []
    if not files:
        raise BadInput(f"--data '{data}' is neither an .npz file nor a folder holding .npz files")
    pending: dict[str, list[np.ndarray]] = {}
    held, produced = 0, 0
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError) as exc:
            raise BadInput(f"cannot read --data file '{path}': {exc}") from None
        arrays = check_feeds(spec, arrays, f"--data file '{path}'", any_first_dim=True)
        counts = {k: (a.shape[0] if a.ndim else 0) for k, a in arrays.items()}
        if len(set(counts.values())) != 1:
            raise BadInput(
                f"--data file '{path}': the inputs hold different numbers of samples {counts}"
            )
        for k, a in arrays.items():
            pending.setdefault(k, []).append(a)
        held += next(iter(counts.values()))
        while held >= batch_size:
            batch = {k: np.concatenate(v) for k, v in pending.items()}
            yield check_feeds(
                spec,
                {k: a[:batch_size] for k, a in batch.items()},
                f"a batch of {batch_size} (--batch-size)",
            )
            produced += 1
            if limit is not None and produced >= limit:
                return
            pending, held = {k: [a[batch_size:]] for k, a in batch.items()}, held - batch_size
    if held:
        yield check_feeds(
            spec,
            {k: np.concatenate(v) for k, v in pending.items()},
            f"the last batch, {held} sample(s)",
        )
    elif not produced:
        raise BadInput(f"--data '{data}' holds no samples")


@dataclass
class RecalibrateReport:
    input: str
    output: str
    data: str
    stats: str
    batch_size: int
    batches: int = 0
    samples: int = 0
    layers: list[dict] = field(default_factory=list)
    drift: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    written: bool = False

    def to_json(self) -> dict:
        """`normopt recalibrate`'s document (normopt.schema)."""
        calibration = self.seconds.get("calibration") or 0.0
        return document(
            "recalibrate",
            {
                "input": self.input,
                "output": self.output,
                "written": self.written,
                "stats": self.stats,
                "data": {
                    "source": self.data,
                    "batches": self.batches,
                    "samples": self.samples,
                    "batch_size": self.batch_size,
                    "samples_per_s": self.samples / calibration if calibration else None,
                },
                "layers": self.layers,
                "drift": self.drift,
            },
            seconds=self.seconds,
        )


def recalibrate(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    data: str | os.PathLike,
    *,
    batch_size: int = 32,
    batches: int | None = None,
    stats: str = "torch",
    on_step: Callable[[str], None] | None = None,
) -> RecalibrateReport:
    """Write `src` with every BatchNorm's running mean and variance re-estimated on `data` to
    `dst` (never over an input file)."""
    src, dst, data = Path(src), Path(dst), Path(data)
    step = on_step or (lambda _m: None)
    if batch_size < 1 or (batches is not None and batches < 1):
        raise BadInput("--batch-size and --batches must be at least 1")
    if stats not in STATS:
        raise BadInput(f"--stats takes {' or '.join(STATS)}, not '{stats}'")
    report = RecalibrateReport(str(src), str(dst), str(data), stats, batch_size)
    start = time.perf_counter()
    with Transaction() as transaction:
        io.check_readable_file(src)
        transaction.protect_model(src)
        for path in [data, *(data.glob("*.npz") if data.is_dir() else [])]:
            transaction.protect(path, "--data file")
        transaction.output(dst)
        model = io.load(src)
        external = io.uses_external_data(model)
        sites = find_sites(model)
        before = {
            s.name: (
                s.mean.name,
                s.var.name,
                s.epsilon,
                s.mean.const_value.numpy().astype(np.float64),
                s.var.const_value.numpy().astype(np.float64),
            )
            for s in sites
        }
        spec = _input_spec(model)
        batches_of = calibration_batches(data, spec, batch_size, batches)
        names = calibration_model(model, sites)
        with temp_folder(dst) as tmp:
            calibrating = tmp / "calibration.onnx"
            files.save(model, calibrating, external_data=True)
            del model
            moments, first = _calibrate(calibrating, sites, names, batches_of, spec, report, step)
        step(f"writing {dst.name}")
        out = io.load(src)
        _update(out, before, moments, stats, report)
        staged = transaction.stage(out, dst, external_data=external)
        del out
        if first is not None:
            step("measuring the outputs' drift")
            report.drift = _drift(src, staged.path, first, spec)
        transaction.commit(staged)
    report.written = True
    report.seconds["total"] = time.perf_counter() - start
    return report


def _calibrate(
    path: Path,
    sites: list[Site],
    names: list[tuple[str, str, str]],
    batches: Iterator[dict[str, np.ndarray]],
    spec: ir.Model,
    report: RecalibrateReport,
    step: Callable[[str], None],
) -> tuple[dict[str, Moments], dict[str, np.ndarray] | None]:
    """Every BatchNorm's moments over the batches, streamed through the calibration model at
    `path`; and the first batch (what the drift is measured on)."""
    spec_inputs = {v.name for v in spec.graph.inputs}
    moments = {s.name: Moments() for s in sites}
    first: dict[str, np.ndarray] | None = None
    session = _session(path)
    t0 = time.perf_counter()
    for batch in batches:
        first = first if first is not None else batch
        step(f"calibrating: batch {report.batches + 1} ({report.samples} samples so far)")
        outputs = session.run(
            [n for triple in names for n in triple],
            {k: v for k, v in batch.items() if k in spec_inputs},
        )
        for i, site in enumerate(sites):
            mean, var, size = outputs[3 * i : 3 * i + 3]
            n = int(size) // mean.size
            if n < 2:
                raise BadInput(
                    f"a batch gives BatchNormalization '{site.name}' {n} value per channel: "
                    "a variance needs 2 or more (use a larger --batch-size)"
                )
            moments[site.name].add(mean, var, n)
        report.batches += 1
        report.samples += len(next(iter(batch.values())))
    report.seconds["calibration"] = time.perf_counter() - t0
    return moments, first


def _update(
    model: ir.Model,
    before: dict[str, tuple],
    moments: dict[str, Moments],
    stats: str,
    report: RecalibrateReport,
) -> None:
    """The named running-statistics initializers of `model` set to the new moments; each
    layer's change recorded in the report."""
    for name, (mean_name, var_name, eps, old_mean, old_var) in before.items():
        mean, var = moments[name].result(stats)
        for value, array in (
            (model.graph.initializers[mean_name], mean),
            (model.graph.initializers[var_name], var),
        ):
            dtype = value.const_value.dtype.numpy()
            value.const_value = ir.Tensor(
                array.reshape(value.const_value.shape.numpy()).astype(dtype), name=value.name
            )
        report.layers.append(
            {
                "name": name,
                "channels": int(mean.size),
                "mean": mean_name,
                "var": var_name,
                "mean_shift_max": float(np.max(np.abs(mean - old_mean) / np.sqrt(old_var + eps))),
                "var_ratio_min": float(np.min((var + eps) / (old_var + eps))),
                "var_ratio_max": float(np.max((var + eps) / (old_var + eps))),
            }
        )


def _drift(src: Path, staged: Path, batch: dict[str, np.ndarray], spec: ir.Model) -> list[dict]:
    """How far each output moved on `batch`, recalibrated against the original."""
    feeds = {k: v for k, v in batch.items() if k in {v.name for v in spec.graph.inputs}}
    a, b = run_ort_all(src, [feeds])[0], run_ort_all(staged, [feeds])[0]
    drift = []
    for name, ref in a.items():
        diff = np.abs(b[name].astype(np.float64) - ref.astype(np.float64))
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        drift.append(
            {
                "output": name,
                "max_abs": float(diff.max()) if diff.size else 0.0,
                "max_rel": float(diff.max()) / scale if diff.size and scale else None,
            }
        )
    return drift


def _input_spec(model: ir.Model) -> ir.Model:
    """A model holding only copies of `model`'s inputs (what batches are checked against),
    so the model itself can be dropped."""
    inputs = [
        ir.Value(name=v.name, type=v.type, shape=v.shape)
        for v in model.graph.inputs
        if not v.is_initializer()
    ]
    return ir.Model(ir.Graph(inputs, [], nodes=[]), ir_version=model.ir_version)


def _session(path: Path):
    from normopt.sessions import ModelRunError, check_session

    try:
        return check_session(path)
    except ModelRunError as exc:
        raise InternalError(
            f"the calibration model does not load in onnxruntime (a bug in normopt): {exc}"
        ) from None
