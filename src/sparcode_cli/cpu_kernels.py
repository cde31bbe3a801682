"""One family of CPU kernels on every x86-64 host with AVX2 and FMA, so a run's numbers do not depend on
the CPU class it ran on.

torch picks its vectorised kernels (ATen) and MKL its BLAS code path from the host's instruction set, and the
paths sum floats in different orders. The two-tower shrugs that off at 4 digits; SparCode's training does not
(the per-row cut is a top-k, so a last-bit difference can move an item across it and the run's trajectory
with it): on movielens-100k seed 0, switching only MKL's path or only ATen's changed validation Recall@20
after one epoch from 0.2214 to 0.2204 / 0.2200, and `make reproduce`'s SparCode row moved by 0.0016 Recall@50
between an AVX-512 and an AVX2 host (README, Results). numba's kernels need no pin: their values do not
depend on the vector width, only on FMA, which every AVX2 host has (tests/test_cpu_kernels.py).

So when it is imported, before torch computes anything (`sparcode_cli/__init__.py`), the package sets ATEN_CPU_CAPABILITY=avx2 (ATen's AVX2
kernels: the same code on every AVX2 CPU, Intel or AMD), MKL_CBWR=COMPATIBLE (MKL's conditional numerical
reproducibility on its one branch that every x86 vendor runs alike; MKL_CBWR=AVX2 holds only across Intel
CPUs, and MKL runs another branch on AMD, whose results moved here) and ONEDNN_MAX_CPU_ISA=AVX2. The price
is MKL's SSE2 GEMM, about half the AVX2 one's GFLOP/s: on movielens-100k (1 thread) the two-tower's 1,000
steps took 26 s instead of 19, SparCode's 400 61 s instead of 53. Faiss has its own BLAS and is not
affected. A value the user set is kept (MKL_CBWR=AUTO gives the speed back and the CPU dependence with it),
and a host without AVX2 and FMA is left alone (ATen's avx2 kernels would not run there).
`kernel_family()` says what a process runs with; every run's meta.json and reproduce's results header
record it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, MutableMapping

PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"}
_NEEDED = frozenset({"avx2", "fma"})


def host_features() -> frozenset[str]:
    """The host CPU's features as LLVM names them (avx2, fma, avx512f, ...), those it has."""
    import llvmlite.binding as ll

    return frozenset(name for name, on in ll.get_host_cpu_features().items() if on)


def pins_for(features: Iterable[str], env: MutableMapping[str, str]) -> dict[str, str]:
    """The variables to set on a host with `features` given the environment `env`: PINS where the host has
    AVX2 and FMA, less any variable `env` already has."""
    if not set(features) >= _NEEDED:
        return {}
    return {k: v for k, v in PINS.items() if k not in env}


def pin(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the pins in `env` (os.environ by default); returns what was set. ATen and MKL read them at their
    first operation, not when torch is imported: a script may import torch first, as long as it imports
    sparcode_cli before it computes anything (measured: ATen's capability and MKL's GEMM rate follow
    variables set after `import torch`)."""
    env = os.environ if env is None else env
    try:
        features = host_features()
    except Exception:  # noqa: BLE001  # an unknown host keeps the libraries' own choice
        return {}
    new = pins_for(features, env)
    env.update(new)
    return new


def kernel_family() -> dict[str, str]:
    """What this process computes with: torch's ATen capability, the pins' variables as set, and whether the
    host has AVX-512 (recorded in every run's meta.json and in reproduce's results header)."""
    import torch

    out = {"aten": torch.backends.cpu.get_cpu_capability()}
    out.update({k: os.environ.get(k, "unset") for k in PINS if k != "ATEN_CPU_CAPABILITY"})
    try:
        out["host_avx512"] = "yes" if "avx512f" in host_features() else "no"
    except Exception:  # noqa: BLE001
        out["host_avx512"] = "unknown"
    return out
