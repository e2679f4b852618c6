"""`recalibrate`: re-estimate every BatchNorm's running mean and variance from calibration data
(AdaBN), streaming, with the rest of the rewrite contract (IN never written, OUT atomic): the
data read in batches, run through the calibration copy (normopt.calibration), the moments
combined (--stats torch | pooled), the named initializers updated, the outputs' drift measured.
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
from normopt.calibration import Moments, Site, calibration_model, find_sites
from normopt.errors import BadInput, InternalError
from normopt.files import Transaction, temp_folder
from normopt.recalibration_check import check
from normopt.rewriter import io
from normopt.schema import document, now
from normopt.sessions import run_ort_all

STATS = ("torch", "pooled")


def _check_finite(arrays: dict[str, np.ndarray], path: Path) -> None:
    """NaN or Inf in calibration data would make every statistic NaN: refused, by input."""
    for name, array in arrays.items():
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise BadInput(f"--data file '{path}': input '{name}' holds {bad} NaN or Inf value(s)")


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
    if data.is_file() and data.suffix != ".npz":
        raise BadInput(
            f"--data '{data}' is not an .npz: give arrays by input name (np.savez(path, x=...)) "
            "or a folder of .npz files"
        )
    pending: dict[str, list[np.ndarray]] = {}
    held, produced = 0, 0
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError) as exc:
            raise BadInput(f"cannot read --data file '{path}': {exc}") from None
        arrays = check_feeds(spec, arrays, f"--data file '{path}'", any_first_dim=True)
        _check_finite(arrays, path)
        counts = {k: (a.shape[0] if a.ndim else 0) for k, a in arrays.items()}
        if len(set(counts.values())) != 1:
            raise BadInput(
                f"--data file '{path}': the inputs hold different numbers of samples {counts}"
            )
        for k, a in arrays.items():
            held_shape = pending[k][0].shape[1:] if pending.get(k) else a.shape[1:]
            if a.shape[1:] != held_shape:  # the batch would mix sample shapes
                raise BadInput(
                    f"--data file '{path}': input '{k}' holds samples of shape "
                    f"{list(a.shape[1:])}, the files before it {list(held_shape)}: a batch takes "
                    "one shape (one folder of .npz per sample shape)"
                )
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
    check: str | None = None  # the statistics against an independent evaluation
    seconds: dict[str, float] = field(default_factory=dict)
    written: bool = False

    # the document's stamp, one per report: every copy of the document carries it
    created: str = field(default_factory=now, repr=False)

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
                "check": self.check,
            },
            seconds=self.seconds,
            created=self.created,
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
        before = _statistics(sites)
        spec = _input_spec(model)
        model_bytes = io.initializer_bytes(model)
        batches_of = calibration_batches(data, spec, batch_size, batches)
        names = calibration_model(model, sites)
        with temp_folder(dst) as tmp:
            calibrating = tmp / "calibration.onnx"
            files.save(model, calibrating, external_data=True)
            del model
            moments, first = _calibrate(calibrating, sites, names, batches_of, spec, report, step)
            if first is not None:
                step("checking the statistics against an independent float64 evaluation")
                report.check = check(src, sites, _session(calibrating), names, first, model_bytes)
        step(f"writing {dst.name}")
        out = io.load(src)
        _update(out, before, moments, stats, report)
        staged = transaction.stage(out, dst, external_data=external)
        del out
        if first is not None:
            step("measuring the outputs' drift")
            report.drift = _drift(src, staged.path, first)
        transaction.commit(staged)
    report.written = True
    report.seconds["total"] = time.perf_counter() - start
    return report


def _statistics(sites: list[Site]) -> dict[str, tuple]:
    """Per site: the names of its running mean and variance, its epsilon, their values now."""
    return {
        s.name: (
            s.mean.name,
            s.var.name,
            s.epsilon,
            s.mean.const_value.numpy().astype(np.float64),
            s.var.const_value.numpy().astype(np.float64),
        )
        for s in sites
    }


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
    `path`; and the first batch, as the model's inputs (what the check and the drift run on)."""
    spec_inputs = {v.name for v in spec.graph.inputs}
    moments = {s.name: Moments() for s in sites}
    first: dict[str, np.ndarray] | None = None
    session = _session(path)
    t0 = time.perf_counter()
    for batch in batches:
        feeds = {k: v for k, v in batch.items() if k in spec_inputs}
        first = first if first is not None else feeds
        step(f"calibrating: batch {report.batches + 1} ({report.samples} samples so far)")
        outputs = session.run([n for triple in names for n in triple], feeds)
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
        if not (np.isfinite(mean).all() and np.isfinite(var).all()):
            raise BadInput(
                f"BatchNorm '{name}': its statistics on the data are not finite (values too large "
                "for float64 sums?); nothing written"
            )
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


def _drift(src: Path, staged: Path, feeds: dict[str, np.ndarray]) -> list[dict]:
    """How far each output moved on `feeds`, recalibrated against the original."""
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
