"""In-memory byte-level tokenizers for models built from configs (no hub access).

They are the tokenizer classes the real checkpoints use (CLIP BPE, a fast Llama-style
tokenizer) with a byte vocabulary and no merges, so every code path that tokenizes, pads and
decodes runs offline. `byte_level_tokenizer` places given tokens at given ids, so a
random-weight twin of a published model keeps its real special-token and image-token ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

if TYPE_CHECKING:  # transformers loads in a second: not when a CLI only validates parameters
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast

BYTE_SYMBOLS = sorted(pre_tokenizers.ByteLevel.alphabet())


def tiny_clip_tokenizer(max_length: int = 32, pad: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP's BPE tokenizer over bytes; `pad` is `<|endoftext|>` or, for SDXL's and SD3's
    second encoder, "!"."""
    from transformers import CLIPTokenizer

    vocab = {symbol: i for i, symbol in enumerate(BYTE_SYMBOLS)}
    vocab.update({symbol + "</w>": len(BYTE_SYMBOLS) + i for i, symbol in enumerate(BYTE_SYMBOLS)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token=pad)


def byte_level_tokenizer(
    tokens: dict[str, int], bos: str | None, eos: str, pad: str, max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """Byte symbols at the lowest ids not taken by `tokens`; adds BOS in front like Llama
    tokenizers, or without `bos` EOS at the end like T5's.

    Every name in `tokens` becomes one unsplittable token with its given id."""
    from transformers import PreTrainedTokenizerFast

    taken = set(tokens.values())
    free = (i for i in range(len(BYTE_SYMBOLS) + len(taken)) if i not in taken)
    vocab = {symbol: next(free) for symbol in BYTE_SYMBOLS} | tokens
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    edge = bos or eos
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A" if bos else f"$A {eos}", special_tokens=[(edge, tokens[edge])]
    )
    specials = [name for name in tokens if name not in (bos, eos, pad)]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=specials,
        padding_side="left" if bos else "right",
        **({"model_max_length": max_length} if max_length else {}),
    )
