"""What the toy world knows about a word: its kind, synonyms, neighbours, and the prompts and templates that test it."""
from __future__ import annotations

from .scenes import COLOURS, SHAPES, STYLES, SYNONYMS, with_article

CANONICAL = {syn: word for word, syns in SYNONYMS.items() for syn in syns}


def canonical(word: str) -> str:
    w = word.strip().lower()
    return CANONICAL.get(w, w)


def kind(word: str) -> str | None:
    """'colour', 'shape', 'style' or None for a word the toy world does not know."""
    w = canonical(word)
    return "colour" if w in COLOURS else "shape" if w in SHAPES else "style" if w in STYLES else None


def templates(word: str) -> list[str]:
    """Caption-like templates with '{}' where a word of this kind sits."""
    k = kind(word)
    if k == "shape":
        return [with_article(f"{c} {{}}") for c in COLOURS]
    if k == "style":
        return [f"a {{}} {c} {s}" for c, s in zip(COLOURS, SHAPES)]
    return [f"a {{}} {s}" for s in SHAPES] + [f"a photo of a {{}} {s}" for s in SHAPES[:2]]


def prompts(word: str) -> list[str]:
    """Prompts that ask for `word` (in its own spelling) in every combination the world knows."""
    k = kind(word)
    if k == "colour":
        return [with_article(f"{word} {s}") for s in SHAPES]
    if k == "shape":
        return [with_article(f"{c} {word}") for c in COLOURS][:4]
    if k == "style":
        return [with_article(f"{word} {c} {s}") for c, s in zip(COLOURS, SHAPES)]
    return []


def synonyms(word: str) -> list[str]:
    w = canonical(word)
    return [s for s in (w,) + SYNONYMS.get(w, ()) if s != word.strip().lower()]


def neighbours(word: str) -> list[str]:
    """Other concepts of the same kind: what an erasure of `word` must leave alone."""
    k, w = kind(word), canonical(word)
    pool = {"colour": COLOURS, "shape": SHAPES, "style": STYLES}.get(k, ())
    return [x for x in pool if x != w and x != "solid"]
