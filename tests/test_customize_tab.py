"""Customize tab handlers, called as Gradio calls them (no browser)."""
import numpy as np
import pytest

from components.common import PAINT_COLOURS
from components.customize_tab import regions_from_drawing, toy_example_files, train
from studio.customize.library import learned_concepts
from studio.customize.scope import SCOPES
from studio.errors import StudioError


def test_train_handler_streams_previews_and_lands_one_entry(manager):
    files = toy_example_files()
    assert len(files) == 16 and sum(f.endswith(".txt") for f in files) == 8
    shots, ticks = [], []
    message = train(manager, files, "<heart>", "", "LoRA (peft)", 4, None, None, 2, 4, "attention", 1, True, 0.0,
                    0.5, "a red circle\na blue star", False, 2, "a {}\na red {}", False, SCOPES["prompt"], 0.5,
                    preview=shots.append,
                    progress=lambda d, t: ticks.append(d))
    assert "Learned **<heart>**" in message
    assert len(shots) == 2 and all(len(s) == 2 for s in shots)  # steps 2 and 4, one image per preview prompt
    assert ticks == [1, 2, 3, 4]
    assert [(c.token, c.method, c.on) for c in learned_concepts(manager)] == [("<heart>", "lora", True)]
    with pytest.raises(StudioError, match="already in the vocabulary"):
        train(manager, files, "<heart>", "", "LoRA (peft)", 2, None, None, 2, 4, "attention", 1, True, 0.0, 0.0,
              "", False, 100, "a {}", False, SCOPES["prompt"], 0.0)
    assert len(manager.history()) == 1


def test_regions_from_painted_canvas():
    layer = np.zeros((64, 64, 4), np.uint8)
    for i, (x0, x1) in enumerate([(0, 32), (32, 64)]):
        rgb = [int(PAINT_COLOURS[i][j:j + 2], 16) for j in (1, 3, 5)]
        layer[8:56, x0:x1] = rgb + [255]
    regions = regions_from_drawing({"background": None, "layers": [layer], "composite": None},
                                   ["<heart>", "<cross>", ""])
    assert [w for w, _ in regions] == ["<heart>", "<cross>"]
    left, right = (m for _, m in regions)
    assert left[:, :32].sum() == 48 * 32 and left[:, 32:].sum() == 0 and right[:, 32:].sum() == 48 * 32
    with pytest.raises(StudioError, match="draw the masks"):
        regions_from_drawing(None, ["a"])
