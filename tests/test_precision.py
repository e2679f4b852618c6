"""Precision-aware verification: a graph that computes in float16 behind float32 inputs and
outputs (onnxruntime's float16 converter with keep_io_types, LayerNorms kept in float32, the
usual deployment recipe) is judged at float16's tolerance and noise, not float32's."""

import numpy as np
import onnx
import pytest

import normopt
from normopt.errors import VerificationFailed
from normopt.sessions import run_ort
from normopt.verification import compute_dtype
from tests.helpers import mlp, save


def _fp16(src, dst):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    onnx.save(
        convert_float_to_float16(model, keep_io_types=True, op_block_list=["LayerNormalization"]),
        str(dst),
    )
    return dst


def test_the_compute_dtype_is_read_from_the_graph(tmp_path):
    assert compute_dtype(save(mlp(), tmp_path / "a.onnx")) == np.float32
    mixed = _fp16(save(mlp(), tmp_path / "b.onnx"), tmp_path / "b16.onnx")
    assert compute_dtype(mixed) == np.float16
    assert compute_dtype(save(mlp(dtype=np.float16), tmp_path / "c.onnx")) == np.float16


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2-dyn18", "vit-dyn18", "gpt2fused-ts17", "vitfused-dyn18"])
def test_a_mixed_precision_export_is_rewritten_and_stays_as_close_to_float32(
    corpus, tmp_path, name
):
    """Found from outside: exit 1 at the float32 tolerance (and a noise probe that cannot move
    float16 values). Now exit 0, and the rewrite is as close to the float32 model as the fp16
    original is (<= 1.5x its error)."""
    paths = corpus(name)
    mixed = _fp16(paths.model, tmp_path / "fp16.onnx")
    out, report = normopt.rewrite(mixed, tmp_path / "out.onnx")
    assert report.written and report.verification.ok and report.changed
    assert {(o.rtol, o.atol) for o in report.verification.outputs} == {(1e-2, 1e-3)}
    feeds = paths.load_inputs()
    want = run_ort(paths.model, feeds)
    for output, reference in want.items():
        original = np.abs(run_ort(mixed, feeds)[output] - reference).max()
        rewritten = np.abs(run_ort(out, feeds)[output] - reference).max()
        assert rewritten <= 1.5 * original, (output, rewritten, original)


@pytest.mark.slow
def test_a_wrong_mixed_precision_rewrite_is_still_rejected(corpus, tmp_path, monkeypatch):
    """The float16 tolerance is no licence: centring along the wrong axis (the fuzzer's
    mutation) still fails verification."""
    from normopt.rewriter import numerics

    center = numerics.center
    monkeypatch.setattr(
        numerics,
        "center",
        lambda a, axis, dtype=None, **kw: center(a, 0 if axis % max(1, a.ndim) else -1, dtype),
    )
    mixed = _fp16(corpus("gpt2-dyn18").model, tmp_path / "fp16.onnx")
    with pytest.raises(VerificationFailed):
        normopt.rewrite(mixed, tmp_path / "out.onnx")
