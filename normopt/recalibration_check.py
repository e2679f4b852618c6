"""recalibrate's output check: the statistics the calibration copy (normopt.calibration, run in
onnxruntime) gives every BatchNorm, against an evaluation that shares none of its code: onnx's
reference evaluator running the original graph in which each BatchNormalization normalizes
with its own batch's statistics (PyTorch's train mode), computed here in float64 and recorded.

On the first calibration batch (at most SAMPLES samples: the reference evaluator is plain
numpy), per BatchNorm and channel: |mean - reference mean| <= TOLERANCE x reference std and
|var - reference var| <= TOLERANCE x (reference var + epsilon); a miss is exit 1 and nothing
is written. Not checked (said in the report): models with convbn-tune blocks (their
BatchNorms are no nodes of the graph) and models over MAX_BYTES of weights (the reference
needs the whole model in memory a second time).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from normopt.calibration import Site
from normopt.errors import VerificationFailed

SAMPLES = 8
TOLERANCE = 1e-3
MAX_BYTES = 512 * 2**20


def _reference(src: Path, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, tuple]:
    """Per BatchNorm (named in graph order by `names`): (batch mean, biased variance), from
    onnx's reference evaluator with a train-mode BatchNormalization."""
    import onnx_ir as ir
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    from normopt.rewriter import io

    proto = ir.serde.serialize_model(io.load(src))
    norms = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    for node, name in zip(norms, names):
        node.name = name  # the sites' names (unnamed BatchNorms have generated ones)
    recorded: dict[str, tuple] = {}

    class BatchNormalization(OpRun):  # train mode: the batch's own statistics, in float64
        def _run(self, x, scale, bias, mean, var, epsilon=1e-5, momentum=None, training_mode=0):
            wide = x.astype(np.float64)
            axes = (0, *range(2, x.ndim))
            m, v = wide.mean(axis=axes), wide.var(axis=axes)
            recorded[self.onnx_node.name] = (m, v)
            shape = (1, -1) + (1,) * (x.ndim - 2)
            y = (wide - m.reshape(shape)) / np.sqrt(v.reshape(shape) + epsilon)
            y = y * scale.astype(np.float64).reshape(shape) + bias.astype(np.float64).reshape(shape)
            return (y.astype(x.dtype),)

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # overflow in the model's own float32 math
        ReferenceEvaluator(proto, new_ops=[BatchNormalization]).run(None, feeds)
    return recorded


def check(
    src: Path,
    sites: list[Site],
    session,
    outputs: list[tuple[str, str, str]],
    batch: dict[str, np.ndarray],
    model_bytes: int,
) -> str:
    """Compare the calibration copy (`session`, its statistics `outputs` per site) with the
    reference on the first SAMPLES samples of `batch`; raises VerificationFailed on a miss,
    returns what was checked (or why not) for the report."""
    if any(len(site.replaces) != 1 for site in sites) or any(
        site.replaces[0].op_type != "BatchNormalization" for site in sites
    ):
        return "not checked: convbn-tune blocks (their BatchNorms are no graph nodes)"
    if model_bytes > MAX_BYTES:
        return f"not checked: over {MAX_BYTES >> 20} MiB of weights (the reference copies them)"
    feeds = {k: v[:SAMPLES] for k, v in batch.items()}
    got = session.run([n for triple in outputs for n in triple[:2]], feeds)
    if not all(np.isfinite(a).all() for a in got):
        return "not checked: the statistics are not finite (refused below)"
    try:
        reference = _reference(src, [s.name for s in sites], feeds)
    except Exception as exc:  # an op onnx's reference evaluator lacks
        return f"not checked: onnx's reference evaluator cannot run the model ({exc})"[:300]
    for i, site in enumerate(sites):
        mean, var = got[2 * i], got[2 * i + 1]
        ref_mean, ref_var = reference[site.name]
        mean_off = np.abs(mean - ref_mean) / np.sqrt(ref_var + site.epsilon)
        var_off = np.abs(var - ref_var) / (ref_var + site.epsilon)
        worst = float(max(mean_off.max(initial=0.0), var_off.max(initial=0.0)))
        if not worst <= TOLERANCE:
            raise VerificationFailed(
                f"BatchNorm '{site.name}': the calibration statistics differ from an "
                f"independent float64 evaluation by {worst:.3g} of its scale (> {TOLERANCE}); "
                "nothing written"
            )
    samples = len(next(iter(feeds.values())))
    return f"{len(sites)} BatchNorm(s) checked on {samples} sample(s) against float64"
