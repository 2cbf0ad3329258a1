"""The toy world's scene generator: reproducible, with masks that match what is drawn."""
import numpy as np
import pytest

from studio.toyworld.scenes import (ALL_SHAPES, BACKGROUND, COLOURS, HELD_OUT_COMBINATIONS, HELD_OUT_SHAPES, SHAPES,
                                    STYLES, SYNONYMS, SceneObject, caption, make_scene, render, sample_objects)


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b, c = make_scene(11), make_scene(11), make_scene(12)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("shape", ALL_SHAPES)
@pytest.mark.parametrize("style", STYLES)
def test_paint_lies_inside_the_mask_and_fills_it_as_the_style_says(shape, style):
    obj = SceneObject(shape, "blue", style, "centre", 0.3)
    image = render([obj], np.random.default_rng(0)).astype(int)
    full = np.abs(np.array(COLOURS["blue"]) - np.array(BACKGROUND)).sum()
    painted = np.abs(image - np.array(BACKGROUND)).sum(-1) > 0.6 * full  # mostly paint
    mask = obj.mask
    assert 150 < mask.sum() < 0.5 * mask.size
    assert (painted & ~mask).sum() <= 0.02 * mask.sum()  # paint stays in the mask (edges antialiased)
    coverage = (painted & mask).sum() / mask.sum()
    low, high = {"solid": (0.9, 1.0), "striped": (0.3, 0.7), "dotted": (0.15, 0.55), "outlined": (0.15, 0.7)}[style]
    assert low <= coverage <= high, coverage


def test_two_objects_have_disjoint_masks_and_distinct_colours():
    for seed in range(50):
        scene = make_scene(seed, n_objects=2)
        a, b = scene.objects
        assert not (a.mask & b.mask).any() and a.colour != b.colour and a.position != b.position


def test_held_out_shapes_and_combinations_stay_out_of_training_captions():
    rngs = [np.random.default_rng(s) for s in range(3000)]
    captions = [caption(sample_objects(r), r) for r in rngs]  # captions as make_scene draws them, unrendered
    words = {w for c in captions for w in c.split()}
    assert not words & set(HELD_OUT_SHAPES)
    assert set(SHAPES) | set(COLOURS) | {s for v in SYNONYMS.values() for s in v} <= words
    phrases = [p.split() for c in captions for p in c.split(" and ")]  # one phrase per object
    for syn, other in HELD_OUT_COMBINATIONS:
        assert not any(syn in p and other in p for p in phrases), (syn, other)
    held = [make_scene(s, held_out=True) for s in range(300)]
    assert {o.shape for s in held for o in s.objects} >= set(HELD_OUT_SHAPES)


def test_caption_names_every_object():
    for seed in range(200):
        scene = make_scene(seed, synonyms=False)
        words = scene.caption.split()
        for obj in scene.objects:
            assert obj.colour in words and obj.shape in words
            assert obj.style in words or obj.style == "solid"
