"""The inference engine: one base model, any number of un-merged LoRA adapters, switched per request.

A façade over small parts, each with one job: `base` loads the base (dtype, device, quantization),
`adapter_checks` pre-checks an adapter against the base's headers and says whether its rows mix,
`registry` attaches and detaches adapters through PEFT, `processors` holds the processors rows are
rendered with, `batching` plans which rows share a forward, `routing` routes per-row adapters inside a
forward (and holds the one regroup loop), and `generation` turns settings and outputs into
GenerationConfigs and results.

Loading is strict. Each adapter folder is read and placed key by key on the base by
`vlmtune.adapters.read_adapter` (runtime, pre-4.52 and LLaVA layouts; unplaced keys and shape mismatches
fail with the cause and the fix), and PEFT's load is checked again (`adapters.peft_bridge`), so PEFT's
"missing adapter keys" warning is never the only signal.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, conversation, families
from ..conversation.images import DEFAULT_POLICY, ImagePolicy
from . import adapter_checks, batching
from .base import load_model, open_base
from .generation import generation_config, generations, prompt_logits
from .processors import Processors
from .registry import AdapterRegistry
from .routing import route, run_batches
from .specs import name_adapters
from .types import AdapterInfo, Generation, GenerationSettings, InferenceError, Prepared, Request


class Engine:
    """A loaded base with un-merged adapters.

    Whole calls (`generate`, `chat`, `logits`, `add_adapter`, `remove_adapter`) are thread-safe: they hold
    `engine.lock`. A scheduler (continuous batching in `vlmtune serve`) drives the same steps itself:

        rows = engine.prepare(requests, policy=policy)  # list[Prepared]: adapter resolved, template
                                                        #   rendered, images opened; raises on a bad one
        for batch in engine.plan(rows, 8):              # list[list[int]]: rows that may share a forward
            inputs = engine.encode([rows[i] for i in batch])  # processor call, on the model's device
            with torch.inference_mode(), engine.route([rows[i].adapter for i in batch]):
                out = engine.model(**inputs, cache=cache, use_cache=True)  # any forward(s): prefill, decode

    `route(adapters)` takes one adapter name per batch row (`Prepared.adapter`; BASE for the base) and
    routes every forward inside the block, prefill and decode steps alike. When a layer an adapter
    changes sees inputs that are not one per row (LoRA in a vision tower fed image patches), the block
    raises `routing.RowMismatch` after marking the adapters concerned not mixable; `plan` on the same rows
    then groups them apart (that is what `generate` and `logits` do, through `routing.run_batches`).
    DoRA and vision-tower adapters are known not mixable from the start, so their rows are planned apart.
    Hold `engine.lock` around the steps when other threads may add or remove adapters meanwhile.
    """

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
        self.family = family
        self.base = base
        self.folder = Path(folder)
        self.quantization = quantization
        self.mixed_batches = mixed_batches  # False: one adapter per forward (the benchmark's anchor)
        self.default_adapter: str | None = None
        self.fingerprint = checkpoint.fingerprint(folder)
        self.lock = threading.RLock()
        self.processors = Processors(processor, model.get_input_embeddings().weight.shape[0])
        self.registry = AdapterRegistry(
            model, family, self.processors, base=base, fingerprint=self.fingerprint
        )

    @property
    def model(self) -> Any:
        """The model to run: the PeftModel while adapters are attached, else the base model."""
        return self.registry.model

    @property
    def peft(self) -> Any:
        """The PeftModel, or None while no adapter is attached."""
        return self.registry.peft

    # -- adapters -----------------------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        """Loaded adapters by name (each with its content hash, `info.sha256`)."""
        return self.registry.infos()

    def check_adapter(self, name: str | None) -> str:
        """The canonical adapter name a request runs under, or an error naming the loaded ones."""
        return self.registry.resolve(name, self.default_adapter)

    def add_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Read, place and attach an adapter folder under `name`; fails before touching the model when
        any tensor cannot be placed."""
        with self.lock:
            return self.registry.add(name, path)

    def remove_adapter(self, name: str) -> None:
        """Detach an adapter (PEFT frees its weights); the base and the other adapters stay."""
        with self.lock:
            self.registry.remove(name)
            if self.default_adapter == name:
                self.default_adapter = None

    def processor_for(self, adapter: str | None) -> Any:
        """The processor (tokenizer, image settings, chat template) requests under `adapter` use."""
        return self.processors[self.registry.processor_key(self.check_adapter(adapter))]

    # -- the seam: prepare -> plan -> encode -> route ----------------------------------------------------
    def prepare(
        self, requests: Request | Sequence[Request], *, policy: ImagePolicy | None = DEFAULT_POLICY
    ) -> list[Prepared]:
        """Check requests (adapter, messages, image count) and render their prompts; no model work.
        Every request is checked before the first is returned. Images are opened now under `policy`
        (which formats and folders are allowed); with `policy=None` they stay sources until `encode`
        opens them (what `generate` does, so a large dataset is not held decoded)."""
        items = [requests] if isinstance(requests, Request) else list(requests)
        out = []
        for request in items:
            adapter = self.check_adapter(request.adapter)
            key = self.registry.processor_key(adapter)
            chat = conversation.from_request(request.messages, request.images, policy)
            text = self.processors[key].apply_chat_template(
                chat.to_template(), add_generation_prompt=True, tokenize=False
            )
            out.append(Prepared(adapter, key, text, list(chat.images), self.registry.sha256(adapter)))
        return out

    def plan(
        self, rows: Sequence[Prepared], batch_size: int, indices: Sequence[int] | None = None
    ) -> list[list[int]]:
        """Batches of row indices (of `indices`, default all) that may share one forward: same processor,
        image and text rows apart where the family needs it, mixable adapters together."""
        apart = not self.family.mixed_image_batches
        planned = [
            batching.Row(i, rows[i].adapter, rows[i].processor, apart and bool(rows[i].images))
            for i in (range(len(rows)) if indices is None else indices)
        ]
        classes = {name: self.registry.mix_class(name, self.mixed_batches) for name in self.registry.names()}
        return batching.plan(planned, classes, batch_size)

    def encode(self, rows: Sequence[Prepared]) -> Any:
        """Model inputs for rows that share a processor (one `plan` batch), on the model's device."""
        keys = {p.processor for p in rows}
        if len(keys) != 1:
            raise InferenceError(
                "rows rendered by different processors cannot be encoded together; plan() them."
            )
        self.registry.require_unchanged((p.adapter, p.sha256) for p in rows)
        processor = self.processors[keys.pop()]
        has_images = any(p.images for p in rows)
        images = [[conversation.open_image(src) for src in p.images] for p in rows] if has_images else None
        encoded = processor(text=[p.text for p in rows], images=images, padding=True, return_tensors="pt")
        return encoded.to(self.base_model.device).to(self.base_model.get_input_embeddings().weight.dtype)

    def route(self, adapters: Sequence[str]) -> contextlib.AbstractContextManager[None]:
        """Route the forwards inside the block per row: `adapters` holds one name per batch row."""
        return route(self.registry, adapters)

    def generation_config(self, settings: GenerationSettings) -> Any:
        """The GenerationConfig for `settings` (the base's special tokens, never its sampling defaults)."""
        return generation_config(self.base_model, self.processors["base"].tokenizer, settings)

    # -- whole calls ------------------------------------------------------------------------------------
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
        settings = settings or GenerationSettings()
        if streamer is not None and not isinstance(requests, Request) and len(requests) != 1:
            raise InferenceError("a streamer can follow one request at a time.")
        with self.lock:
            rows = self.prepare(requests, policy=None)
            config = self.generation_config(settings)
            results: list[Generation | None] = [None] * len(rows)

            def step(batch: list[int]) -> None:
                adapters = [rows[i].adapter for i in batch]
                encoded = self.encode([rows[i] for i in batch])
                with torch.inference_mode(), self.route(adapters):
                    if settings.seed is not None:
                        torch.manual_seed(settings.seed)
                    output = self.model.generate(**encoded, generation_config=config, streamer=streamer)
                tokenizer = self.processors[rows[batch[0]].processor].tokenizer
                for index, result in zip(
                    batch, generations(output, encoded, config, tokenizer, adapters), strict=True
                ):
                    results[index] = result
                if progress is not None:
                    progress(len(batch))

            self._run(rows, batch_size, step)
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

    def logits(self, requests: Request | Sequence[Request], *, batch_size: int = 8) -> list[torch.Tensor]:
        """The prompt's logits for each request (float32 on CPU, padding removed), routed and batched as
        `generate` does: the way to check what the engine computes against a reference."""
        with self.lock:
            rows = self.prepare(requests, policy=None)
            out: list[torch.Tensor | None] = [None] * len(rows)

            def step(batch: list[int]) -> None:
                encoded = self.encode([rows[i] for i in batch])
                with torch.inference_mode(), self.route([rows[i].adapter for i in batch]):
                    logits = self.model(**encoded).logits
                for index, row_logits in zip(batch, prompt_logits(logits, encoded), strict=True):
                    out[index] = row_logits

            self._run(rows, batch_size, step)
        return [t for t in out if t is not None]

    def _run(self, rows: list[Prepared], batch_size: int, step: Callable[[list[int]], None]) -> None:
        run_batches(lambda indices, size: self.plan(rows, size, indices), range(len(rows)), batch_size, step)


def load(
    base: str | Path,
    adapters: Mapping[str, str | Path] | Sequence[str | Path] | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    quantization: str | None = None,
    mixed_batches: bool = True,
    default_adapter: str | None = None,
) -> Engine:
    """Load a base model once and attach adapters un-merged: `load("Qwen/Qwen2-VL-2B-Instruct",
    adapters={"shapes": "runs/a/adapter"})`.

    `adapters` maps names to folders (a list of folders takes names from the folder names); every adapter
    is placed on the base's safetensors headers before the weights load. `quantization` is None, '4bit' or
    '8bit' (bitsandbytes; CPU or CUDA). `device` is 'cpu', 'cuda', 'cuda:N' or 'auto' (spread over the GPUs);
    default: CUDA when present. `mixed_batches=False` runs one adapter per forward (what serving without
    mixed batches does; used as the benchmark's anchor).
    """
    spec = open_base(base)
    named = name_adapters(adapters)
    adapter_checks.precheck(named, spec.folder, spec.family, spec.config)
    model, processor = load_model(spec, dtype=dtype, device=device, quantization=quantization)
    engine = Engine(
        model,
        processor,
        spec.family,
        base=spec.name,
        folder=spec.folder,
        mixed_batches=mixed_batches,
        quantization=quantization,
    )
    for name, path in named.items():
        engine.add_adapter(name, path)
    if default_adapter is not None:
        engine.default_adapter = engine.check_adapter(default_adapter)
    return engine
