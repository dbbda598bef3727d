"""File formats vlmtune reads: safetensors (one validated reader), pickled legacy tensor files, JSON
configs, and the one dtype table. Imports neither torch nor transformers (torch only for pickled files)."""

from __future__ import annotations

from .errors import DamagedFileError
from .jsonfile import check_loader_files, read_json
from .pickled import read_tensors
from .safetensors import TensorRecord, read_file, read_header

__all__ = [
    "DamagedFileError",
    "TensorRecord",
    "check_loader_files",
    "read_file",
    "read_header",
    "read_json",
    "read_tensors",
]
