"""sparcode: candidate matching experiments (SparCode vs two-tower + Faiss), end to end."""

__version__ = "0.1.0"
