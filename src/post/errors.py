"""The one exception type the user sees.

Every problem the user can fix (a bad option, a missing file, a checksum mismatch, a hub id
while offline) is raised as :class:`PostError` with a one-line message that says what is wrong
and what to do. The CLI prints it without a traceback and exits with status 2.
"""

from __future__ import annotations


class PostError(Exception):
    """A user-facing error whose message is a single line: what is wrong, and what to do."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class ConfigError(PostError, ValueError):
    """An option value or combination of options that can never work."""
