"""The inference engine: one base model, any number of un-merged LoRA adapters, switched per request.

Loading is strict. Each adapter folder is read and placed key by key on the base by
`vlmtune.adapters.read_adapter` (runtime, pre-4.52 and LLaVA layouts; unplaced keys and shape mismatches
fail with the cause and the fix). PEFT then gets a `LoraConfig` and a state dict in today's runtime names,
and the load is checked again: no unexpected key and no missing LoRA key for the new adapter, so PEFT's
"missing adapter keys" warning is never the only signal.

Generation batches requests; rows with different adapters share a forward where that is exact
(language-model-only adapters): plain LoRA layers through `mixed` (all adapters of a batch in two matmuls),
other layers through PEFT's per-row `adapter_names` routing; adapters with LoRA in the vision tower or
DoRA run grouped by adapter (see `batching`).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, conversation, families
from ..adapters.inspect import declared_family
from ..adapters.manifest import read_manifest
from ..adapters.peft_bridge import load_weights, lora_config
from ..adapters.reader import Adapter, AdapterFormatError, base_params_from_model, read_adapter
from ..adapters.reader import read_config as read_adapter_config
from ..adapters.tensors import to_torch
from ..errors import VlmtuneError
from . import batching, mixed, quant
from .types import BASE, AdapterInfo, Generation, GenerationSettings, Request, canonical_adapter

DTYPES: dict[str, Any] = {
    "auto": "auto",
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
# Files of an adapter folder that carry a processor, a tokenizer or a chat template of its own.
PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")
# Roles whose layers see one batch row per batch entry, so PEFT's per-row adapter routing is exact there.
ROW_ROLES = ("language", "embeddings", "lm_head")
# Inside PEFT each adapter is called PEFT_PREFIX + its name: PEFT warns (and may re-initialize weights on
# load) when an adapter name is a substring of its parameter prefix 'lora_', as 'a' or 'or' would be.
PEFT_PREFIX = "ad_"


def peft_name(name: str) -> str:
    """The name PEFT knows an adapter by (`__base__` stays as it is: PEFT's own name for the base)."""
    return name if name == BASE else PEFT_PREFIX + name


class InferenceError(VlmtuneError):
    """A request or an adapter the engine cannot serve as asked."""


class RowMismatch(Exception):
    """Raised inside a mixed-batch forward when a LoRA layer sees inputs whose first dimension is not the
    batch of rows (image patches, tiles): per-row routing would be wrong there, so the batch is regrouped."""

    def __init__(self, module: str, rows: int, got: int) -> None:
        super().__init__(f"{module}: {got} inputs for {rows} rows")
        self.module = module


@dataclass
class Prepared:
    """A request checked and rendered: its adapter, processor key, prompt text and image sources."""

    adapter: str
    processor: str
    text: str
    images: list[Any]


@dataclass
class LoadedAdapter:
    info: AdapterInfo
    adapter: Adapter
    modules: set[str]  # runtime module paths the adapter changes (LoRA and full)
    processor: str  # key of the processor its rows are rendered with


def resolve_dtype(dtype: str | Any) -> Any:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise VlmtuneError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(
    base: str | Path,
    adapters: Mapping[str, str | Path] | Sequence[str | Path] | None = None,
    *,
    dtype: str | Any = "auto",
    device: str | None = None,
    quantization: str | None = None,
    mixed_batches: bool = True,
    default_adapter: str | None = None,
) -> Engine:
    """Load a base model once and attach adapters un-merged: `load("Qwen/Qwen2-VL-2B-Instruct",
    adapters={"shapes": "runs/a/adapter"})`.

    `adapters` maps names to folders (a list of folders takes names from the folder names).
    `quantization` is None, '4bit' or '8bit' (bitsandbytes, CUDA only). `device` is 'cpu', 'cuda',
    'cuda:N' or 'auto' (spread over the GPUs); default: CUDA when present. `mixed_batches=False` runs one
    adapter per forward (what serving without mixed batches does; used as the benchmark's anchor).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = checkpoint.resolve(base)
    config = checkpoint.read_config(folder)
    family = families.detect(config)
    named = name_adapters(adapters)
    precheck(named, folder, family, config)
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quantization:
        quant.check_platform(quantization)
        if device == "cpu":
            raise quant.QuantizationUnavailableError(
                f"--quantization {quantization} runs on a CUDA GPU only; drop --device cpu or the quantization."
            )
        compute = torch_dtype
        if compute in ("auto", torch.float32):
            compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs["quantization_config"] = quant.bnb_config(quantization, family, compute)
        kwargs["dtype"] = compute
    if device == "auto":
        kwargs["device_map"] = "auto"
    elif device != "cpu":
        kwargs["device_map"] = {"": device}
    model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
    model.eval()
    model.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(folder)
    engine = Engine(
        model,
        processor,
        family,
        base=str(base),
        folder=folder,
        mixed_batches=mixed_batches,
        quantization=quantization,
    )
    for name, path in named.items():
        engine.add_adapter(name, path)
    if default_adapter is not None:
        engine.default_adapter = engine.check_adapter(default_adapter)
    return engine


def precheck(
    adapters: Mapping[str, Path], folder: Path, family: families.Family, config: dict[str, Any]
) -> None:
    """Place every adapter on the base's safetensors headers before the weights are loaded, so a wrong
    adapter fails in a second instead of after loading a large model (the load checks again, on the model)."""
    from ..adapters.reader import base_params_from_folder

    try:
        params = base_params_from_folder(folder, family, config)
    except checkpoint.CheckpointError:
        return  # no safetensors headers to check against: the model load says why
    for path in adapters.values():
        check_declared_base(Path(path), family)
        read_adapter(path, family, params, config)


def check_declared_base(path: Path, family: families.Family) -> None:
    """A PEFT adapter whose declared base (a local folder) is another family fails here, before its
    language-model keys, which often have the same names in every family, get placed on this base."""
    if not path.is_dir() or read_manifest(path) is not None:
        return  # no folder: read_adapter says so; a manifest: read_adapter checks its family
    config = read_adapter_config(path)
    declared = declared_family(path, config)
    if declared is not None and declared.name != family.name:
        raise AdapterFormatError(
            f"{path} was made for {config.get('base_model_name_or_path')}, a {declared.name} model, but the "
            f"base is a {family.name} model; pass the base it was trained on."
        )


def name_adapters(adapters: Mapping[str, str | Path] | Sequence[str | Path] | None) -> dict[str, Path]:
    """Names for adapter folders: given ones, else the folder name (made a valid name)."""
    if adapters is None:
        return {}
    if isinstance(adapters, Mapping):
        return {str(k): Path(v) for k, v in adapters.items()}
    out: dict[str, Path] = {}
    for path in adapters:
        path = Path(path)
        name = re.sub(r"[^A-Za-z0-9_\-]", "_", path.resolve().name) or "adapter"
        if name in out:
            raise InferenceError(
                f"two adapters would both be called {name!r} ({out[name]} and {path}); name them: NAME=DIR."
            )
        out[name] = path
    return out


def parse_adapter_specs(specs: Sequence[str]) -> dict[str, Path]:
    """`--adapter` values, `NAME=DIR` or `DIR` (named after the folder), to {name: folder}."""
    named: dict[str, Path] = {}
    unnamed: list[str] = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if sep and NAME_PATTERN.match(name) and folder:
            if name in named:
                raise InferenceError(f"--adapter {name}= is given twice; give each adapter its own name.")
            named[name] = Path(folder)
        else:
            unnamed.append(spec)
    for name, folder in name_adapters(unnamed).items():
        if name in named:
            raise InferenceError(
                f"two adapters would both be called {name!r}; name them: --adapter NAME=DIR."
            )
        named[name] = folder
    return named


class Engine:
    """A loaded base with un-merged adapters. Thread-safe: calls are serialized by a lock."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        family: families.Family,
        *,
        base: str,
        folder: Path,
        mixed_batches: bool = True,
        quantization: str | None = None,
    ) -> None:
        self.base_model = model
        self.model = model  # becomes the PeftModel once an adapter is added
        self.peft: Any = None
        self.family = family
        self.base = base
        self.folder = Path(folder)
        self.quantization = quantization
        self.mixed_batches = mixed_batches
        self.default_adapter: str | None = None
        self.fingerprint = checkpoint.fingerprint(folder)
        self.base_config = model.config.to_dict()
        self.base_params = base_params_from_model(model)
        self.embedding_rows = model.get_input_embeddings().weight.shape[0]
        self._adapters: dict[str, LoadedAdapter] = {}
        self._processors: dict[str, Any] = {}
        self._signatures: dict[str, str] = {}
        self._lock = threading.RLock()
        self._active: str | None = None  # PEFT's active adapter, to skip a set_adapter that changes nothing
        self._register_processor(processor, "base")

    # -- adapters ---------------------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        """Loaded adapters by name."""
        return {name: loaded.info for name, loaded in self._adapters.items()}

    def check_adapter(self, name: str | None) -> str:
        """The canonical adapter name a request runs under, or an error naming the loaded ones."""
        name = canonical_adapter(name)
        if name is None:
            if self.default_adapter is not None:
                return self.default_adapter
            if not self._adapters:
                return BASE
            if len(self._adapters) == 1:
                return next(iter(self._adapters))
            raise InferenceError(
                f"several adapters are loaded ({', '.join(self._adapters)}); name the one to use "
                f"(or {BASE} for the base alone)."
            )
        if name != BASE and name not in self._adapters:
            loaded = ", ".join(self._adapters) or "none"
            raise InferenceError(
                f"no adapter called {name!r} is loaded (loaded: {loaded}; {BASE} runs the base)."
            )
        return name

    def add_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Read, place and attach an adapter folder under `name`; fails before touching the model when
        any tensor cannot be placed."""
        with self._lock:
            if not NAME_PATTERN.match(name) or canonical_adapter(name) == BASE:
                raise InferenceError(
                    f"adapter name {name!r} is not usable: use letters, digits, '_' and '-' "
                    f"({BASE} and 'none' are reserved for the base)."
                )
            if name in self._adapters:
                raise InferenceError(f"an adapter called {name!r} is already loaded; choose another name.")
            path = Path(path)
            check_declared_base(path, self.family)
            adapter = read_adapter(path, self.family, self.base_params, self.base_config)
            check_supported(adapter)
            self._drop_base_copies(adapter)
            processor_key = self._adapter_processor(path)
            mixable, because = self._mixability(adapter)
            config, dropped = lora_config(adapter)
            warnings_ = self._base_warnings(adapter, path)
            if dropped:
                warnings_.append(
                    f"{path}: adapter_config.json keys unknown to this PEFT version were ignored: {', '.join(dropped)}."
                )
            self._attach(name, config, adapter)
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
                processor="base" if processor_key == "base" else str(path),
                warnings=warnings_,
            )
            for message in warnings_:
                warnings.warn(message, stacklevel=2)
            self._adapters[name] = LoadedAdapter(
                info, adapter, set(adapter.lora) | set(adapter.full_modules), processor_key
            )
            return info

    def remove_adapter(self, name: str) -> None:
        """Detach an adapter (frees its weights); the base and the other adapters stay."""
        with self._lock:
            if name not in self._adapters:
                raise InferenceError(f"no adapter called {name!r} is loaded.")
            self._active = None
            if len(self._adapters) == 1:
                self._unwrap()  # PEFT cannot run (even disabled) with no adapter left
            else:
                self.peft.delete_adapter(peft_name(name))
            del self._adapters[name]
            if self.default_adapter == name:
                self.default_adapter = None

    def _attach(self, user_name: str, config: Any, adapter: Adapter) -> None:
        from peft import PeftModel

        self._active = None

        name = peft_name(user_name)
        first = self.peft is None
        with warnings.catch_warnings():
            # PEFT 0.21 asks transformers 5 a deprecated question; nothing for our users to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if first:
                self.peft = PeftModel(self.base_model, config, adapter_name=name)
                self.model = self.peft
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
        self.model = self.base_model

    def _drop_base_copies(self, adapter: Adapter) -> None:
        """PEFT saves the base weight of a LoRA-targeted embedding or lm_head beside its LoRA factors
        (`save_embedding_layers`; VLM-R1 adapters have one). An unchanged copy means nothing and is
        dropped; a changed one (a retrained or resized embedding) would change the base under every
        adapter, which un-merged serving cannot do, so it fails with the way out."""
        for name in [n for n in adapter.full if n.rsplit(".", 1)[0] in adapter.lora]:
            saved = to_torch(adapter.full[name]).float()
            current = self.base_model.get_parameter(name).detach().float().cpu()
            if not torch.allclose(saved, current, rtol=1e-2, atol=1e-3):
                raise AdapterFormatError(
                    f"{adapter.path}: the adapter replaces the base weight {name} (saved beside its LoRA "
                    "factors, e.g. a retrained or resized embedding), which would change the base under every "
                    "adapter; un-merged inference cannot apply it. Merge the adapter (`vlmtune merge`) instead."
                )
            del adapter.full[name]

    def _mixability(self, adapter: Adapter) -> tuple[bool, str | None]:
        if adapter.use_dora:
            return False, "it uses DoRA, which PEFT cannot mix with other adapters in one forward"
        outside = sorted(
            {
                self.family.role_of(m) or "unknown part"
                for m in [*adapter.lora, *adapter.full_modules]
                if self.family.role_of(m) not in ROW_ROLES
            }
        )
        if outside:
            return False, (
                f"it changes the {' and '.join(outside)}, whose layers see image patches rather than batch rows"
            )
        return True, None

    def _base_warnings(self, adapter: Adapter, path: Path) -> list[str]:
        manifest = adapter.manifest
        if manifest is None or not manifest.base.fingerprint or manifest.base.fingerprint == self.fingerprint:
            return []
        return [
            f"{path} was trained on {manifest.base.name_or_path} ({manifest.base.fingerprint}), and this base "
            f"({self.base}, {self.fingerprint}) has the same shapes but other weights: outputs will differ "
            "from what the adapter learned unless this is the same model re-saved."
        ]

    # -- processors --------------------------------------------------------------------------------------
    def _register_processor(self, processor: Any, key: str | None = None) -> str:
        """Store a processor under its signature (or `key`) and return the key; equal processors share
        one key, so their rows can share batches."""
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

    def _adapter_processor(self, path: Path) -> str:
        """The processor for an adapter: its own (training-time image limits, template) when its folder
        has one, else the base's with the adapter's chat template when it has only that."""
        from transformers import AutoProcessor

        if any((path / name).is_file() for name in PROCESSOR_CONFIGS):
            try:
                processor = AutoProcessor.from_pretrained(path)
            except Exception as exc:  # transformers raises many kinds for an incomplete folder
                raise AdapterFormatError(
                    f"{path} has a processor config but its processor cannot be loaded ({type(exc).__name__}: "
                    f"{exc}); copy the tokenizer files beside it, or remove the processor config to use the base's."
                ) from exc
            return self._register_processor(processor)
        template = next((path / name for name in TEMPLATE_FILES if (path / name).is_file()), None)
        if template is None:
            return "base"
        import copy
        import json

        processor = copy.deepcopy(self._processors["base"])
        text = template.read_text()
        processor.chat_template = json.loads(text)["chat_template"] if template.suffix == ".json" else text
        return self._register_processor(processor)

    def processor_for(self, adapter: str | None) -> Any:
        """The processor (tokenizer, image settings, chat template) requests under `adapter` use."""
        name = self.check_adapter(adapter)
        return self._processors["base" if name == BASE else self._adapters[name].processor]

    # -- requests ----------------------------------------------------------------------------------------
    def prepare(self, request: Request) -> Prepared:
        """Check a request (adapter, messages, image count) and render its prompt; no model work."""
        adapter = self.check_adapter(request.adapter)
        key = "base" if adapter == BASE else self._adapters[adapter].processor
        chat = conversation.from_request(request.messages, request.images)
        processor = self._processors[key]
        text = processor.apply_chat_template(chat.to_template(), add_generation_prompt=True, tokenize=False)
        return Prepared(adapter, key, text, list(chat.images))

    def _classes(self) -> dict[str, Hashable]:
        return {
            name: batching.mix_class(name, self.mixed_batches and loaded.info.mixable)
            for name, loaded in self._adapters.items()
        }

    def _encode(self, batch: Sequence[Prepared]) -> Any:
        processor = self._processors[batch[0].processor]
        has_images = any(p.images for p in batch)
        images = [[conversation.open_image(src) for src in p.images] for p in batch] if has_images else None
        encoded = processor(text=[p.text for p in batch], images=images, padding=True, return_tensors="pt")
        dtype = self._compute_dtype()
        return encoded.to(self.base_model.device).to(dtype)

    def _compute_dtype(self) -> Any:
        return self.base_model.get_input_embeddings().weight.dtype

    # -- routing -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _route(self, adapters: Sequence[str]) -> Iterator[None]:
        """Set PEFT up for a batch whose rows use `adapters` (one name per row)."""
        adapters = [peft_name(a) for a in adapters]
        distinct = list(dict.fromkeys(adapters))
        if distinct == [BASE]:
            with self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext():
                yield
            return
        if len(distinct) == 1:
            self._activate(distinct[0])
            yield
            return
        handles = self._route_rows(list(adapters))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _activate(self, name: str) -> None:
        if self._active != name:
            self.peft.set_adapter(name, inference_mode=True)
            self._active = name

    def _route_rows(self, adapters: list[str]) -> list[Any]:
        """Route each row of a batch through its own adapter (PEFT names, one per row).

        Plain LoRA Linear layers get their deltas from `mixed.LinearStack` (two matmuls per layer for any
        number of adapters) while PEFT runs their base layer; other layers (embedding LoRA,
        modules_to_save) use PEFT's layer-level mixed-batch forward, fed the `adapter_names` keyword by
        us rather than through `generate(adapter_names=...)`: PEFT's modules_to_save wrapper raises for a
        row whose adapter lacks that module, and we name such rows `__base__` there, which is what they
        mean. Every layer a batch adapter changes first checks that it sees one input per row; a layer
        fed image patches or tiles raises `RowMismatch` and the batch is regrouped rather than mis-routed.
        Layers no batch adapter touches run their base path (the active adapter is absent there)."""
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper

        rows = len(adapters)
        named = [a for a in dict.fromkeys(adapters) if a != BASE]
        self._activate(named[0])
        base_only = [BASE] * rows
        handles: list[Any] = []
        for name, module in self.peft.base_model.model.named_modules():
            stack = None
            if isinstance(module, LoraLayer):
                present = (set(module.lora_A) | set(module.lora_embedding_A)) & set(named)
                if present and mixed.plain_linear(module, present):
                    stack = mixed.LinearStack(module, adapters, present)
            elif isinstance(module, ModulesToSaveWrapper):
                present = set(module.modules_to_save) & set(named)
            else:
                continue
            if not present:
                continue
            names = base_only if stack is not None else [a if a in present else BASE for a in adapters]

            def route(
                mod: Any, args: tuple, kwargs: dict, name: str = name, names: list[str] = names
            ) -> tuple[tuple, dict]:
                x = args[0] if args else next(iter(kwargs.values()))
                if x.shape[0] != rows:
                    raise RowMismatch(name, rows, x.shape[0])
                return args, {**kwargs, "adapter_names": names}

            handles.append(module.register_forward_pre_hook(route, with_kwargs=True))
            if stack is not None:

                def add_delta(
                    mod: Any, args: tuple, kwargs: dict, output: Any, stack: mixed.LinearStack = stack
                ) -> Any:
                    x = args[0] if args else next(iter(kwargs.values()))
                    return (output + stack.delta(x)).to(output.dtype)  # PEFT adds in the wider dtype

                handles.append(module.register_forward_hook(add_delta, with_kwargs=True))
        return handles

    def _demote(self, module: str, adapters: set[str]) -> None:
        for name in adapters:
            loaded = self._adapters.get(name)
            if loaded is not None and module in loaded.modules:
                loaded.info.mixable = False
                loaded.info.not_mixable_because = (
                    f"its layer {module} sees inputs that are not one per batch row"
                )

    # -- generation --------------------------------------------------------------------------------------
    def generate(
        self,
        requests: Request | Sequence[Request],
        settings: GenerationSettings | None = None,
        *,
        batch_size: int = 8,
        streamer: Any = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """Generate for each request (under its own adapter), batching compatible rows; results in order.

        Every request is checked before any generation starts. `streamer` (a transformers streamer) is
        allowed for a single request; `progress(n)` is called after each batch with its size.
        """
        items = [requests] if isinstance(requests, Request) else list(requests)
        settings = settings or GenerationSettings()
        if streamer is not None and len(items) != 1:
            raise InferenceError("a streamer can follow one request at a time.")
        with self._lock:
            prepared = [self.prepare(r) for r in items]
            results: list[Generation | None] = [None] * len(prepared)
            for batch in self._plan(prepared, range(len(prepared)), batch_size):
                self._generate_batch(batch, prepared, settings, results, streamer)
                if progress is not None:
                    progress(len(batch))
        return [r for r in results if r is not None]

    def chat(
        self,
        messages: list[dict[str, Any]] | str,
        images: Sequence[Any] = (),
        adapter: str | None = None,
        **settings: Any,
    ) -> str:
        """One reply: `engine.chat("<image>What colour?", images=["a.png"], adapter="shapes")`."""
        request = Request(messages, list(images), adapter)
        return self.generate(request, GenerationSettings(**settings))[0].text

    def _plan(self, prepared: Sequence[Prepared], indices: Sequence[int], batch_size: int) -> list[list[int]]:
        apart = not self.family.mixed_image_batches  # image rows and text rows batch apart
        rows = [
            batching.Row(i, prepared[i].adapter, prepared[i].processor, apart and bool(prepared[i].images))
            for i in indices
        ]
        return batching.plan(rows, self._classes(), batch_size)

    def _generate_batch(
        self,
        batch: list[int],
        prepared: Sequence[Prepared],
        settings: GenerationSettings,
        results: list[Generation | None],
        streamer: Any,
    ) -> None:
        rows = [prepared[i] for i in batch]
        adapters = [p.adapter for p in rows]
        encoded = self._encode(rows)
        config = self.generation_config(settings)
        try:
            with torch.inference_mode(), self._route(adapters):
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                output = self.model.generate(**encoded, generation_config=config, streamer=streamer)
        except RowMismatch as exc:
            self._demote(exc.module, set(adapters))
            for sub in self._plan(prepared, batch, len(batch)):
                self._generate_batch(sub, prepared, settings, results, streamer)
            return
        prompt_len = encoded["input_ids"].shape[1]
        lengths = encoded["attention_mask"].sum(dim=1).tolist()
        stops = set(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
        tokenizer = self._processors[rows[0].processor].tokenizer
        for row, index in enumerate(batch):
            tokens = output[row, prompt_len:].tolist()
            cut = next((i for i, t in enumerate(tokens) if t in stops), None)
            kept = tokens if cut is None else tokens[:cut]
            results[index] = Generation(
                text=tokenizer.decode(kept, skip_special_tokens=True).strip(),
                adapter=adapters[row],
                prompt_tokens=int(lengths[row]),
                generated_tokens=len(tokens) if cut is None else cut + 1,
                finish_reason="length" if cut is None else "stop",
            )

    def generation_config(self, settings: GenerationSettings) -> Any:
        """A fresh GenerationConfig: the base's special token ids, our decoding settings (never the base's
        sampling defaults, which make runs incomparable; LLaMA-Factory #3096)."""
        from transformers import GenerationConfig

        base = self.base_model.generation_config
        tokenizer = self._processors["base"].tokenizer
        eos = base.eos_token_id if base.eos_token_id is not None else tokenizer.eos_token_id
        pad = base.pad_token_id if base.pad_token_id is not None else tokenizer.pad_token_id
        if pad is None:
            pad = eos[0] if isinstance(eos, list) else eos
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "bos_token_id": base.bos_token_id,
        }
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or 0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if settings.repetition_penalty is not None:
            kwargs["repetition_penalty"] = settings.repetition_penalty
        return GenerationConfig(**kwargs)

    # -- scoring -----------------------------------------------------------------------------------------
    def logits(self, requests: Request | Sequence[Request], *, batch_size: int = 8) -> list[torch.Tensor]:
        """The prompt's logits for each request (float32 on CPU, padding removed), routed and batched as
        `generate` does: the way to check what the engine computes against a reference."""
        items = [requests] if isinstance(requests, Request) else list(requests)
        with self._lock:
            prepared = [self.prepare(r) for r in items]
            out: list[torch.Tensor | None] = [None] * len(prepared)
            pending = self._plan(prepared, range(len(prepared)), batch_size)
            while pending:
                batch = pending.pop(0)
                rows = [prepared[i] for i in batch]
                encoded = self._encode(rows)
                try:
                    with torch.inference_mode(), self._route([p.adapter for p in rows]):
                        logits = self.model(**encoded).logits
                except RowMismatch as exc:
                    self._demote(exc.module, {p.adapter for p in rows})
                    pending[:0] = self._plan(prepared, batch, len(batch))
                    continue
                lengths = encoded["attention_mask"].sum(dim=1).tolist()
                for row, index in enumerate(batch):
                    out[index] = logits[row, logits.shape[1] - int(lengths[row]) :].float().cpu()
        return [t for t in out if t is not None]


def check_supported(adapter: Adapter) -> None:
    """Settings PEFT would accept but that un-merged inference here cannot reproduce faithfully."""
    bias = adapter.config.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterFormatError(
            f"{adapter.path}: adapter_config.json has bias={bias!r} (trained base biases), which vlmtune's "
            "un-merged inference does not support; merge the adapter into the base instead."
        )


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
