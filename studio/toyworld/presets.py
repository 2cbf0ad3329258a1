"""The toy world's templates, prompts, images and oracle measures that the UI, CLI and bench hand to the methods
for the toy model (the methods never import the toy world).
"""
from __future__ import annotations

import numpy as np

from ..erase import report, text
from . import concepts as toy
from .evaluate import bundled_oracle
from .scenes import COLOURS, SHAPES, SceneObject, caption, render, sample_objects

PARAPHRASES = ("a photo of {}", "{} on the left", "a picture of {} at the top")
text.TEMPLATES["toy"] = toy.templates  # each word where the toy world's captions put its kind


def is_toy(manager) -> bool:
    """The manager's model (loaded if need be) is the bundled toy-world one, which the oracle can judge."""
    manager.pipe  # noqa: B018 (loading sets manager.info)
    return manager.info.kind == "builtin-toy"


def toy_captions(concept: str) -> list[str]:
    """ESD's training captions containing `concept`."""
    return [t.format(concept) for t in toy.templates(concept)]


def probes(erased: list[str], preserve: list[str] = ()) -> list[report.Probe]:
    """The toy-world prompts that judge erasing `erased` (words the toy world knows)."""
    Probe, out = report.Probe, []
    for word in erased:
        c = toy.canonical(word)
        own = toy.prompts(word)
        out += [Probe(f"efficacy: {word}", p, c) for p in own]
        out += [Probe(f"generality: synonyms of {word}", p, c) for s in toy.synonyms(word) for p in toy.prompts(s)[:2]]
        out += [Probe(f"generality: paraphrases of {word}", t.format(own[i]), c) for i, t in enumerate(PARAPHRASES)]
        out += [Probe(f"robustness: attack on {word}", p, c, attack=True) for p in own]
        if toy.kind(word) == "style":  # the rest of the same prompts must survive
            out += [Probe(f"specificity: {word} prompts' shapes", p, p.split()[-1]) for p in own]
        others = [n for n in list(preserve) + toy.neighbours(word) if toy.canonical(n) not in map(toy.canonical, erased)]
        out += [Probe("specificity: neighbours", toy.prompts(n)[i % 2], toy.canonical(n))
                for i, n in enumerate(dict.fromkeys(others))]
    return out


def erasure_report(manager, erased: list[str], preserve: list[str] = (), **kw) -> report.ErasureReport:
    """The erasure report, oracle-measured on the toy world's probes if it knows the model and every erased word."""
    if is_toy(manager) and all(toy.kind(w) is not None for w in erased):
        kw.update(probes=probes(erased, preserve), presence=bundled_oracle().presence)
    return report.erasure_report(manager, erased, **kw)


def toy_examples(shape: str = "heart", count: int = 8, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """`count` generator images of a toy shape in varied colours and places, with captions ('a red {}')."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    out = []
    for i in range(count):
        obj = SceneObject(shape, colours[i % len(colours)], "solid",
                          str(rng.choice(["centre", "left", "right", "top", "bottom"])), float(rng.uniform(0.2, 0.3)))
        out.append((render([obj], rng), f"a {obj.colour} {{}}"))
    return out


def toy_prior_prompts() -> list[str]:
    """What the toy model must keep drawing while it learns a new shape: every known colour and shape."""
    return [f"a {c} {s}" for c in COLOURS for s in SHAPES]


def toy_reg_prompts(count: int = 200) -> list[str]:
    """Toy-world captions whose K/V outputs the closed-form merge preserves."""
    rng = np.random.default_rng(0)
    return [caption(sample_objects(rng), rng) for _ in range(count)]
