"""Reading the JSON files of model and adapter folders: one helper, so a damaged file is one line that
names it and says what to do, never a `JSONDecodeError` traceback from deep inside a verb."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import DamagedFileError

# The JSON configs a loader (transformers' AutoProcessor / from_pretrained, vlmtune) reads from a model or
# adapter folder besides config.json. Each must parse to an object; `check_loader_files` checks them up
# front so a verb stops before it writes anything or hands the folder to a loader that would traceback.
LOADER_JSON = (
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
)


def read_json(
    path: str | Path, fix: str = "restore it from the original folder or re-save it"
) -> dict[str, Any]:
    """The JSON object in `path`; `DamagedFileError` (one line: the file, what is wrong, `fix`) when it is
    unreadable, not JSON, or JSON that is not an object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DamagedFileError(f"{path} is not a text (UTF-8) file, so not JSON; {fix}.") from None
    except OSError as exc:
        raise DamagedFileError(f"{path} cannot be read ({exc.strerror or exc}).") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise DamagedFileError(f"{path} is not valid JSON ({str(exc).splitlines()[0]}); {fix}.") from None
    if not isinstance(value, dict):
        raise DamagedFileError(f"{path} holds a JSON {type(value).__name__}, not an object; {fix}.")
    return value


def check_loader_files(folder: str | Path) -> None:
    """Parse every loader JSON config present in `folder` (absent ones are fine)."""
    folder = Path(folder)
    for name in LOADER_JSON:
        if (folder / name).is_file():
            read_json(folder / name)
