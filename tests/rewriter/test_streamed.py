"""A centred weight of a large model is computed while it is saved (StreamedTensor): the file
holds what numerics.center computes, embedded or in a data file, and reading its value gives
the same numbers."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from normopt.files import save
from normopt.rewriter import numerics, streamed
from tests.helpers import make_model, tensor


@pytest.mark.parametrize("external", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_streamed_weight_is_saved_as_computed(tmp_path, external, dtype):
    weight = np.random.default_rng(0).standard_normal((1024, 512)).astype(dtype)
    value = streamed.centred(weight, -1, weight.dtype)
    assert isinstance(value, streamed.StreamedTensor)  # 1024 x 512 x 2 bytes >= STREAM_BYTES
    expected = numerics.center(weight, -1, weight.dtype)
    assert np.array_equal(value.numpy(), expected)
    proto = make_model(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", onnx.helper.np_dtype_to_tensor_dtype(weight.dtype), (1, 1024))],
        [tensor("y", onnx.helper.np_dtype_to_tensor_dtype(weight.dtype), (1, 512))],
        [numpy_helper.from_array(np.zeros((1024, 512), dtype), "w")],
    )
    model = ir.from_proto(proto)
    model.graph.initializers["w"].const_value = value
    value.name = "w"
    path = tmp_path / "m.onnx"
    save(model, path, external_data=external)
    assert (tmp_path / "m.onnx.data").exists() == external
    saved = onnx.load(str(path)).graph.initializer[0]
    assert np.array_equal(numpy_helper.to_array(saved), expected)


def test_a_small_or_column_centred_weight_is_computed_at_once():
    rng = np.random.default_rng(0)
    small = rng.standard_normal((8, 8)).astype(np.float32)
    assert isinstance(streamed.centred(small, -1, np.float32), np.ndarray)
    wide = rng.standard_normal((1024, 512)).astype(np.float32)
    assert isinstance(streamed.centred(wide, 0, np.float32), np.ndarray)  # Gemm transB: axis 0
