"""Every kernel against a float64 numpy reference: hypothesis-chosen rows, widths (odd d-1
included), dtypes, row pitches and launch configurations (the register-resident one-pass path
and the chunked two-pass path: a chunk narrower than the row forces the latter). On CPU through
Triton's interpreter; on a GPU for real."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from normopt.plugins.kernels import norms  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# output rounding of each dtype (relative), with headroom for fp32 accumulation order
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
WIDTHS = [1, 3, 16, 17, 64, 767, 768, 1024, 4095, 8193]


def make(rows, cols, dtype, pitch_extra, seed, offset=0.0):
    """A [rows, cols] tensor whose rows sit `pitch_extra` elements apart beyond cols."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols + pitch_extra, generator=g, dtype=torch.float32) * 2 + offset
    return base.to(dtype).to(DEVICE)[:, :cols]


def f64(t):
    return t.float().cpu().numpy().astype(np.float64)


def rms_reference(v, w=None):
    """float64 RMSNorm of the rows of numpy `v`, times the weight tensor `w` if given."""
    return v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-6) * (f64(w) if w is not None else 1.0)


def rows_and_weight(case):
    """(x, weight or None, dtype) for a drawn case."""
    rows, cols, dtype_name, pitch, with_weight, seed = case
    dtype = DTYPES[dtype_name]
    return (
        make(rows, cols, dtype, pitch, seed),
        make(1, cols, dtype, 0, seed + 1)[0] if with_weight else None,
        dtype,
    )


def check(got, expected, dtype):
    got = f64(got)
    scale = max(np.abs(expected).max(), 1e-6)
    np.testing.assert_allclose(got, expected, rtol=TOL[dtype], atol=TOL[dtype] * scale)


shapes = st.tuples(
    st.integers(1, 5),
    st.sampled_from(WIDTHS),
    st.sampled_from(list(DTYPES)),
    st.sampled_from([0, 5]),
    st.booleans(),
    st.integers(0, 1000),
)
# None: the default for the width; (16, 1): 16-wide chunks, so every width > 16 takes the two-pass
# path
configs = st.sampled_from([None, (16, 1), (256, 1)])


@settings(max_examples=25, deadline=None)
@given(shapes, configs)
def test_rms_norm(case, config):
    x, w, dtype = rows_and_weight(case)
    check(norms.rms_norm(x, w, 1e-6, config), rms_reference(f64(x), w), dtype)


@settings(max_examples=25, deadline=None)
@given(shapes, configs)
def test_crms_norm_equals_rms_norm_of_the_full_zero_mean_vector(case, config):
    x, w, dtype = rows_and_weight(case)
    xr = f64(x)
    full = np.concatenate([xr, -xr.sum(-1, keepdims=True)], axis=-1)  # the implicit d-th entry
    expected = rms_reference(full)[:, :-1] * (f64(w) if w is not None else 1.0)
    check(norms.crms_norm(x, w, 1e-6, config), expected, dtype)


@settings(max_examples=25, deadline=None)
@given(shapes, configs)
def test_add_rms_norm_writes_sum_and_norm(case, config):
    x, w, dtype = rows_and_weight(case)
    r = make(*x.shape, dtype, 0, case[-1] + 2)
    s, y = norms.add_rms_norm(x, r, w, 1e-6, config)
    stored = (x.float() + r.float()).to(dtype)  # the sum as stored in the input dtype
    if DEVICE == "cuda":
        assert torch.equal(s.cpu(), stored.cpu())
    else:  # Triton's interpreter rounds fp32 -> bf16 differently from torch: one ulp apart
        ulp = {torch.float32: 0.0, torch.float16: 0.0, torch.bfloat16: 2.0**-7}[dtype]
        np.testing.assert_allclose(f64(s), f64(stored), rtol=ulp, atol=0)
    check(y, rms_reference(f64(stored), w), dtype)


@settings(max_examples=20, deadline=None)
@given(shapes, configs)
def test_layer_norm_with_a_large_mean(case, config):
    rows, cols, dtype_name, pitch, _, seed = case
    dtype = DTYPES[dtype_name]
    x = make(rows, cols, dtype, pitch, seed, offset=50.0)  # one-pass E[x^2]-mean^2 would cancel
    w, b = make(1, cols, dtype, 0, seed + 1)[0], make(1, cols, dtype, 0, seed + 2)[0]
    xr = f64(x)
    centred = xr - xr.mean(-1, keepdims=True)
    expected = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5) * f64(w) + f64(b)
    check(norms.layer_norm(x, w, b, 1e-5, config), expected, dtype)


def test_zero_tokens():
    x = torch.empty(2, 0, 768, device=DEVICE)
    assert norms.rms_norm(x).shape == x.shape and norms.crms_norm(x).shape == x.shape
    assert [t.shape for t in norms.add_rms_norm(x, x)] == [x.shape, x.shape]


def test_leading_dims_and_shapes_preserved():
    x = make(6, 767, torch.float16, 0, 0).reshape(2, 3, 767)
    assert norms.rms_norm(x).shape == (2, 3, 767) and norms.rms_norm(x).dtype == torch.float16
    s, y = norms.add_rms_norm(x, x)
    assert s.shape == y.shape == x.shape


def test_strided_weight_and_fp32_weight_with_fp16_rows():
    x = make(3, 64, torch.float16, 0, 3)
    w_strided = make(1, 128, torch.float32, 0, 4)[0, ::2]  # stride 2
    check(norms.rms_norm(x, w_strided), rms_reference(f64(x), w_strided), torch.float16)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: norms.rms_norm(x, torch.ones(63)),
        lambda x: norms.crms_norm(x, torch.ones(1, 64)),
        lambda x: norms.add_rms_norm(x, x[:2]),
        lambda x: norms.layer_norm(x, torch.ones(64), torch.ones(65)),
    ],
)
def test_mismatched_vectors_are_refused_before_launch(call):
    with pytest.raises(ValueError, match="shape"):
        call(make(3, 64, torch.float32, 0, 5))


@pytest.mark.parametrize(
    "cols,block,warps",
    [(1, 16, 1), (767, 1024, 4), (4095, 4096, 8), (8192, 8192, 16), (16384, 8192, 16)],
)
def test_default_launch_config(cols, block, warps):
    assert norms.launch_config(cols) == (block, warps)


@pytest.mark.parametrize("cols", [1, 17, 767, 1024, 4095, 8192, 8193, 16384])
def test_candidates_are_valid_launches(cols):
    found = norms.candidates(cols)
    assert found[0] == norms.launch_config(cols) and len(set(found)) == len(found)
    for block, warps in found:
        assert block & (block - 1) == 0 and block <= norms.MAX_BLOCK and warps & (warps - 1) == 0
        assert warps == 1 or 32 * warps <= block  # no warp without an element
    assert found[0][0] >= min(
        cols, norms.MAX_BLOCK
    )  # the default keeps a row that fits in one pass


def test_every_candidate_computes_the_same_norm():
    x, w = make(3, 767, torch.float32, 3, 7), make(1, 767, torch.float32, 0, 8)[0]
    for config in norms.candidates(767):
        check(norms.rms_norm(x, w, 1e-6, config), rms_reference(f64(x), w), torch.float32)
