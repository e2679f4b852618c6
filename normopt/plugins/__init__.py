"""TensorRT norm plugins: Triton kernels (kernels/) and, later, their tensorrt.plugin registration.

Everything here imports triton and torch lazily: they are optional (the `test` extra has them)."""
