"""Training data: formats -> `Sample`, row checks, image loading, and collation with assistant-only labels.

`formats` and `check` import no torch (the collator does, lazily), so `vlmtune data check` stays light.
"""

from __future__ import annotations

from .check import DataReport, InvalidDataError, check_data
from .formats import DataError, RowError, Sample, read_rows, to_messages

__all__ = [
    "DataError",
    "DataReport",
    "InvalidDataError",
    "RowError",
    "Sample",
    "check_data",
    "read_rows",
    "to_messages",
]
