"""The folding formulas against direct float64 computation (torch as the reference conv)."""

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normopt.rewriter import numerics as am

rng = np.random.default_rng(0)


def test_batchnorm_affine_and_repbn():
    g, b, m, v = rng.standard_normal((4, 6))
    v = np.abs(v) + 0.5
    x = rng.standard_normal((3, 6))
    a, c = am.batchnorm_affine(g, b, m, v, 1e-5, alpha=0.3)
    np.testing.assert_allclose(a * x + c, (x - m) / np.sqrt(v + 1e-5) * g + b + 0.3 * x, rtol=1e-12)


def test_chain_affine():
    x = rng.standard_normal((3, 5))
    k1, k2, k3, k4 = rng.standard_normal((4, 5)) + 2
    a, c = am.chain_affine(
        [("Div", k1), ("Mul", k2), ("Add", k3), ("Sub", k4), ("Mul", np.float64(0.5))], 5
    )
    np.testing.assert_allclose(a * x + c, ((x / k1 * k2 + k3) - k4) * 0.5, rtol=1e-12)
    with pytest.raises(ValueError):
        am.chain_affine([("Pow", k1)], 5)


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_into_conv_output(groups):
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    w, b = rng.standard_normal((6, 6 // groups, 3, 3)), rng.standard_normal(6)
    a, c = rng.standard_normal(6), rng.standard_normal(6)
    ref = F.conv2d(x, torch.tensor(w), torch.tensor(b), padding=1, stride=2, groups=groups).numpy()
    w2, b2 = am.into_conv_output(w, b, a, c)
    got = F.conv2d(
        x, torch.tensor(w2), torch.tensor(b2), padding=1, stride=2, groups=groups
    ).numpy()
    np.testing.assert_allclose(
        got, a[:, None, None] * ref + c[:, None, None], rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("groups", [1, 2])
def test_into_conv_transpose_output(groups):
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    w, b = rng.standard_normal((4, 6 // groups, 3, 3)), rng.standard_normal(6)
    a, c = rng.standard_normal(6), rng.standard_normal(6)
    ref = F.conv_transpose2d(x, torch.tensor(w), torch.tensor(b), stride=2, groups=groups).numpy()
    w2, b2 = am.into_conv_transpose_output(w, b, a, c, groups)
    got = F.conv_transpose2d(x, torch.tensor(w2), torch.tensor(b2), stride=2, groups=groups).numpy()
    np.testing.assert_allclose(
        got, a[:, None, None] * ref + c[:, None, None], rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("groups", [1, 3, 6])
def test_into_conv_input_exact_without_padding(groups):
    x = rng.standard_normal((2, 6, 7, 7))
    w, b = rng.standard_normal((6, 6 // groups, 3, 3)), rng.standard_normal(6)
    a, c = rng.standard_normal(6), rng.standard_normal(6)
    y = a[:, None, None] * x + c[:, None, None]
    ref = F.conv2d(torch.tensor(y), torch.tensor(w), torch.tensor(b), groups=groups).numpy()
    w2, b2 = am.into_conv_input(w, b, a, c, groups)
    got = F.conv2d(torch.tensor(x), torch.tensor(w2), torch.tensor(b2), groups=groups).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    # with zero padding the border is wrong unless c == 0: the reason for the precondition
    padded_ref = F.conv2d(
        torch.tensor(y), torch.tensor(w), torch.tensor(b), padding=1, groups=groups
    ).numpy()
    padded = F.conv2d(
        torch.tensor(x), torch.tensor(w2), torch.tensor(b2), padding=1, groups=groups
    ).numpy()
    assert not np.allclose(padded, padded_ref)
    np.testing.assert_allclose(
        padded[..., 1:-1, 1:-1], padded_ref[..., 1:-1, 1:-1], rtol=1e-10, atol=1e-10
    )


def test_matmul_both_sides():
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((5, 4)), rng.standard_normal(4)
    a, c = rng.standard_normal(4), rng.standard_normal(4)
    w2, b2 = am.into_matmul_output(w, b, a, c)
    np.testing.assert_allclose(x @ w2 + b2, a * (x @ w + b) + c, rtol=1e-12)
    a, c = rng.standard_normal(5), rng.standard_normal(5)
    w2, b2 = am.into_matmul_input(w, b, a, c)
    np.testing.assert_allclose(x @ w2 + b2, (a * x + c) @ w + b, rtol=1e-12)


@pytest.mark.parametrize(
    "shape,axis", [((50, 7), -1), ((50, 7), 0), ((3, 4, 5, 6), 0), ((3, 4, 5, 6), -1), ((9,), -1)]
)
def test_center_in_blocks_equals_the_whole_computation(shape, axis):
    """Large tables are centred a block at a time (bounded memory, blocks in threads): the same
    numbers as at once; the rows streamed to a file are the result's bytes."""
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    whole = a.astype(np.float64) - a.astype(np.float64).mean(axis=axis, keepdims=True)
    at_once = am.center(a, axis, np.float32, block_bytes=1 << 26)
    for block_bytes in (8, 1 << 26):
        assert np.array_equal(am.center(a, axis, block_bytes=block_bytes), whole)
        assert np.array_equal(am.center(a, axis, np.float32, block_bytes=block_bytes), at_once)
        rows = am.centred_rows(a, axis, np.float32, block_bytes=block_bytes)
        if len(shape) > 1 and axis == 0:
            assert rows is None  # blocks of columns are not contiguous
        else:
            assert b"".join(r.tobytes() for r in rows) == at_once.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("axis", [-1, 0])
def test_center_in_float32_is_within_its_error_bound_of_the_float64_result(dtype, axis):
    """A 16/32-bit result is computed in float32 with float64 means (no float64 copy of the
    tensor): within one float32 ulp of max(|mean|, |x - mean|) of the float64 result, and for
    a 16-bit dtype one of its own ulps more (its rounding)."""
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((256, 96)) * 0.05 + 0.3).astype(dtype)  # an offset: a large mean
    wide = a.astype(np.float64)
    mean = wide.mean(axis=axis, keepdims=True)
    exact = wide - mean
    got = am.center(a, axis, dtype, block_bytes=1 << 12).astype(np.float64)
    assert got.dtype == np.float64 and np.any(got != exact)  # not the float64 path
    bound = np.spacing(np.maximum(np.abs(mean), np.abs(exact)).astype(np.float32))
    if dtype != np.float32:
        bound = bound + _ulp(dtype, exact)
    assert np.all(np.abs(got - exact) <= bound)


def _ulp(dtype, values):
    """One ulp of `dtype` at each value's magnitude (float64)."""
    info = ml_dtypes.finfo(dtype) if dtype == ml_dtypes.bfloat16 else np.finfo(dtype)
    magnitude = np.maximum(np.abs(values), float(info.smallest_normal))
    return 2.0 ** (np.floor(np.log2(magnitude)) - info.nmant)


def test_a_shift_alone_leaves_the_weight_and_moves_the_bias_exactly():
    """A LayerNorm's beta folded into the MatMul reading it: W stays (no copy), b' = b + beta W
    (computed in float64 a block of rows at a time)."""
    w = rng.standard_normal((300, 7)).astype(np.float32)
    b, c = rng.standard_normal(7), rng.standard_normal(300)
    w2, b2 = am.into_matmul_input(w, b, np.ones(300), c)
    assert w2 is w or np.shares_memory(w2, w)
    np.testing.assert_allclose(b2, b + c @ w.astype(np.float64), rtol=1e-13)
    np.testing.assert_allclose(
        am._dot64(c, w, block_bytes=64), c @ w.astype(np.float64), rtol=1e-13
    )


def test_diffused_rounding_keeps_float16_rows_summing_to_zero():
    """A float16 row already near zero-mean, centred by a shift below half its ulp: rounding each
    entry alone gives the old row back (its sum stays); diffused rounding carries the shift into
    the sum: every row sums to 0 within one ulp of its largest entry, and no entry moves further."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 768)) * 0.02).astype(np.float16)
    centred = w.astype(np.float64) - w.astype(np.float64).mean(-1, keepdims=True)
    plain = centred.astype(np.float16).astype(np.float64)
    diffused = am.center(w, -1, np.float16, block_bytes=1 << 12, diffuse=True).astype(np.float64)
    ulp = np.spacing(np.abs(centred).max(-1).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(diffused.sum(-1)) <= ulp)
    assert np.mean(np.abs(plain.sum(-1)) > ulp) > 0.5  # what the entry-by-entry rounding leaves
    assert np.all(np.abs(diffused - centred) <= ulp[:, None])


@pytest.mark.parametrize("d", [1, 2, 7, 12, 30, 48, 64, 96, 768, 1600, 2560])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotations_are_orthogonal_and_applied_as_their_matrix(d, kind):
    """Q Q^T = I for every width (a Paley factor where d has one: 768 = 12 x 64, 1600 = 200 x 8,
    2560 = 20 x 128; a random orthogonal factor of d's odd part otherwise: 7, 30); `rotate`
    along either axis is the product with Q (or Q^T), computed in float64."""
    from normopt.rewriter.numerics import Rotation, rotate

    q = Rotation(d, kind, seed=5)
    m = q.matrix()
    np.testing.assert_allclose(m @ m.T, np.eye(d), atol=1e-12)
    w = np.random.default_rng(0).standard_normal((3, d))
    np.testing.assert_allclose(rotate(w, -1, q), w @ m, atol=1e-12)
    np.testing.assert_allclose(rotate(w.T, 0, q), m.T @ w.T, atol=1e-12)
    if kind == "hadamard" and d in (
        12,
        48,
        64,
        768,
        2560,
    ):  # a true Hadamard matrix: |Q| = 1/sqrt(d)
        np.testing.assert_allclose(np.abs(m), 1 / np.sqrt(d), rtol=1e-12)


def test_a_rotation_spreads_one_channel_over_all():
    from normopt.rewriter.numerics import Rotation, rotate

    x = np.zeros((1, 768))
    x[0, 5] = 40.0
    y = rotate(x, -1, Rotation(768))
    np.testing.assert_allclose(np.abs(y), 40 / np.sqrt(768), rtol=1e-12)


def test_a_float16_weight_is_rotated_in_float64_and_rounded_once():
    from normopt.rewriter.numerics import Rotation, rotate

    q = Rotation(96, "hadamard", seed=1)
    w = np.random.default_rng(2).standard_normal((40, 96)).astype(np.float16)
    g = np.linspace(0.5, 3, 96)
    got = rotate(w.T, 0, q, scale=g)
    assert got.dtype == np.float16
    want = (q.matrix().T @ (g[:, None] * w.T.astype(np.float64))).astype(np.float16)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("q", [3, 7, 11, 19, 23, 43, 59, 199])
def test_paley_matrices_are_hadamard(q):
    from normopt.rewriter.numerics import _paley

    h = _paley(q)
    assert set(np.unique(h)) == {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, (q + 1) * np.eye(q + 1))
