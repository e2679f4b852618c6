"""normopt: exact norm rewrites for ONNX graphs."""

__version__ = "0.1.0"
