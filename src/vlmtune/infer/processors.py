"""The processors requests are rendered and encoded with: the base's, and an adapter folder's own where
it brings one (training-time image limits, chat template). Equal processors share one key, so their
rows can share batches."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

from ..adapters.layout import AdapterError
from ..io import read_json
from .types import InferenceError

# Files of an adapter folder that carry a processor, a tokenizer or a chat template of its own.
PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
BASE_KEY = "base"


class Processors:
    """Processors by key: `"base"` for the base's, a signature for each other distinct one."""

    def __init__(self, base_processor: Any, embedding_rows: int) -> None:
        self.embedding_rows = embedding_rows
        self._processors: dict[str, Any] = {}
        self._signatures: dict[str, str] = {}
        self.register(base_processor, BASE_KEY)

    def __getitem__(self, key: str) -> Any:
        return self._processors[key]

    def register(self, processor: Any, key: str | None = None) -> str:
        """Store a processor under its signature (or `key`) and return the key it is found under."""
        if getattr(processor, "chat_template", None) is None:
            raise InferenceError(
                "the processor has no chat template (chat_template.jinja); add one to the base or adapter folder."
            )
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"
        if len(tokenizer) > self.embedding_rows:
            raise InferenceError(
                f"the tokenizer has {len(tokenizer)} tokens but the base's embedding table has "
                f"{self.embedding_rows} rows; the tokenizer comes from another model."
            )
        signature = processor_signature(processor)
        for existing_key, existing in self._signatures.items():
            if existing == signature:
                return existing_key
        key = key or signature
        self._processors[key] = processor
        self._signatures[key] = signature
        return key

    def for_folder(self, path: Path) -> str:
        """The key of an adapter folder's processor: its own when the folder has one, else the base's with
        the folder's chat template when it has only that, else the base's."""
        from transformers import AutoProcessor

        if any((path / name).is_file() for name in PROCESSOR_CONFIGS):
            try:
                processor = AutoProcessor.from_pretrained(path)
            except Exception as exc:  # transformers raises many kinds for an incomplete folder
                raise AdapterError(
                    f"{path} has a processor config but its processor cannot be loaded ({type(exc).__name__}: "
                    f"{exc}); copy the tokenizer files beside it, or remove the processor config to use the base's."
                ) from exc
            return self.register(processor)
        template = next((path / name for name in TEMPLATE_FILES if (path / name).is_file()), None)
        if template is None:
            return BASE_KEY
        processor = copy.deepcopy(self._processors[BASE_KEY])
        is_json = template.suffix == ".json"
        processor.chat_template = (
            read_json(template).get("chat_template") if is_json else template.read_text()
        )
        return self.register(processor)

    def keep_only(self, keys: set[str]) -> None:
        """Forget the processors no loaded adapter uses any more (the base's stays)."""
        for key in [k for k in self._processors if k != BASE_KEY and k not in keys]:
            del self._processors[key], self._signatures[key]


def processor_signature(processor: Any) -> str:
    """Equal signatures mean equal model inputs: image/video settings, chat template and vocabulary."""
    h = hashlib.sha256()
    h.update(processor.to_json_string().encode())
    h.update(str(processor.chat_template).encode())
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        backend.to_str().encode()
        if backend is not None
        else repr(sorted(tokenizer.get_vocab().items())).encode()
    )
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()[:16]
