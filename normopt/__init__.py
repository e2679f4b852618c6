"""normopt: exact norm rewrites for ONNX graphs.

The Python API (normopt/api.py), model in and model out; a model is a path, an
`onnx.ModelProto` or an `onnx_ir.Model`:

    rewritten, report = normopt.rewrite(model)       # verified; same kind back, report.to_json()
    report = normopt.verify(model_a, model_b)        # report.ok, report.outputs
    info = normopt.inspect(model)                    # norms, architecture, which passes apply

The submodules `normopt/rewrite.py`, `verify.py` and `inspect.py` share these names: here the
names are the functions, always (the package keeps them when a submodule is imported); import
from the submodules themselves with `from normopt.rewrite import RewriteReport`.
"""

import sys
import types

from normopt.api import inspect, rewrite, verify

__version__ = "0.1.0"
__all__ = ["inspect", "rewrite", "verify", "__version__"]


class _Package(types.ModuleType):
    """Python sets a package attribute to each submodule it imports: normopt.rewrite would turn
    from the API function into the module `normopt/rewrite.py` once anything imported it."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("inspect", "rewrite", "verify") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
