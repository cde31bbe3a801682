"""The torch device a command computes on: "auto" (CUDA when present, else CPU), "cpu", "mps", "cuda", "cuda:N".

Training (`train.device`), the index build and exact scoring (`--device`) resolve it here; artifacts and
checkpoints are always written from CPU tensors, so a file never depends on where it was computed.
"""

from __future__ import annotations

import torch

from sparcode_cli import distributed as dd
from sparcode_cli.errors import UserError


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """`name` as a torch.device; `option` names the setting in the error. Under torchrun "cuda" is the
    rank's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{option} = {name!r} but CUDA is not available", hint='use "auto" or "cpu"')
    if name == "cuda" and dd.is_distributed():
        return torch.device("cuda", dd.local_rank())
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"{option} = {name!r} is not a device", hint='use "auto", "cpu" or "cuda"') from None
    if dev.type == "cuda":  # explicit index, so manifests and logs name the GPU
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise UserError(
                f"{option} = {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)",
                hint=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}, or auto",
            )
        dev = torch.device("cuda", index)
    return dev


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's parameters (else buffers) live; CPU for one with neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
