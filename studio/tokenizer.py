"""The real CLIP tokenizer built offline, the prompt check, words among tokens, and names for new tokens."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from transformers import CLIPTokenizer

from .errors import StudioError

MAX_PROMPT = 10_000  # characters: far more than any text encoder reads, little enough to tokenize at once
SOS, EOS = "<sos>", "<eos>"
TOKEN_PATTERN = re.compile(r"^[^\s,]{1,40}$")


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """open_clip's SimpleTokenizer tables (CLIP's own), its special tokens under the names CLIPTokenizer uses."""
    from open_clip.tokenizer import SimpleTokenizer

    clip, names = SimpleTokenizer(), {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    return {names.get(t, t): i for t, i in clip.encoder.items()}, list(clip.bpe_ranks)


def build_clip_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer identical to openai/clip-vit-large-patch14's, made without network."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


def prompt_text(value, what: str = "prompt") -> str:
    text = str(value or "")
    if len(text) > MAX_PROMPT:
        raise StudioError(f"the {what} is {len(text):,} characters long; the limit is {MAX_PROMPT:,} "
                          "(the model reads only its first 75 tokens)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StudioError(f"the {what} holds a character that is not text at position {exc.start}: delete it") from None
    return text


@dataclass(frozen=True)
class Word:
    text: str
    positions: tuple[int, ...]  # token positions in the 77-token sequence (SOS = 0)

    @property
    def special(self) -> bool:
        return self.text in (SOS, EOS)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
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
    """Up to the longest prompt's EOS: padding carries no word."""
    return max(len(prompt_ids(tokenizer, p or "")) for p in prompts)


def token_names(token: str, vectors: int) -> list[str]:
    """The vocabulary entries of a concept, as diffusers' textual-inversion loader names them."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def check_token(tokenizer, token) -> str:
    token = str(token or "").strip()
    if not token:
        raise StudioError("the concept needs a token to call it by, e.g. <my-cat>")
    if not TOKEN_PATTERN.match(token):
        raise StudioError(f"token {token!r} must be one word of at most 40 characters, without spaces or commas")
    if tokenizer is None:
        return token
    if token in getattr(tokenizer, "added_tokens_encoder", {}):
        raise StudioError(f"{token!r} is already in the vocabulary: undo the concept that added it, or rename it")
    if {token.lower(), token.lower() + "</w>"} & tokenizer.get_vocab().keys():
        raise StudioError(f"{token!r} is already a word the model knows: pick a new one, e.g. <{token.strip('<>')}>")
    return token
