"""The adapters attached to one base through PEFT: add, remove, look up, activate.

This registry is the one record of what is loaded (name -> `LoadedAdapter`, kept in step with PEFT's own
`peft_config` on every add and remove); which adapter is active is asked of PEFT, never mirrored. Inside
PEFT each adapter is called `peft_name(name)`.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import families
from ..adapters.peft_bridge import load_weights, lora_config
from ..adapters.reader import Adapter, base_params_from_model, read_adapter
from . import adapter_checks
from .processors import BASE_KEY, Processors
from .specs import check_name
from .types import BASE, AdapterInfo, InferenceError, canonical_adapter

# PEFT warns (and may re-initialize weights on load) when an adapter name is a substring of its parameter
# prefix 'lora_', as 'a' or 'or' would be; a prefix of our own keeps every user name clear of it.
PEFT_PREFIX = "ad_"
# Top-level files of an adapter folder that can change its answers, besides the tensor files read:
# configs, manifest, processor and tokenizer files, chat templates (not trainer state such as optimizer.pt).
HASHED_SUFFIXES = (".json", ".jinja", ".txt", ".model")


def peft_name(name: str) -> str:
    """The name PEFT knows an adapter by (`__base__` stays as it is: PEFT's own name for the base)."""
    return name if name == BASE else PEFT_PREFIX + name


def content_sha256(folder: Path, tensor_files: list[Path]) -> str:
    """sha256 over the adapter's tensor files and its config/processor/template files (names, sizes and
    bytes, in name order): equal for copies of a folder, different when any of those files differs."""
    files = {p.name: p for p in tensor_files}
    files.update({p.name: p for p in folder.iterdir() if p.is_file() and p.suffix in HASHED_SUFFIXES})
    h = hashlib.sha256()
    for name in sorted(files):
        path = files[name]
        h.update(name.encode() + b"\0" + path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class LoadedAdapter:
    info: AdapterInfo
    adapter: Adapter
    modules: set[str]  # runtime module paths the adapter changes (LoRA and full)
    processor: str  # key of the processor its rows are rendered with
    # Its bare parameters (`Adapter.bare`): runtime name -> its value, on the base's device and dtype.
    bare: dict[str, Any] = field(default_factory=dict)


class AdapterRegistry:
    """Adapters attached un-merged to `base_model`; the model to run is `model` (the PeftModel once an
    adapter is attached, the base itself when none is)."""

    def __init__(
        self,
        base_model: Any,
        family: families.Family,
        processors: Processors,
        *,
        base: str,
        fingerprint: str,
    ) -> None:
        self.base_model = base_model
        self.family = family
        self.processors = processors
        self.base = base
        self.fingerprint = fingerprint
        self.base_config = base_model.config.to_dict()
        self.base_params = base_params_from_model(base_model)
        self.peft: Any = None
        self._loaded: dict[str, LoadedAdapter] = {}
        # Bare parameters (no module PEFT could wrap: LLaVA-NeXT's `model.image_newline`) are one tensor of
        # the shared base, so PEFT never loads them (it would overwrite the base for every adapter): each
        # adapter keeps its values, swapped in before its forwards (`use_bare`), the base's kept here.
        self._bare_base: dict[str, Any] = {}
        self._bare_owner = BASE  # whose bare values the model holds now

    @property
    def model(self) -> Any:
        return self.base_model if self.peft is None else self.peft

    def names(self) -> list[str]:
        return list(self._loaded)

    def infos(self) -> dict[str, AdapterInfo]:
        return {name: loaded.info for name, loaded in self._loaded.items()}

    def __getitem__(self, name: str) -> LoadedAdapter:
        return self._loaded[name]

    def resolve(self, name: str | None, default: str | None = None) -> str:
        """The canonical adapter name a request runs under, or an error naming the loaded ones."""
        name = canonical_adapter(name)
        if name is None:
            if default is not None:
                return default
            if not self._loaded:
                return BASE
            if len(self._loaded) == 1:
                return next(iter(self._loaded))
            raise InferenceError(
                f"several adapters are loaded ({', '.join(self._loaded)}); name the one to use "
                f"(or {BASE} for the base alone)."
            )
        if name != BASE and name not in self._loaded:
            loaded = ", ".join(self._loaded) or "none"
            raise InferenceError(
                f"no adapter called {name!r} is loaded (loaded: {loaded}; {BASE} runs the base)."
            )
        return name

    def require(self, names: Iterable[str]) -> None:
        """Fail in one sentence when a name (of rows prepared earlier) is no longer loaded."""
        gone = sorted({n for n in names if n != BASE and n not in self._loaded})
        if gone:
            raise InferenceError(f"adapter(s) {', '.join(gone)} were removed after these rows were prepared.")

    def require_unchanged(self, rows: Iterable[tuple[str, str | None]]) -> None:
        """Fail when an adapter of (name, content hash) pairs taken at prepare time was removed or replaced
        by another folder since, so prepared rows never run under other weights than they were rendered for."""
        stale = sorted(
            {n for n, sha in rows if n != BASE and (n not in self._loaded or self.sha256(n) != sha)}
        )
        if stale:
            raise InferenceError(
                f"adapter(s) {', '.join(stale)} were removed or replaced after these rows were prepared; "
                "prepare them again."
            )

    def sha256(self, name: str) -> str | None:
        """The loaded adapter's content hash (None for the base)."""
        return None if name == BASE else self._loaded[name].info.sha256

    def processor_key(self, name: str) -> str:
        return BASE_KEY if name == BASE else self._loaded[name].processor

    # -- add / remove -------------------------------------------------------------------------------------
    def add(self, name: str, path: str | Path) -> AdapterInfo:
        """Read, place and attach an adapter folder under `name`; fails before touching the model when
        any tensor cannot be placed, and leaves the model as it was when PEFT does not take it."""
        check_name(name)
        if name in self._loaded:
            raise InferenceError(f"an adapter called {name!r} is already loaded; choose another name.")
        path = Path(path)
        adapter = read_adapter(
            path,
            self.family,
            self.base_params,
            self.base_config,
            use="unmerged",
            base_fingerprint=self.fingerprint,
            base_values=lambda param: self.base_model.get_parameter(param).detach().float().cpu().numpy(),
        )
        sha256 = content_sha256(path, adapter.files)
        mixable, because = adapter_checks.mixability(adapter, self.family)
        config, dropped = lora_config(adapter)
        messages = list(adapter.warnings)  # what the adapter rules warn about for use 'unmerged'
        if dropped:
            messages.append(
                f"{path}: adapter_config.json keys unknown to this PEFT version were ignored: {', '.join(dropped)}."
            )
        try:
            processor_key = self.processors.for_folder(path)
            self._attach(peft_name(name), config, adapter)
        except BaseException:
            self._forget_unused_processors()
            raise
        info = AdapterInfo(
            name=name,
            path=path,
            format=adapter.format,
            layouts=sorted(adapter.layouts),
            lora_modules=len(adapter.lora),
            full_modules=adapter.full_modules,
            use_dora=adapter.use_dora,
            mixable=mixable,
            not_mixable_because=because,
            processor=BASE_KEY if processor_key == BASE_KEY else str(path),
            sha256=sha256,
            warnings=messages,
        )
        for message in messages:
            warnings.warn(message, stacklevel=3)
        self._loaded[name] = LoadedAdapter(
            info,
            adapter,
            set(adapter.lora) | set(adapter.full_modules),
            processor_key,
            self._bare_values(adapter),
        )
        return info

    def _bare_values(self, adapter: Adapter) -> dict[str, Any]:
        out = {}
        for name, record in adapter.bare.items():
            param = self.base_model.get_parameter(name)
            self._bare_base.setdefault(name, param.detach().clone())  # no adapter's value is in yet
            out[name] = record.torch().to(param.device, param.dtype)
        return out

    def use_bare(self, name: str) -> None:
        """Put the bare parameter values of `name` (a loaded adapter, or BASE) into the model: the adapter's
        own where it has them, the base's everywhere else. Called by `routing.route` before forwards."""
        owner = name if name != BASE and self._loaded[name].bare else BASE
        if owner == self._bare_owner:
            return
        import torch

        values = self._loaded[owner].bare if owner != BASE else {}
        with torch.no_grad():
            for param, base_value in self._bare_base.items():
                self.base_model.get_parameter(param).copy_(values.get(param, base_value))
        self._bare_owner = owner

    def bare_of(self, name: str) -> dict[str, Any]:
        """The bare parameter values an adapter swaps in (empty for BASE and most adapters)."""
        return {} if name == BASE else self._loaded[name].bare

    def remove(self, name: str) -> None:
        """Detach an adapter from PEFT (its weights are freed); the base and the other adapters stay."""
        if name not in self._loaded:
            loaded = ", ".join(self._loaded) or "none"
            raise InferenceError(f"no adapter called {name!r} is loaded (loaded: {loaded}).")
        if self._bare_owner == name:
            self.use_bare(BASE)
        kept = {p for n, loaded in self._loaded.items() if n != name for p in loaded.bare}
        self._bare_base = {p: v for p, v in self._bare_base.items() if p in kept}
        if len(self._loaded) == 1:
            self._unwrap()  # PEFT cannot run (even disabled) with no adapter left
        else:
            with warnings.catch_warnings():
                # PEFT says which adapter it activates instead; the next request activates its own.
                warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
                self.peft.delete_adapter(peft_name(name))
        del self._loaded[name]
        self._forget_unused_processors()

    def _forget_unused_processors(self) -> None:
        self.processors.keep_only({loaded.processor for loaded in self._loaded.values()})

    def _attach(self, name: str, config: Any, adapter: Adapter) -> None:
        from peft import PeftModel

        first = self.peft is None
        with warnings.catch_warnings():
            # PEFT 0.21 asks transformers 5 a deprecated question; nothing for our users to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if first:
                self.peft = PeftModel(self.base_model, config, adapter_name=name)
            else:
                self.peft.add_adapter(name, config)
        try:
            load_weights(self.peft, adapter, name)
        except BaseException:
            if first:
                self._unwrap()
            else:
                self.peft.delete_adapter(name)
            raise
        self.peft.eval()
        self.peft.requires_grad_(False)

    def _unwrap(self) -> None:
        """Take PEFT's layers out again: the base model as it was loaded."""
        self.peft.unload()
        self.peft = None

    # -- running ------------------------------------------------------------------------------------------
    def activate(self, name: str) -> None:
        """Make `name` (a loaded adapter) PEFT's active adapter, unless PEFT says it already is."""
        if self.peft.active_adapters != [peft_name(name)]:
            self.peft.set_adapter(peft_name(name), inference_mode=True)

    def mix_class(self, name: str, mixed_batches: bool) -> Any:
        from .batching import mix_class

        return mix_class(name, mixed_batches and self._loaded[name].info.mixable)

    def demote(self, module: str, names: set[str]) -> bool:
        """Mark the adapters among `names` that change `module` as not mixable (a layer there saw inputs
        that are not one per batch row); whether any adapter changed."""
        changed = False
        for name in names:
            loaded = self._loaded.get(name)
            if loaded is not None and module in loaded.modules and loaded.info.mixable:
                loaded.info.mixable = False
                loaded.info.not_mixable_because = (
                    f"its layer {module} sees inputs that are not one per batch row"
                )
                changed = True
        return changed
