"""Typer commands, one module each. Each is thin: parse options, call the library, print with rich."""

from __future__ import annotations

import importlib
from collections.abc import Callable

# (module, function, command name). A command module that does not exist yet is simply not registered.
COMMANDS = [
    ("datasets", "datasets", "datasets"),
    ("download", "download", "download"),
    ("preprocess", "preprocess", "preprocess"),
    ("train", "train", "train"),
    ("index", "index", "index"),
    ("eval", "eval_", "eval"),
]


def registered() -> list[tuple[Callable[..., object], str]]:
    out = []
    for module, func, name in COMMANDS:
        try:
            mod = importlib.import_module(f"sparcode_cli.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"sparcode_cli.commands.{module}":
                continue
            raise
        out.append((getattr(mod, func), name))
    return out
