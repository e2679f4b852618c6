"""Loading TensorRT lazily, and what the loaded version can do (docs/tensorrt_plugins.md)."""

from __future__ import annotations

from dataclasses import dataclass

from normopt.errors import BadInput
from normopt.plugins.spec import OLDEST, parse_version

INSTALL = (
    "pip install 'normopt[tensorrt]' (NVIDIA's TensorRT wheels, from NVIDIA's index; "
    "not installable in every environment)"
)


@dataclass(frozen=True)
class Caps:
    version: tuple[int, int]
    strongly_typed_flag: bool  # 10.x: ask for a strongly typed network; 11 is always strongly typed
    numpy_attr_bug: (
        bool  # <= 11.1 converts plugin scalar fields with float(1-element array): NumPy < 2.4
    )

    @classmethod
    def of(cls, version: tuple[int, int]) -> Caps:
        return cls(version, version[0] < 11, version < (11, 2))


def load_tensorrt(what: str):
    """`import tensorrt`, or BadInput (exit 2, one line) saying `what` needs it."""
    try:
        import tensorrt
    except ImportError:
        raise BadInput(f"{what} needs TensorRT, which is not installed: {INSTALL}") from None
    try:
        version = parse_version(tensorrt.__version__)
    except ValueError:
        raise BadInput(
            f"{what} needs TensorRT >= {OLDEST[0]}.{OLDEST[1]} (ahead-of-time Python plugins); "
            f"this is {tensorrt.__version__}"
        ) from None
    caps = Caps.of(version)
    if caps.numpy_attr_bug:
        import numpy

        if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4):
            raise BadInput(
                f"TensorRT {tensorrt.__version__} cannot read plugin attributes with NumPy "
                f"{numpy.__version__} (fixed in TensorRT 11.2): pip install 'numpy<2.4'"
            )
    return tensorrt, caps
