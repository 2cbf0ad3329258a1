"""How well extracted tokens hold their objects, read by the caller's oracle: "a <token>" shows its shape and
colour (ACC@1: the share of its images `classify` gives to its own concept); "a <a> and a <b>" shows all."""
from __future__ import annotations

import numpy as np

from ..generation import GenerationRequest


def classify(readings, concepts: list[tuple[str, str]]) -> int | None:
    """Index of the concept (shape, colour) an image's objects match best (None: nothing read)."""
    if not readings:
        return None
    scores = [max((r.shape == s) + (r.colour == c) for r in readings) for s, c in concepts]
    best = max(scores)
    return scores.index(best) if best > 0 and scores.count(best) == 1 else None


def evaluate_extraction(manager, tokens: list[str], concepts: list[tuple[str, str]], oracle, seeds: int = 8,
                        steps: int = 20) -> dict:
    """Per token: shape and colour rates and ACC@1 (concepts[i]: the (shape, colour) tokens[i] should show); the
    rate of whole scenes."""
    def read(prompt):
        return [oracle.read(im) for im in
                manager.generate(GenerationRequest(prompt, seed=0, batch=seeds, steps=steps)).images]

    out = {"tokens": {}}
    hits = []
    for i, (token, (shape, colour)) in enumerate(zip(tokens, concepts)):
        reads = read(f"a {token}")
        own = [classify(rs, concepts) == i for rs in reads]
        hits += own
        out["tokens"][token] = dict(shape=shape, colour=colour,
                                    shape_rate=float(np.mean([any(r.shape == shape for r in rs) for rs in reads])),
                                    colour_rate=float(np.mean([any(r.colour == colour for r in rs) for rs in reads])),
                                    acc1=float(np.mean(own)))
    out["acc1"] = float(np.mean(hits))
    scene = read("a " + " and a ".join(tokens))
    out["scene_rate"] = float(np.mean([all(any(r.shape == s and r.colour == c for r in rs) for s, c in concepts)
                                       for rs in scene]))
    return out


def table(result: dict) -> list[list]:
    """Rows for the UI and CLI: token, object, shape, colour, ACC@1."""
    rows = [[t, f"{v['colour']} {v['shape']}", f"{v['shape_rate']:.0%}", f"{v['colour_rate']:.0%}", f"{v['acc1']:.0%}"]
            for t, v in result["tokens"].items()]
    return rows + [["all together", "scene", "", "", f"scene {result['scene_rate']:.0%}, ACC@1 {result['acc1']:.0%}"]]
