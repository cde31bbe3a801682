"""Run the `sparcode` console entry point in-process and return its exit code."""

from __future__ import annotations

import pytest


def exit_code(args: list[str]) -> int:
    from sparcode_cli.commands.app import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0)
