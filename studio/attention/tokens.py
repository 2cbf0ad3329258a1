"""Prompt words <-> token positions. A word is the run of BPE tokens up to an end-of-word mark; SOS
(position 0) and EOS have maps too, listed as "<sos>"/"<eos>", hidden unless asked for.
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


def resolve_words(tokenizer, prompt: str, words=None, special: bool = False) -> list[Word]:
    """The given words (comma-separated or a list), or every word of the prompt."""
    words = [w for w in (words.split(",") if isinstance(words, str) else words or []) if str(w).strip()]
    if words:
        return [Word(str(w).strip(), tuple(token_positions(tokenizer, prompt, w))) for w in words]
    found = prompt_words(tokenizer, prompt, special)
    if not found:
        raise StudioError("the prompt has no words to show maps for")
    return found


def sequence_length(tokenizer, *prompts: str) -> int:
    """Positions worth keeping: up to the longest prompt's EOS (padding carries no word)."""
    return max(len(prompt_ids(tokenizer, p or "")) for p in prompts)
