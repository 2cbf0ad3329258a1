"""Extract tab handlers, called as Gradio calls them (no browser)."""
import numpy as np
import pytest

from components.extract_tab import extract, toy_concepts
from studio.customize.library import learned_concepts
from studio.errors import StudioError
from studio.toyworld.scenes import make_scene

SCENE = make_scene(11, n_objects=2, held_out=True)


def test_extract_handler_trains_applies_and_scores(manager):
    rgba = np.concatenate([SCENE.image, np.full((64, 64, 1), 255, np.uint8)], -1)  # as gr.Image(RGBA) sends it
    big_masks = [np.kron(o.mask, np.ones((2, 2), bool)) for o in SCENE.objects]  # drawn at another size
    shots = []
    message, rows = extract(manager, rgba, big_masks, "<a>, <b>", 2, 2, None, None, 4, 0.01, True, 2,
                            preview=shots.append)
    assert "Extracted <a>, <b>" in message and len(shots) == 2 and len(shots[0]) == 2
    assert [c.token for c in learned_concepts(manager)] == ["<a>"]  # one entry holding both tokens
    assert {"<a>", "<b>"} <= set(manager.pipe.tokenizer.get_vocab())
    assert [r[1] for r in rows[:2]] == ["red heart", "yellow triangle"] and rows[-1][0] == "all together"


def test_toy_concepts_reads_the_object_under_each_mask():
    assert toy_concepts(SCENE.image, [o.mask for o in SCENE.objects]) == [("heart", "red"), ("triangle", "yellow")]
    assert toy_concepts(SCENE.image, [np.zeros((64, 64), bool)]) is None


@pytest.mark.parametrize("masks,tokens,message", [
    ([], "<a>", "no masks"),
    ([np.ones((64, 64), bool), SCENE.objects[0].mask], "<a>, <b>", "covers"),
    ([o.mask for o in SCENE.objects], "<a>", "one token per mask"),
])
def test_extract_bad_input_changes_nothing(manager, masks, tokens, message):
    before = manager.fingerprint()
    with pytest.raises(StudioError, match=message):
        extract(manager, SCENE.image, masks, tokens, 2, 2, None, None, 4, 0.01, True, 100)
    with pytest.raises(StudioError, match="upload an image"):
        extract(manager, None, masks, tokens, 2, 2, None, None, 4, 0.01, True, 100)
    assert manager.fingerprint() == before and manager.history() == []
