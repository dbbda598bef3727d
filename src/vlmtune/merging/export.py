"""Everything in a merged folder besides the weights: config, generation config, tokenizer, processor,
chat template, and `vlmtune.json`.

Merged folders from other tools come out without `preprocessor_config.json`, the chat template or
`generation_config.json` (FIELD_NOTES §4.2). Here every non-weight file of the base is copied, then the
loader files of the adapter folders override the base's (they hold training-time settings such as image
resolution limits and the chat template the adapter learned), later adapters over earlier ones. Weight
files of other formats are never copied: a stale `pytorch_model.bin` beside the merged safetensors would
load the un-merged weights in some tools.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from ..adapters.manifest import MANIFEST, MergedAdapter, MergedBase, MergedManifest, made_for
from ..adapters.reader import Adapter
from ..io import dtypes, read_json
from .plan import Plan

WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".npz",
    ".onnx",
)
# Files an adapter folder may carry that a loader of the merged model reads, in the adapter's version.
LOADER_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")


def merged_config(plan: Plan) -> dict[str, Any]:
    """The base's config.json with the output dtype and, when lm_head was written untied, both tie flags
    false (transformers 5 re-ties when either level says true; peft #2777)."""
    config = copy.deepcopy(plan.config)
    if plan.out_dtype:
        name = dtypes.torch_name(plan.out_dtype)
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
        for sub in config.values():
            if isinstance(sub, dict) and ("dtype" in sub or "torch_dtype" in sub):
                for key in ("dtype", "torch_dtype"):
                    if key in sub:
                        sub[key] = name
    if plan.untie:
        config["tie_word_embeddings"] = False
        text = config.get("text_config")
        if isinstance(text, dict):
            text["tie_word_embeddings"] = False
    return config


def export_files(plan: Plan, folder: Path) -> dict[str, Any]:
    """Copy the non-weight files into `folder`; return where each came from and what is missing."""
    origin: dict[str, str] = {}
    skipped: list[str] = []
    for path in sorted(plan.base.iterdir()):
        name = path.name
        if name in ("config.json", MANIFEST) or is_weight_file(name):
            continue
        if not path.is_file():
            skipped.append(name + "/")
            continue
        shutil.copyfile(path, folder / name)
        origin[name] = "base"
    for i, adapter in enumerate(plan.adapters):
        for name in LOADER_FILES:
            path = adapter.path / name
            if path.is_file():
                shutil.copyfile(path, folder / name)
                origin[name] = f"adapter {i + 1}" if len(plan.adapters) > 1 else "adapter"
    (folder / "config.json").write_text(json.dumps(merged_config(plan), indent=2, sort_keys=True) + "\n")
    origin["config.json"] = "base (updated)" if (plan.out_dtype or plan.untie) else "base"
    return {
        "files": dict(sorted(origin.items())),
        "skipped_folders": skipped,
        "warnings": missing_files(folder),
    }


def missing_files(folder: Path) -> list[str]:
    """What a loader of a vision-language model will look for and not find (warnings: some bases lack
    them too, and then the merge cannot invent them)."""
    return list(loader_gaps(folder).values())


def loader_gaps(folder: Path) -> dict[str, str]:
    """The loader files a model folder lacks, by what they are ("tokenizer", "processor", "chat_template",
    "generation_config") -> a one-line warning; `inspect`'s vLLM verdict reads the same."""
    gaps: dict[str, str] = {}
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        gaps["tokenizer"] = (
            "no tokenizer file (tokenizer.json / tokenizer.model / vocab.json) in base or adapter"
        )
    if not any((folder / n).is_file() for n in PROCESSOR_FILES):
        gaps["processor"] = "no image processor config (preprocessor_config.json / processor_config.json)"
    has_template = (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file()
    for name in ("tokenizer_config.json", "processor_config.json"):
        path = folder / name
        if not has_template and path.is_file():  # parsed before (io.check_loader_files): no surprise here
            has_template = "chat_template" in read_json(path)
    if not has_template:
        gaps["chat_template"] = (
            "no chat template (chat_template.jinja / chat_template.json / tokenizer_config.json)"
        )
    if not (folder / "generation_config.json").is_file():
        gaps["generation_config"] = "no generation_config.json: generation falls back to library defaults"
    return gaps


def adapter_record(adapter: Adapter) -> MergedAdapter:
    h = hashlib.sha256()
    for f in adapter.files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return MergedAdapter(
        path=str(adapter.path),
        format=adapter.format,
        key_layouts=sorted(adapter.layouts),
        sha256=h.hexdigest(),
        made_for=made_for(adapter.config, adapter.manifest),
        lora_modules=len(adapter.lora),
        full_tensors=len(adapter.full),
        use_dora=adapter.use_dora,
        use_rslora=bool(adapter.config.get("use_rslora")),
    )


def write_manifest(
    plan: Plan,
    folder: Path,
    base_name: str,
    fingerprint: str,
    check: dict[str, Any],
    files: dict[str, Any],
    verification: dict[str, Any] | None,
    warnings: list[str],
) -> dict[str, Any]:
    """`vlmtune.json` of a merged folder: what went in, how, and how it was checked."""
    manifest = MergedManifest(
        base=MergedBase(
            name_or_path=base_name,
            fingerprint=fingerprint,
            architecture=(plan.config.get("architectures") or [plan.family.architecture])[0],
            model_type=plan.config.get("model_type"),
            family=plan.family.name,
            key_layout=plan.layout,
        ),
        adapters=[adapter_record(a) for a in plan.adapters],
        dtype=dtypes.torch_name(plan.out_dtype) if plan.out_dtype else "auto",
        tensor_dtypes=[dtypes.torch_name(d) for d in sorted({t.dtype for t in plan.tensors})],
        untied_lm_head=plan.untie,
        tensors=plan.counts(),
        shards=plan.shard_files,
        max_shard_size=plan.max_shard_size,
        files=files["files"],
        check=check,
        verification=verification if verification is not None else {"run": False},
        warnings=warnings,
    )
    manifest.write(folder)
    return manifest.to_dict()
