"""A weight computed while it is written: a tensor whose value is a function of other weights
(a centred writer, normopt.rewriter.numerics.centred_rows; a rotated one), evaluated block by
block when the model is saved, so a rewrite never holds a whole modified copy of a multi-GB
model in memory. Anything that reads its value (`numpy()`) computes it whole, every time
(nothing is cached)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir

from normopt.rewriter import numerics

# below this, a result is computed at once (a lazy tensor saves nothing there)
STREAM_BYTES = 1 << 20


class StreamedTensor(ir.LazyTensor):
    """`whole()` computes the value; `rows()` yields it as consecutive blocks whose bytes, in
    order, are the value's (onnx-ir's save writes a tensor with `tofile`)."""

    __slots__ = ("_rows",)

    def __init__(
        self,
        whole: Callable[[], np.ndarray],
        rows: Callable[[], Iterator[np.ndarray]],
        dtype: np.dtype,
        shape: tuple[int, ...],
    ) -> None:
        super().__init__(
            lambda: ir.Tensor(whole()), dtype=ir.DataType.from_numpy(dtype), shape=ir.Shape(shape)
        )
        self._rows = rows

    def tofile(self, file) -> None:
        for block in self._rows():
            file.write(np.ascontiguousarray(block).data)


def centred(values: np.ndarray, axis: int, dtype) -> np.ndarray | StreamedTensor:
    """numerics.center(values, axis, dtype) computed now, or for a large array whose rows
    stream, a StreamedTensor computing it as it is saved."""
    dtype = np.dtype(dtype)
    size = int(np.prod(values.shape)) * dtype.itemsize
    if size < STREAM_BYTES or numerics.centred_rows(values, axis, dtype) is None:
        return numerics.center(values, axis, dtype)
    return StreamedTensor(
        lambda: numerics.center(values, axis, dtype),
        lambda: numerics.centred_rows(values, axis, dtype),
        dtype,
        tuple(values.shape),
    )


def rotated(
    source: Callable[[], np.ndarray], shape: tuple[int, ...], dtype, axis: int, q, scale=None
) -> np.ndarray | StreamedTensor:
    """numerics.rotate(source(), axis, q, scale) in `dtype`, computed now, or for a large array
    a StreamedTensor computing it as it is saved (`source` is read then: a memory-mapped weight,
    or a StreamedTensor's value, is never held whole before): by blocks of rows where the
    rotation runs along the last axis, whole (one weight at a time) where it runs along
    another."""
    dtype = np.dtype(dtype)
    whole = lambda: numerics.rotate(source(), axis, q, scale)  # noqa: E731
    if int(np.prod(shape)) * dtype.itemsize < STREAM_BYTES:
        return whole()
    if axis % len(shape) == len(shape) - 1:
        rows = lambda: numerics.rotated_rows(source(), q, scale)  # noqa: E731
    else:
        rows = lambda: iter([whole()])  # noqa: E731
    return StreamedTensor(whole, rows, dtype, tuple(shape))
