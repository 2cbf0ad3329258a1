"""The real CLIP BPE tokenizer, built offline from the vocabulary file open_clip_torch ships, the
check every prompt passes before any tokenizer reads it, and where a prompt's words sit among its tokens:
a word is the run of BPE tokens up to an end-of-word mark; SOS (position 0) and EOS are "<sos>"/"<eos>";
and the names new tokens (learned concepts) may take.

No model hub is needed: OpenAI's CLIP tokenizer is fully defined by `bpe_simple_vocab_16e6.txt.gz`
(the merge list); the vocabulary is the byte alphabet, its end-of-word forms, one entry per
merge and the two special tokens, exactly as CLIP's SimpleTokenizer builds it.
"""
from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
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


SOS, EOS = "<sos>", "<eos>"


@dataclass(frozen=True)
class Word:
    text: str
    positions: tuple[int, ...]  # token positions in the 77-token sequence (SOS = 0)

    @property
    def special(self) -> bool:
        return self.text in (SOS, EOS)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids as the text encoder sees them: SOS, the prompt (truncated), EOS."""
    return tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids


def prompt_words(tokenizer, prompt: str, special: bool = False) -> list[Word]:
    """The prompt's words in order (repeats get ' (2)', ' (3)'); SOS/EOS around if `special`."""
    ids = prompt_ids(tokenizer, prompt)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    words, run, seen = [], [], {}
    for pos in range(1, len(ids) - 1):
        run.append(pos)
        if pieces[pos].endswith("</w>") or pos == len(ids) - 2:
            text = tokenizer.decode([ids[p] for p in run]).strip()
            seen[text] = seen.get(text, 0) + 1
            words.append(Word(text if seen[text] == 1 else f"{text} ({seen[text]})", tuple(run)))
            run = []
    return [Word(SOS, (0,)), *words, Word(EOS, (len(ids) - 1,))] if special else words


def token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of `word`'s (or a phrase's) tokens, first occurrence ("word (2)": the second)."""
    word = str(word or "").strip()
    if not word:
        raise StudioError("empty word: type a word of the prompt")
    for w in prompt_words(tokenizer, prompt, special=True):
        if w.text == word:
            return list(w.positions)
    ids = prompt_ids(tokenizer, prompt)
    target = tokenizer(word, add_special_tokens=False).input_ids
    for i in range(1, len(ids) - len(target)):
        if target and ids[i:i + len(target)] == target:
            return list(range(i, i + len(target)))
    known = ", ".join(w.text for w in prompt_words(tokenizer, prompt)) or "(the prompt is empty)"
    raise StudioError(f"{word!r} is not a word of the prompt {prompt!r}; its words are: {known}")


def sequence_length(tokenizer, *prompts: str) -> int:
    """Positions worth keeping: up to the longest prompt's EOS (padding carries no word)."""
    return max(len(prompt_ids(tokenizer, p or "")) for p in prompts)


TOKEN_PATTERN = re.compile(r"^[^\s,]{1,40}$")


def token_names(token: str, vectors: int) -> list[str]:
    """The vocabulary entries of a concept, as diffusers' textual-inversion loader names them."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def check_token(tokenizer, token) -> str:
    """The token string, or a StudioError saying why it cannot name a new concept (tokenizer None: the
    spelling only)."""
    token = str(token or "").strip()
    if not token:
        raise StudioError("the concept needs a token to call it by, e.g. <my-cat>")
    if not TOKEN_PATTERN.match(token):
        raise StudioError(f"token {token!r} must be one word of at most 40 characters, without spaces or commas")
    if tokenizer is None:
        return token
    if token in getattr(tokenizer, "added_tokens_encoder", {}):
        raise StudioError(f"{token!r} is already in the vocabulary (an applied concept added it): undo that concept "
                          f"or pick a new name such as <{token.strip('<>')}-1>")
    vocab = tokenizer.get_vocab()
    if token.lower() in vocab or token.lower() + "</w>" in vocab:
        raise StudioError(f"{token!r} is already a word the model knows; a new token must be new, e.g. "
                          f"<{token.strip('<>')}>")
    return token
