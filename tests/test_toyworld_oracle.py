"""The bundled oracle reads fresh generator scenes correctly (it is every tab's measuring instrument)."""
import numpy as np
import pytest

from studio.loading import ASSETS
from studio.toyworld.oracle import Oracle, segment
from studio.toyworld.scenes import BACKGROUND, SceneObject, make_scene, render

FRESH = range(2_000_000, 2_000_150)  # never used for training (train: 0.., test: 1_000_000..)


@pytest.fixture(scope="module")
def oracle():
    return Oracle.load(ASSETS / "toy-oracle.safetensors")


def test_oracle_reads_fresh_scenes(oracle):
    hits = {"shape": 0, "colour": 0, "style": 0}
    total = 0
    for seed in FRESH:
        scene = make_scene(seed, held_out=True)
        readings = oracle.read(scene.image)
        for obj in scene.objects:
            total += 1
            match = [r for r in readings if (r.mask & obj.mask).sum() > 0.5 * r.mask.sum()]
            for k in hits:
                hits[k] += bool(match) and getattr(match[0], k) == getattr(obj, k)
    acc = {k: v / total for k, v in hits.items()}
    assert acc["shape"] >= 0.97 and acc["colour"] >= 0.98 and acc["style"] >= 0.95, acc


def test_presence_and_empty_images(oracle):
    obj = SceneObject("star", "red", "striped", "left", 0.25)
    image = render([obj])
    assert oracle.presence(image, "red") == 1.0 and oracle.presence(image, "star") == 1.0
    assert oracle.presence(image, "striped") == 1.0 and oracle.presence(image, "blue") == 0.0
    blank = np.broadcast_to(np.array(BACKGROUND, np.uint8), (64, 64, 3)).copy()
    assert oracle.read(blank) == [] and oracle.presence(blank, "red") == 0.0


def test_segmentation_finds_each_object_once():
    found = [len(segment(make_scene(s).image)) == len(make_scene(s).objects) for s in FRESH]
    assert np.mean(found) >= 0.97
