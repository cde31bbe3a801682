"""User-facing errors: one clear message, exit code 2, no traceback unless --debug."""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix. The message names the thing and says what to do."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"
