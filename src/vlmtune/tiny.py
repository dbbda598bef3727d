"""Tiny (and small) random checkpoints written as real hub-style folders.

They are the fixtures of the test suite and the model of `make demo`: config, safetensors weights (as
`save_pretrained` writes them), generation config, a tokenizer trained here, the family's real processor
class and a chat template that marks assistant turns with `{% generation %}`. Plain transformers loads
them with no vlmtune import.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from . import families
from .errors import VlmtuneError
from .fsutil import atomic_dir

SIZES = ("tiny", "small")

# Words the tokenizer must keep whole: the demo's answers and the words of its questions.
KEEP_WHOLE = (
    "red green blue yellow purple orange black white cyan magenta pink brown gray "
    "circle square triangle cross star ring shape colour color what is the it this image picture of "
    "a an and in on yes no one two three four five six seven eight nine ten"
).split()

FILLER = (
    "the model reads text and looks at images then answers questions about what it sees "
    "cat dog bird car tree house sky sun moon water left right top bottom big small many few "
    "hello world thank you please describe count how where which who why when there here"
).split()


def corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """Deterministic training text for the tokenizer: KEEP_WHOLE words appear often enough that BPE
    learns each as a single token (with and without a leading space)."""
    rng = random.Random(seed)
    words = KEEP_WHOLE * 4 + FILLER
    out = []
    for _ in range(lines):
        n = rng.randint(3, 12)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        out.append(sentence.capitalize() + rng.choice([".", "?", "!", ","]))
    out.extend(KEEP_WHOLE)
    out.extend(w.capitalize() for w in KEEP_WHOLE)
    return out


def train_tokenizer(
    special_tokens: tuple[str, ...],
    vocab_size: int = 1024,
    seed: int = 0,
    named_tokens: dict[str, str] | None = None,
) -> Any:
    """A byte-level BPE tokenizer trained in-process, wrapped as a transformers fast tokenizer.

    Special tokens take the first ids, in the order given; `named_tokens` become model-specific token
    attributes (`tokenizer.boi_token`), saved in tokenizer_config.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    extra = {"extra_special_tokens": dict(named_tokens)} if named_tokens else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **extra)


def configure_tokenizer(tokenizer: Any, spec: families.TinySpec) -> None:
    """Name the special tokens the way the family's real tokenizer does."""
    for attr, token in spec.token_roles.items():
        setattr(tokenizer, attr, token)
    tokenizer.add_special_tokens({"additional_special_tokens": list(spec.special_tokens)})


def build(
    family_name: str,
    size: str = "tiny",
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    tied: bool = False,
):
    """Build (model, processor) for a family in memory. `overrides` update the text config
    (e.g. {"initializer_range": 0.1}); `tied` shares lm_head with the input embeddings (as small
    Qwen2-VL checkpoints do)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    if size not in SIZES:
        raise VlmtuneError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}.")
    family = families.get(family_name)
    if tied and not family.can_tie_embeddings:
        raise VlmtuneError(f"{family.name} models cannot tie lm_head to the input embeddings.")
    spec = families.tiny_spec(family_name)
    # same vocabulary whatever the weight seed
    tokenizer = train_tokenizer(spec.special_tokens, named_tokens=dict(spec.named_tokens))
    configure_tokenizer(tokenizer, spec)
    tokens = {t: tokenizer.convert_tokens_to_ids(t) for t in spec.special_tokens}
    raw = spec.config(size, tokens, len(tokenizer))
    raw[spec.text_config_key].update(overrides or {})
    raw["tie_word_embeddings"] = tied
    model_type = raw.pop("model_type")
    config = AutoConfig.for_model(model_type, **raw)
    config.dtype = "float32"
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    if spec.post_init is not None:
        spec.post_init(model)
    model.eval()
    processor = spec.processor(tokenizer, spec.chat_template)
    return model, processor


def write(
    family_name: str,
    out_dir: str | Path,
    size: str = "tiny",
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    max_shard_size: str | int | None = None,
    layout: str = "original",
    tied: bool = False,
) -> Path:
    """Write a tiny checkpoint folder. `layout='original'` stores weights under the hub's on-disk names
    (what `save_pretrained` writes by default); `'runtime'` under transformers 5 runtime names."""
    from transformers import GenerationConfig

    if layout not in ("original", "runtime"):
        raise VlmtuneError(f"unknown layout {layout!r}; choose 'original' or 'runtime'.")
    if max_shard_size is not None:
        from .merging.writer import parse_size

        max_shard_size = parse_size(max_shard_size)  # one reading of sizes (and its one-line error)
    model, processor = build(family_name, size, seed, overrides, tied)
    tokenizer = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        kwargs: dict[str, Any] = {"save_original_format": layout == "original"}
        if max_shard_size is not None:
            kwargs["max_shard_size"] = max_shard_size
        model.save_pretrained(tmp, **kwargs)
        processor.save_pretrained(tmp)
    return out
