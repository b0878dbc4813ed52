"""In-memory byte-level tokenizers for the tiny backends (no hub access).

They are the same tokenizer classes the real checkpoints use (CLIP BPE, a fast Llama-style
tokenizer), with a 256-symbol byte vocabulary and no merges, so every code path that
tokenizes, pads and decodes is exercised offline.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

BYTE_SYMBOLS = sorted(pre_tokenizers.ByteLevel.alphabet())

# Janus-style special tokens, in the order they get ids after the 256 byte symbols.
JANUS_BOS, JANUS_EOS, JANUS_PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
JANUS_BOI, JANUS_EOI, JANUS_IMAGE = "<begin_of_image>", "<end_of_image>", "<image_placeholder>"


def tiny_clip_tokenizer(max_length: int = 32) -> CLIPTokenizer:
    vocab = {symbol: i for i, symbol in enumerate(BYTE_SYMBOLS)}
    vocab.update({symbol + "</w>": len(BYTE_SYMBOLS) + i for i, symbol in enumerate(BYTE_SYMBOLS)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_janus_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with Janus' special tokens; adds BOS like the real one."""
    specials = [JANUS_BOS, JANUS_EOS, JANUS_PAD, JANUS_BOI, JANUS_EOI, JANUS_IMAGE]
    vocab = {symbol: i for i, symbol in enumerate(BYTE_SYMBOLS + specials)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{JANUS_BOS} $A", special_tokens=[(JANUS_BOS, vocab[JANUS_BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=JANUS_BOS,
        eos_token=JANUS_EOS,
        pad_token=JANUS_PAD,
        additional_special_tokens=[JANUS_BOI, JANUS_EOI, JANUS_IMAGE],
        padding_side="left",
    )
