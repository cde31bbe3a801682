"""sparcode: candidate matching experiments (SparCode vs two-tower + Faiss), end to end."""

from sparcode_cli import cpu_kernels

# before anything imports torch: the same kernels on every AVX2-capable CPU (cpu_kernels.py)
cpu_kernels.pin()

__version__ = "0.1.0"
