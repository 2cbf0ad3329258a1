"""The real CLIP BPE tokenizer, built offline from the vocabulary file open_clip_torch ships, and the
check every prompt passes before any tokenizer reads it.

No model hub is needed: OpenAI's CLIP tokenizer is fully defined by `bpe_simple_vocab_16e6.txt.gz`
(the merge list); the vocabulary is the byte alphabet, its end-of-word forms, one entry per
merge and the two special tokens, exactly as CLIP's SimpleTokenizer builds it.
"""
from __future__ import annotations

import gzip
from functools import lru_cache

from transformers import CLIPTokenizer

from .errors import StudioError

N_MERGES = 49152 - 256 - 2  # CLIP's merge count: vocab 49408 = 256 bytes * 2 + merges + 2 specials


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table, in CLIP's order: the printable bytes as
    themselves, then the other bytes as the characters from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(c) for c in printable + list(range(256, 256 + 256 - len(printable)))]


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer identical to openai/clip-vit-large-patch14's, made without network."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


MAX_PROMPT = 10_000  # characters: far more than any text encoder reads, little enough to tokenize at once


def prompt_text(value, what: str = "prompt") -> str:
    """`value` as prompt text a tokenizer can take, or a StudioError saying what to change."""
    text = str(value or "")
    if len(text) > MAX_PROMPT:
        raise StudioError(f"the {what} is {len(text):,} characters long; the limit is {MAX_PROMPT:,} (the model reads "
                          "only its first 75 tokens, about 50 words)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StudioError(f"the {what} holds a character that is not text at position {exc.start} (half of an "
                          "emoji from a broken copy?): delete it and try again") from None
    return text
