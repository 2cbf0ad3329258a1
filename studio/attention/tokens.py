"""Prompt tokens and words: which of the 77 text positions a word of the prompt occupies.

Maps are captured per token; users think in words. A word is the run of BPE tokens up to the one
that ends with CLIP's end-of-word mark, so a word's map is the mean over its subword tokens.
SOS (position 0) and EOS are real positions with maps of their own (SOS soaks up most of the
attention); they are listed as "<sos>" and "<eos>" and hidden unless asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import StudioError

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
    """The prompt's words in order (repeated words get ' (2)', ' (3)'); SOS/EOS first/last if `special`."""
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
    if special:
        words = [Word(SOS, (0,))] + words + [Word(EOS, (len(ids) - 1,))]
    return words


def token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of the subword tokens of `word` (or a phrase) in `prompt`: its first occurrence.

    "<sos>"/"<eos>" name the special positions; "word (2)" the second occurrence of a word."""
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


def resolve_words(tokenizer, prompt: str, words=None, special: bool = False) -> list[Word]:
    """Words to show: the given ones (a comma-separated string or a list) or every word of the prompt."""
    if isinstance(words, str):
        words = [w.strip() for w in words.split(",")]
    words = [w for w in (words or []) if str(w).strip()]
    if not words:
        found = prompt_words(tokenizer, prompt, special)
        if not found:
            raise StudioError("the prompt has no words to show maps for")
        return found
    return [Word(str(w).strip(), tuple(token_positions(tokenizer, prompt, w))) for w in words]


def sequence_length(tokenizer, *prompts: str) -> int:
    """Positions worth keeping: up to the last EOS of the longest prompt (padding carries no word)."""
    return max(len(prompt_ids(tokenizer, p or "")) for p in prompts)
