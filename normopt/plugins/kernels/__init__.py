"""Norm kernels in Triton, with thin torch launchers (see norms.py)."""
