"""The oracle-scored harness: it counts right what a perfect and a wrong 'model' draw."""
from types import SimpleNamespace

import numpy as np
from PIL import Image

from studio.toyworld.evaluate import (PromptSpec, Wanted, default_prompt_set, presence_rate, score, single_prompts,
                                      two_object_prompts)
from studio.toyworld.scenes import POSITIONS, SceneObject, render


class PaintingManager:
    """Stands in for a model: draws exactly what each spec asks for, optionally with one colour swapped."""

    def __init__(self, specs, swap=None):
        self.by_prompt = {s.prompt: s for s in specs}
        self.swap = swap or {}

    def generate(self, request):
        spec = self.by_prompt[request.prompt]
        places = ["centre"] if len(spec.objects) == 1 else ["left", "right"]
        images = []
        for i in range(request.batch):
            objs = [SceneObject(w.shape, self.swap.get(w.colour, w.colour), w.style or "solid", p, 0.17)
                    for w, p in zip(spec.objects, places)]
            images.append(Image.fromarray(render(objs, np.random.default_rng(i))))
        return SimpleNamespace(images=images, seeds=list(range(request.batch)))


def test_perfect_model_scores_full_marks_and_a_colour_swap_is_caught():
    specs = single_prompts()[:8] + two_object_prompts()[:4] + [PromptSpec("a striped red star", (Wanted("star", "red", "striped"),), "style")]
    groups = score(PaintingManager(specs), specs, seeds=2)
    for g in groups.values():
        r = g.rates()
        assert r["colour"] == r["shape"] == r["all objects right"] == 1.0, (g.group, r)
    assert groups["style"].rates()["style"] == 1.0
    swapped = score(PaintingManager(specs, swap={"red": "green"}), specs, seeds=2)
    reds = [row for row in swapped["single"].rows if " red " in f" {row['prompt']} "]
    assert reds and not any(row["colour"] for row in reds) and all(row["shape"] for row in reds)


def test_presence_rate_measures_a_concept():
    specs = single_prompts()
    m = PaintingManager(specs)
    assert presence_rate(m, ["a red circle", "a red star"], "red", seeds=2) == 1.0
    assert presence_rate(m, ["a red circle", "a blue star"], "blue", seeds=2) == 0.5
    assert presence_rate(PaintingManager(specs, swap={"red": "green"}), ["a red circle"], "red", seeds=2) == 0.0


def test_default_prompt_set_covers_every_group():
    groups = {s.group for s in default_prompt_set()}
    assert groups == {"single", "style", "synonym", "two"}
    prompts = [s.prompt for s in default_prompt_set()]
    assert "a scarlet star" in prompts and "an azure triangle" in prompts and "a purple box" in prompts
