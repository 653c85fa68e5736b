"""Errors a user can fix: bad usage, config or data. The command line prints them as one line."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A problem with the user's input, found before anything is fitted (exit code 2).

    The message names the config field or file, what was expected and what was found.
    """
