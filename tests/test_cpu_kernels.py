"""The CPU kernel pin (cpu_kernels.py): which variables are set where, that a fresh process runs with them, and
that numba's kernels need no pin (their values do not depend on the vector width)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparcode_cli import cpu_kernels
from sparcode_cli.cpu_kernels import PINS, pins_for

REPO = Path(__file__).resolve().parent.parent


def test_pins_on_an_avx2_host_and_not_below() -> None:
    assert pins_for({"avx2", "fma", "avx512f"}, {}) == PINS
    assert pins_for({"avx2", "fma"}, {}) == PINS
    assert pins_for({"avx", "fma"}, {}) == {}  # no AVX2: ATen's avx2 kernels would not run here
    assert pins_for({"avx2"}, {}) == {}  # no FMA
    assert pins_for({"neon"}, {}) == {}


def test_a_users_value_is_kept() -> None:
    env = {"MKL_CBWR": "AUTO"}
    assert pins_for({"avx2", "fma"}, env) == {k: v for k, v in PINS.items() if k != "MKL_CBWR"}
    assert env == {"MKL_CBWR": "AUTO"}  # pins_for only says what to set


def _fresh(code: str, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("torch_first", [False, True], ids=["package-first", "torch-first"])
def test_a_fresh_process_runs_with_the_pins(torch_first: bool) -> None:
    """Also when the script imports torch before the package (the experiment scripts do): ATen and MKL
    read the variables at their first operation."""
    env = {k: v for k, v in os.environ.items() if k not in PINS}
    code = (
        ("import torch\n" if torch_first else "") + "import sparcode_cli, json\n"
        "from sparcode_cli.cpu_kernels import kernel_family\n"
        "print(json.dumps(kernel_family()))"
    )
    family = json.loads(_fresh(code, env))
    if {"avx2", "fma"} <= cpu_kernels.host_features():
        assert family["aten"] == "AVX2"
        assert family["MKL_CBWR"] == PINS["MKL_CBWR"]
        assert family["ONEDNN_MAX_CPU_ISA"] == PINS["ONEDNN_MAX_CPU_ISA"]
    else:
        assert family["MKL_CBWR"] == "unset"
    assert family["host_avx512"] in {"yes", "no"}


TABLE = """
import hashlib, numba, numpy as np, torch
from sparcode_cli.models import fused_table as ft
torch.set_grad_enabled(False)
r = np.random.default_rng(0)
f = lambda *s: torch.from_numpy(r.standard_normal(s).astype(np.float32))
a, b, w, z, t = f(40, 32), f(1001, 2, 32), f(32), f(40, 64), f(1001, 64)
cut = ft.split_mlp_table_cut(a, b, w, z, t, 0.1, 0.05, 0.0, 1e-6)
g = f(24, 3001) * 3 + 1
ft.row_cut(g, 0.05, 0.25, 1e-6)
@numba.njit(fastmath=True)
def reassociated_sum(x):  # the control: vectorised at the width LLVM prefers
    s = np.float32(0.0)
    for v in x:
        s += v
    return s
reassociated_sum(np.ones(64, np.float32))
asm = next(iter(reassociated_sum.inspect_asm().values()))
print(hashlib.sha256(cut.numpy().tobytes() + g.numpy().tobytes()).hexdigest(), asm.count("ymm"))
"""


@pytest.mark.skipif(
    not {"avx2", "fma"} <= cpu_kernels.host_features(), reason="needs a host with AVX2 and FMA"
)
def test_numba_kernels_do_not_depend_on_the_vector_width(tmp_path: Path) -> None:
    """The fused table and the row cut give the same bits when LLVM vectorises them at 128 bits as at the
    host's width: an AVX-512 host (512 bits) and an AVX2 one (256) agree, so numba is not pinned."""
    import llvmlite.binding as ll

    features = ll.get_host_cpu_features().flatten()
    base = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}
    host = _fresh(TABLE, {**base, "NUMBA_CACHE_DIR": str(tmp_path / "host")})
    narrow = _fresh(
        TABLE,
        {
            **base,
            "NUMBA_CACHE_DIR": str(tmp_path / "narrow"),
            "NUMBA_CPU_FEATURES": f"{features},+prefer-128-bit",
        },
    )
    (host_kernels, host_control), (narrow_kernels, narrow_control) = host.split(), narrow.split()
    assert int(narrow_control) < int(host_control)  # fewer 256-bit registers: the setting took effect
    assert host_kernels == narrow_kernels
