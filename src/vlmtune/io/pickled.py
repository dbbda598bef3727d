"""Legacy pickled tensor files (`adapter_model.bin`, LLaVA's `non_lora_trainables.bin`), read as the same
`TensorRecord`s as safetensors files. Imports torch, and only when such a file is met."""

from __future__ import annotations

from pathlib import Path

from . import dtypes
from .errors import DamagedFileError
from .safetensors import TensorRecord, read_file


def read_pickled(file: str | Path) -> dict[str, TensorRecord]:
    """A pickled state dict, loaded with `weights_only=True` (no code runs from the file)."""
    import torch

    file = Path(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged or hostile file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DamagedFileError(
            f"{file} could not be read as a plain tensor dict with weights_only=True ({first}); "
            "vlmtune never unpickles arbitrary objects. Re-save it as safetensors."
        ) from None
    if not isinstance(state, dict):
        raise DamagedFileError(f"{file} does not hold a dict of tensors.")
    out = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise DamagedFileError(f"{file}: entry {key!r} is a {type(t).__name__}, not a tensor.")
        dtype = dtypes.from_torch(t.dtype)
        if dtype is None:
            raise DamagedFileError(f"{file}: tensor {key!r} has unsupported dtype {t.dtype}.")
        blob = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[key] = TensorRecord(str(key), dtype, tuple(t.shape), file, 0, len(blob), blob=blob)
    return out


def read_tensors(file: str | Path) -> dict[str, TensorRecord]:
    """The tensors of a `.bin` (pickled) or safetensors file."""
    file = Path(file)
    return read_pickled(file) if file.suffix == ".bin" else read_file(file)
