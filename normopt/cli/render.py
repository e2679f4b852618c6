"""What the commands print: tables on stdout, failing checks and notes on stderr."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from normopt.cli.application import err, out


def dims_text(dims: list | None) -> str:
    """`[batch, 8]`; `?` for an unknown shape or an unnamed dim."""
    return (
        "?" if dims is None else "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
    )


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def verify_table(report) -> Table:
    table = Table(title=f"{report.model_a}  vs  {report.model_b}")
    for col in (
        "output",
        "dtype",
        "shape",
        "max abs",
        "max rel",
        "cosine",
        "tol (rtol, atol)",
        "own noise",
        "ok",
    ):
        table.add_column(col)
    for o in report.outputs:
        tol = "exact" if o.rtol is None else f"{o.rtol:g}, {o.atol:g}"
        status = (
            f"[yellow]changed[/] ({escape(o.skipped)})"
            if o.skipped
            else "[green]ok[/] (within the original's own noise)"
            if o.within_noise
            else "[green]ok[/]"
            if o.ok
            else f"[red]FAIL[/] {escape(o.problem or '')}"
        )
        table.add_row(
            escape(o.name),
            o.dtype,
            str(o.shape),
            fmt(o.max_abs),
            fmt(o.max_rel),
            fmt(o.cosine),
            tol,
            fmt(o.noise),
            status,
        )
    return table


def warn_note(report) -> None:
    if report.note:
        err.print(f"normopt: warning: {report.note}", markup=False, highlight=False)


def _norm_kind(norm: dict) -> str:
    """A norm's kind; an EvoNorm's with its variant and groups (per channel: instance)."""
    if norm["kind"] != "evonorm":
        return norm["kind"]
    groups = f"{norm['groups']} groups" if norm["groups"] else "per channel"
    layout = ", NHWC" if norm["layout"] == "NHWC" else ""
    return f"evonorm {norm['variant']} ({groups}{layout})"


def inspection(info: dict, title: str) -> None:
    """`normopt inspect`'s tables."""
    summary = Table(title=escape(title), show_header=False)
    for key, value in info["model"].items():
        if key in ("inputs", "outputs"):
            value = ", ".join(
                f"{v['name']} {v['dtype'] or '?'} {dims_text(v['shape'])}" for v in value
            )
        summary.add_row(key, escape(str(value)))
    out.print(summary)
    ops = Table(title="operators")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in info["operators"].items():
        ops.add_row(op, str(count))
    out.print(ops)
    norms = Table(title=f"norms ({len(info['norms'])})")
    for col in ("kind", "form", "axis", "epsilon", "dtype", "compute", "scale", "bias", "where"):
        norms.add_column(col)
    for n in info["norms"]:
        eps = "-" if n["epsilon"] is None else f"{n['epsilon']:.3g}"
        norms.add_row(
            _norm_kind(n),
            n["form"],
            str(n["axis"]),
            eps,
            str(n["dtype"]),
            str(n["compute_dtype"]),
            "yes" if n["scale"] else "no",
            "yes" if n["bias"] else "no",
            n["nodes"][0],
        )
    out.print(norms)
    out.print(
        f"architecture: [bold]{info['architecture']}[/] ({'; '.join(info['architecture_reasons'])})"
    )
    table = Table(title="passes")
    for col in ("pass", "applies", "reason"):
        table.add_column(col)
    for name, p in info["passes"].items():
        table.add_row(name, "[green]yes[/]" if p["applies"] else "no", escape(p["reason"]))
    out.print(table)
    for key, label in (("crms", "Pre-CRMSNorm (rewrite --crms on|auto)"),
                       ("rotation", "Rotation (rewrite --rotate hadamard|random)")):  # fmt: skip
        answer = info[key]
        after = f" after {answer['after']}" if answer["after"] else ""
        out.print(
            f"{label}{after}: {'applies' if answer['applies'] else 'no'}: {answer['reason']}",
            markup=False,
            highlight=False,
        )


def rewrite_result(result, explain: bool, timings: bool, threads: int, stdout: bool) -> None:
    """The tables (on stdout unless --json took it); a failing check and notes on stderr."""
    if stdout:
        if result.passes:
            _rewrite_table(result, explain)
        if result.verification is not None:
            out.print(verify_table(result.verification))
        if result.crms is not None:
            out.print(
                f"--crms auto ({result.crms.backend}, {threads} threads): RMS "
                f"{result.crms.rms.text()} x original; "
                f"{result.crms.why}",
                markup=False,
                highlight=False,
            )
        if result.guard is not None:
            out.print(
                f"speed guard ({result.guard.backend}, {threads} threads): {result.guard.verdict}",
                markup=False,
                highlight=False,
            )
        if timings:
            timings_table(result.seconds)
        if result.passes:
            summary(result)
    if result.verification is not None:
        if not result.verification.ok:  # one line in the error log, the table is on stdout
            fail_line(result.verification)
        warn_note(result.verification)


def timings_table(seconds: dict[str, float]) -> None:
    table = Table(title="timings (seconds; an indented step is part of the next one that is not)")
    table.add_column("step")
    table.add_column("s", justify="right")
    table.add_column("share", justify="right")
    total = seconds.get("total") or 1.0
    for step, s in seconds.items():
        inner = step.startswith(("load: ", "pass ", "shape annotation"))
        table.add_row(("  " if inner else "") + step, f"{s:.3f}", f"{100 * s / total:.0f}%")
    out.print(table)


def _rewrite_table(result, explain: bool) -> None:
    table = Table(title=f"rewrite {result.input} -> {result.output}")
    for col in ("pass", "applied", "what changed / why not"):
        table.add_column(col)
    for p in result.passes:
        if p.modified:
            table.add_row(p.name, "[green]yes[/]", escape("\n".join(p.lines)))
        else:
            first = p.refusals[0] if p.refusals else None
            table.add_row(
                p.name,
                "no",
                escape(f"{first.candidate}: {first.reason}") if first else "nothing to do",
            )
    out.print(table)
    if explain:
        _explain(result)


def _explain(result) -> None:
    """--explain: refusals grouped by reason, changes by kind, with counts and two examples
    each (a norm by its module path, not its nodes); passes with nothing to do in one line."""
    idle = [(p.name, r.reason) for p in result.passes for r in p.refusals if r.candidate == "model"]
    refusals = _grouped(
        ((p.name, r.reason), r.candidate)
        for p in result.passes
        for r in p.refusals
        if r.candidate != "model"
    )
    changes = _grouped(
        ((p.name, c.kind, c.what, c.why or ""), _example(c))
        for p in result.passes
        for c in p.changes
    )
    for title, groups, columns in (
        ("refusals (by reason)", refusals, ("pass", "reason")),
        ("changes (by kind)", changes, ("pass", "kind", "what", "why")),
    ):
        if not groups:
            out.print(f"no {title.split()[0]}")
            continue
        keep = [i for i, _ in enumerate(columns) if any(key[i] for key in groups)]
        table = Table(title=title)
        for col in [columns[i] for i in keep] + ["count", "e.g."]:
            table.add_column(col)
        for key, examples in groups.items():
            named = list(dict.fromkeys(examples))  # a writer's weight and bias: one module
            more = f" (+{len(named) - 2})" if len(named) > 2 else ""
            table.add_row(
                *(escape(key[i]) for i in keep),
                str(len(examples)),
                escape(", ".join(named[:2]) + more),
            )
        out.print(table)
    for name, reason in idle:
        out.print(f"{name}: nothing to do ({reason})", markup=False, highlight=False)


def _grouped(items) -> dict[tuple, list[str]]:
    groups: dict[tuple, list[str]] = {}
    for key, example in items:
        groups.setdefault(key, []).append(example)
    return groups


def _example(change) -> str:
    """What names a change record: its first node's module, else its first value."""
    if change.nodes:
        return _module(change.nodes[0])
    return change.values[0] if change.values else change.what


def _module(node: str) -> str:
    """A node by its module path: '/model/h.0/ln_1/LayerNormalization' -> '/model/h.0/ln_1'."""
    head, _, last = node.rstrip("/").rpartition("/")
    return head if head and last[:1].isupper() else node


def summary(result) -> None:
    """The rewrite in a few lines: op diff, nodes, size, time, verdict, and why it grew."""
    before, after = result.nodes_before, result.nodes_after
    diff = {op: after.get(op, 0) - before.get(op, 0) for op in {**before, **after}}
    changed = sorted((d for d in diff.items() if d[1]), key=lambda d: (-abs(d[1]), d[0]))
    shown = ", ".join(f"{op} {n:+d}" for op, n in changed[:8])
    more = f", {len(changed) - 8} more" if len(changed) > 8 else ""
    lines = [f"ops: {shown}{more}" if changed else "ops: unchanged"]
    nodes = (sum(before.values()), sum(after.values()))
    facts = [f"nodes {nodes[0]} -> {nodes[1]} ({nodes[1] - nodes[0]:+d})"]
    if result.bytes_before is not None and result.bytes_after is not None:
        facts.append(f"size {_size(result.bytes_before)} -> {_size(result.bytes_after)}")
    if "total" in result.seconds:
        facts.append(f"{result.seconds['total']:.1f} s")
    lines.append(", ".join(facts))
    check = result.verification
    if check is None:
        lines.append("not verified (--no-verify)")
    elif check.ok:
        worst = max((o.max_rel or 0.0 for o in check.outputs), default=0.0)
        method = check.plan.method if check.plan else "full"
        lines.append(
            f"verified ({method}): {len(check.outputs)} output(s) within tolerance, worst "
            f"max rel {worst:.2g}"
        )
    if nodes[1] > nodes[0] and diff.get("ReduceMean", 0) > 0 and not diff.get("RMSNormalization"):
        lines += [
            "the graph grew: below opset 23 --target onnx writes each RMSNorm as its primitive",
            "ops (onnxruntime fuses them back when it loads the model); --target ort writes one",
            "SimplifiedLayerNormalization each",
        ]
    if result.tensorrt is not None:
        plugins = sorted(op.split("::")[1] for op in after if "::Normopt" in op)
        lines.append(
            f"written for TensorRT {result.tensorrt} (--trt-version)"
            + (
                f"; it uses normopt's plugins ({', '.join(plugins)}): build it with `normopt "
                "build`, or register them (normopt.plugins) before TensorRT parses it"
                if plugins
                else ""
            )
        )
    for line in lines:
        out.print(line, markup=False, highlight=False)


def fail_line(report) -> None:
    """A failing verification in one line on stderr."""
    failing = report.failures()
    worst = failing[0]
    err.print(
        f"FAIL: {len(failing)} of {len(report.outputs)} output(s) outside tolerance "
        f"(output '{worst.name}': {worst.problem})",
        markup=False,
        highlight=False,
    )


def _size(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


def profile_tables(report) -> None:
    first = report.models[0]
    table = Table(
        title=f"latency, {report.environment['backend']}, {report.environment['threads']} threads, "
        f"{report.summary[first]['runs']} interleaved runs each"
    )
    for col in (
        "model",
        "median ms",
        "p90",
        "p99",
        "mean",
        "std",
        "samples/s",
        "x first (paired) [95% CI]",
        "verdict",
    ):
        table.add_column(col, justify="right" if col not in ("model", "verdict") else "left")
    for n in report.summary:
        s = report.summary[n]
        ci = s.get("ci95")
        table.add_row(
            escape(n),
            f"{s['median_ms']:.3f}",
            f"{s['p90_ms']:.3f}",
            f"{s['p99_ms']:.3f}",
            f"{s['mean_ms']:.3f}",
            f"{s['std_ms']:.3f}",
            f"{s['throughput_per_s']:.1f}",
            f"{s['ratio']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""),
            s.get("verdict", ""),
        )
    out.print(table)
    ops = Table(title="time per op type (ms per run, share; one profiled run each: indicative)")
    ops.add_column("op")
    for label in report.labels:
        ops.add_column(escape(label), justify="right")
    totals = {n: sum(report.ops[n].values()) or 1.0 for n in report.models}
    names = sorted(
        {op for n in report.models for op in report.ops[n]},
        key=lambda op: -max(report.ops[n].get(op, 0.0) for n in report.models),
    )
    for op in names[:15]:
        ops.add_row(
            op,
            *(
                f"{report.ops[n].get(op, 0.0):.3f} "
                f"({100 * report.ops[n].get(op, 0.0) / totals[n]:.1f}%)"
                for n in report.models
            ),
        )
    norm_ms = report.norms_ms
    ops.add_row(
        "[bold]all norms[/] (fused ops, and decomposed norms' nodes)",
        *(f"{norm_ms[n]:.3f} ({100 * norm_ms[n] / totals[n]:.1f}%)" for n in report.models),
    )
    out.print(ops)
    if report.runtime_ops:
        _runtime_ops(report)


def _runtime_ops(report) -> None:
    """OpenVINO's compiled layers by type, per model: what it fused (MVN, RMS, ...)."""
    layers = Table(title="OpenVINO layers by type")
    layers.add_column("layer")
    for label in report.labels:
        layers.add_column(escape(label), justify="right")
    kinds = sorted({k for n in report.models for k in report.runtime_ops[n]})
    for kind in sorted(
        kinds, key=lambda k: -max(report.runtime_ops[n].get(k, 0) for n in report.models)
    ):
        layers.add_row(kind, *(str(report.runtime_ops[n].get(kind, 0)) for n in report.models))
    out.print(layers)


def recalibration(result) -> None:
    """`normopt recalibrate`'s tables."""
    layers = Table(
        title=f"recalibrated {len(result.layers)} BatchNorm(s) on {result.samples} samples "
        f"({result.batches} batches, --stats {result.stats})"
    )
    for col in ("BatchNorm", "channels", "max mean shift (old stds)", "var ratio new/old"):
        layers.add_column(col)
    for layer in result.layers:
        layers.add_row(
            escape(layer["name"]),
            str(layer["channels"]),
            f"{layer['mean_shift_max']:.3g}",
            f"{layer['var_ratio_min']:.3g} .. {layer['var_ratio_max']:.3g}",
        )
    out.print(layers)
    drift = Table(title="outputs on the first calibration batch, recalibrated vs original")
    for col in ("output", "max abs change", "relative to its scale"):
        drift.add_column(col)
    for d in result.drift:
        drift.add_row(escape(d["output"]), fmt(d["max_abs"]), fmt(d["max_rel"]))
    out.print(drift)
    if result.check:
        out.print(f"statistics: {result.check}", markup=False, highlight=False)
