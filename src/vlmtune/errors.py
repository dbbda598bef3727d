"""The one exception type the command line turns into a one-line message (no traceback)."""

from __future__ import annotations


class VlmtuneError(Exception):
    """A problem the user can fix; its message says what and how."""
