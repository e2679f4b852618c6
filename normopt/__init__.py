"""normopt: exact norm rewrites for ONNX graphs.

The Python API (normopt/api.py), model in and model out; a model is a path, an
`onnx.ModelProto` or an `onnx_ir.Model`:

    rewritten, report = normopt.rewrite(model)       # verified; same kind back, report.to_json()
    report = normopt.verify(model_a, model_b)        # report.ok, report.outputs
    info = normopt.inspect(model)                    # norms, architecture, which passes apply
    normopt.recalibrate(model, out, data)            # BatchNorm statistics from calibration data
    normopt.profile([a, b])                          # side by side timing
    normopt.build(model, engine)                     # a TensorRT engine (needs TensorRT)
    normopt.list_passes()                            # the passes and the default pipeline

No submodule shares a name with these functions, so `normopt.rewrite` is always the function.
"""

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "build",
    "inspect",
    "list_passes",
    "profile",
    "recalibrate",
    "rewrite",
    "verify",
]


def __getattr__(name: str):
    """The API functions, imported on first use (the command line installs its signal
    handlers before it pays for onnx, onnxruntime and numpy)."""
    if name in __all__ and name != "__version__":
        from normopt import api

        return getattr(api, name)
    raise AttributeError(f"module 'normopt' has no attribute {name!r}")
