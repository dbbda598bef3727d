"""The error for a file that is there but is not what its name says (damaged, truncated, not JSON)."""

from __future__ import annotations

from ..errors import VlmtuneError


class DamagedFileError(VlmtuneError, ValueError):
    """A file exists but cannot be what it claims to be. Deliberately not a `CheckpointError`: callers that
    treat "no weights here" as a note (inspect of a config-only hub download) must still stop on this."""
