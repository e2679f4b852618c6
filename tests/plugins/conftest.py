"""Run the Triton kernels through Triton's interpreter when there is no CUDA GPU.

TRITON_INTERPRET must be set before triton is imported, so this runs at collection time."""

import os

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:
    HAS_CUDA = False
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
except ImportError:
    triton = None


def pytest_collection_modifyitems(config, items):
    if triton is None:
        skip = pytest.mark.skip(reason="triton is not installed (pip install 'normopt[test]')")
        for item in items:
            if "tests/plugins" in str(item.fspath):
                item.add_marker(skip)
